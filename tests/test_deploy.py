"""Deployment with real processes on 127.0.0.1: `server` (SuperLink + nginx TLS front) and three `client --site`.

One federation (module fixture) serves the tests in order: intrusions refused → a dry run asks every site whether it
is ready (one site approved nothing and refuses) → two rounds complete with nothing identifying leaving any site → a
site killed mid-round and the run still completes → the coordinator killed and `server run --resume` continuing after
the last finished round. The fixture's teardown proves no process is left
(nginx included). Fast checks of the front's configuration come first and need no process.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from server.front import FLEET_PATHS, nginx_conf
from tests.deployhelpers import BIN, REPO, Deployment, pids_with, wait_for


def test_front_exposes_every_fleet_path_flwr_calls_and_nothing_else(tmp_path):
    import flwr.supernode.fleet_http_client as fleet

    called = set(re.findall(r'path="/v1/fleet/([a-z-]+)"', Path(fleet.__file__).read_text()))
    assert called == set(FLEET_PATHS)  # a Flower upgrade that adds an endpoint fails here, not in a hospital
    conf = nginx_conf(prefix=tmp_path, log_dir=tmp_path, listen_host="0.0.0.0", listen_port=9443,
                      certificate=tmp_path / "c", key=tmp_path / "k", upstream_port=9091,
                      upstream_ca=tmp_path / "ca")  # fmt: skip
    assert conf.count("proxy_pass") == 1 and "location / {\n            return 404;" in conf
    assert "/v1/control" not in conf and "127.0.0.1:9091" in conf


def test_coordinator_config_errors_name_file_and_key(tmp_path):
    from common.errors import ConfigError
    from server.coordinator import load_coordinator_config

    cfg = tmp_path / "coordinator.yaml"
    cfg.write_text("front:\n  port: 70000\n  certificate: c.crt\n  key: c.key\n")
    with pytest.raises(ConfigError, match=r"coordinator.yaml: key 'front.port'"):
        load_coordinator_config(cfg)
    cfg.write_text("front:\n  certificate: c.crt\n  key: c.key\n")
    with pytest.raises(ConfigError, match=r"key 'front.certificate': file not found"):
        load_coordinator_config(cfg)


def test_keygen_is_owner_only_p384_and_flower_readable(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from client.cli import main as client_main
    from client.node import keygen
    from common.config import load_site_config
    from tests.tinysites import make_site

    cfg = load_site_config(make_site(tmp_path, "hospX"))
    path, public = keygen(cfg)
    assert path.stat().st_mode & 0o777 == 0o600
    key = load_ssh_private_key(path.read_bytes(), None)  # what flower-supernode does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.encode()).public_numbers() == key.public_key().public_numbers()
    assert keygen(cfg)[1] == public  # a second keygen keeps the key
    assert client_main(["--site", "other", "--config", str(cfg.file)]) == 2  # name mismatch: refused before start


NAMES = ("hospA", "hospB", "hospC")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    marker = uuid.uuid4().hex[:12]
    dep = Deployment(tmp_path_factory.mktemp("deploy"), marker)
    try:
        dep.start_server()
        for i, name in enumerate(NAMES):
            dep.add_site(name, n=10 + 2 * i, seed=i)
            dep.start_site(name)
        dep.wait_online(NAMES)
        yield dep
    finally:
        late = dep.close()
        # Children take a moment to exit after their parent: a bounded grace period. The front's nginx workers count
        # too (found by the log files they hold, tests/deployhelpers.py `_nginx_of`), so an orphaned one fails here.
        deadline = time.monotonic() + 40
        while (left := pids_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert not left, f"processes left behind: {left}"
    assert not late, f"processes outlived a clean stop and had to be killed: {late}"


def _flwr_from_site(dep: Deployment, *args) -> subprocess.CompletedProcess:
    """`flwr` run as a site could: its FLWR_HOME points at the exposed front, trusting the coordinator's CA."""
    home = dep.root / "site_flwr_home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "front"\n\n[superlink.front]\naddress = "{dep.front}"\nroot-certificates = "{dep.ca}"\n'
    )
    env = {**dep.env("attacker"), "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([str(BIN / "flwr"), *map(str, args)], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)  # fmt: skip


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_front_refuses_control_api_plain_http_and_unregistered_keys(fed):
    import httpx

    with httpx.Client(verify=str(fed.ca), timeout=10) as client:
        for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/get-nodes", "/health",
                     "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/start-run"):  # fmt: skip
            assert client.post(f"https://{fed.front}{path}", content=b"").status_code == 404, path
    plain = httpx.post(f"http://{fed.front}/v1/fleet/pull-messages", content=b"", timeout=10)
    assert plain.status_code == 400  # nginx: plain HTTP sent to the TLS port
    # Registering a key or running code from the sites' side, through the only address they can reach: refused.
    intruder = fed.root / "intruder.pub"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(intruder.with_suffix(""))],
                   check=True)  # fmt: skip
    assert _flwr_from_site(fed, "supernode", "register", intruder, "front").returncode != 0
    assert _flwr_from_site(fed, "run", REPO, "front").returncode != 0
    assert _flwr_from_site(fed, "ls", "front").returncode != 0
    # A SuperNode with an unregistered key is turned away and never appears.
    log = (fed.root / "intruder-supernode.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "flower-supernode"), "--superlink", fed.front, "--root-certificates", str(fed.ca),
         "--auth-supernode-private-key", str(intruder.with_suffix("")), "--max-retries", "0", "--port", "0"],
        env=fed.env("attacker"), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code != 0, (fed.root / "intruder-supernode.log").read_text()[-2000:]
    assert set(fed.site_states()) == set(NAMES)


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_front_sheds_abuse_before_the_superlink_and_sites_stay_online(fed):
    """#20: URI tricks and an oversized body against the real front; the access log's upstream field shows neither
    reached the SuperLink (tests/test_front_abuse.py covers these, slow bodies, rate limits and TLS with a stub)."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(fed.ca))

    def send(raw: bytes) -> bytes:
        with (
            socket.create_connection(("127.0.0.1", fed.front_port), timeout=30) as sock,
            ctx.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            tls.sendall(raw)
            try:
                return tls.recv(200)
            except (OSError, ssl.SSLError):
                return b""

    tag = uuid.uuid4().hex[:8]
    tricks = [f"/v1/fleet/%2e%2e/control/start-run?{tag}", f"/v1/fleet//pull-messages?{tag}",
              f"/v1/fleet/pull-messages?{tag}", f"/v1/fleet/./push-object?{tag}"]  # fmt: skip
    for path in tricks:
        head = send(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        assert head.startswith(b"HTTP/1.1 404"), (path, head[:40])
    big = f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\nContent-Length: {250 * 2**20}\r\n\r\n"
    assert send(big.encode()).startswith(b"HTTP/1.1 413")
    time.sleep(1.0)
    log = (fed.log_dir / "front-access.log").read_text().splitlines()
    lines = [ln for ln in log if tag in ln]
    assert len(lines) == len(tricks) and all("upstream=-" in ln for ln in lines), lines
    refused = [ln for ln in log if "push-object" in ln and '" 413 ' in ln]
    assert refused and "upstream=-" in refused[-1], refused
    assert any("upstream=127.0.0.1:" in ln for ln in log)  # the sites' own requests do reach the SuperLink
    assert set(fed.site_states()) == set(NAMES)


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_dry_run_asks_every_site_and_one_that_approved_nothing_refuses(fed):
    """`server run --dry-run`: one census question per site through its own launcher; hospC approves nothing."""
    exp = fed.experiment("ready", quorum={"min_sites": 2, "join_timeout_s": 30, "round_timeout_s": 120})
    out = fed.coord_dir / "runs" / "ready"
    fed.approve("hospC", [])
    try:
        res = fed.server("run", exp, "--dry-run", "--deadline", "120", "--out", out, check=False)
    finally:
        fed.approve("hospC", [fed.bundle_sha256])
    assert res.returncode == 0, res.stdout + res.stderr  # 2 of 3 ready, quorum 2
    rows = {ln.split()[0]: ln.split() for ln in res.stdout.splitlines() if ln.split() and ln.split()[0] in NAMES}
    for name in ("hospA", "hospB"):
        assert rows[name][1:4] == ["yes", "approved", "same"] and "patient(s)" in rows[name], res.stdout
    assert rows["hospC"][1:3] == ["yes", "REFUSED"], res.stdout
    assert "federation.approved_apps is empty" in res.stdout and "2 of 3 site(s) ready" in res.stdout
    assert f"app bundle sha256 {fed.bundle_sha256}" in res.stdout  # what the sites were set up to approve
    # Each site's launcher recorded the bundle it received: the hash `flwr run` sent is the one the sites approved.
    run_id = int(re.search(r"readiness run (\d+)", res.stdout).group(1))
    for name, cfg in fed.sites.items():
        record = json.loads((cfg.parent / "cache-review" / "runs" / f"{run_id}.json").read_text())
        assert record["fab_hash"] == fed.bundle_sha256, name
        assert record["verdict"].startswith("refused: " if name == "hospC" else "approved"), record
    seen = res.stdout + (out / "readiness" / "readiness.json").read_text()
    for forbidden in ("PATIENT-", str(fed.root / "sites"), "index.csv"):
        assert forbidden not in seen, forbidden


def _texts(*folders: Path) -> str:
    parts = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and path.suffix not in (".npz", ".npy", ".db", ".key", ".crt", ".pt", ".secret"):
                parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_two_rounds_three_sites_complete_and_nothing_identifying_leaves(fed):
    exp = fed.experiment("two_rounds", quorum={"min_sites": 3, "join_timeout_s": 60, "round_timeout_s": 300})
    res = fed.server("run", exp, "--out", fed.coord_dir / "runs" / "two")
    assert "finished:completed" in res.stdout
    fed_json = json.loads((fed.coord_dir / "runs" / "two" / "federation.json").read_text())
    assert {c["site"] for c in fed_json["census"]} == set(NAMES)
    assert [len(r["accepted"]) for r in fed_json["rounds"]] == [3, 3]
    # Everything the sites sent as the coordinator recorded it, the coordinator's logs (SuperLink, nginx, ServerApp
    # log), and each site's audit log of its own outbound messages: no patient id, name or site path.
    seen = _texts(fed.coord_dir / "logs", fed.coord_dir / "runs" / "two")
    audits = {n: (cfg.parent / "audit.jsonl").read_text() for n, cfg in fed.sites.items()}
    for name, audit in audits.items():
        kinds = [json.loads(line)["kind"] for line in audit.splitlines()]
        assert kinds.count("train") == 2 and "query" in kinds and "evaluate" in kinds, (name, kinds)
    everything = seen + "\n".join(audits.values())
    for forbidden in ("PATIENT-", "PatientName", "PatientID", str(fed.root / "sites"), "index.csv", ".npy"):
        assert forbidden not in everything, forbidden


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_a_protocol_unit_pools_its_histograms_by_secure_sum_over_the_real_supernodes(fed):
    """One tenfold unit over the three real SuperNodes: its threshold and the report's pooled histograms come from
    secure sums (the masked vectors and the seeds travel through the TLS front as ConfigRecords)."""
    exp = fed.experiment(
        "secure",
        protocol="tenfold",
        rounds=1,
        folds={"k": 3, "seed": 0},
        plan={"max_folds": 1, "local_only": False, "final_model": False},
        quorum={"min_sites": 3, "join_timeout_s": 60, "round_timeout_s": 300},
    )
    out = fed.coord_dir / "runs" / "secure"
    fed.server("run", exp, "--out", out)
    results = json.loads((out / "results.json").read_text())
    pooling = results["units"]["tenfold/fold-00"]["threshold_choice"]["pooling"]
    assert pooling["pooling"] == "secure sum" and pooling["participants"] == sorted(NAMES), pooling
    assert results["protocols"]["tenfold"]["pooling"]["pooling"] == "secure sum"
    for name, cfg in fed.sites.items():  # each site's audit log: a masked vector left with its evaluation reply
        lines = [json.loads(line) for line in (cfg.parent / "audit.jsonl").read_text().splitlines()]
        assert any(e["kind"] == "evaluate" and "securesum" in json.dumps(e) for e in lines), name
        assert any(e["kind"] == "query" and "securesum" in json.dumps(e) for e in lines), name  # the reveal step


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_site_killed_mid_round_and_run_completes_with_the_others(fed):
    out = fed.coord_dir / "runs" / "killed"
    exp = fed.experiment("killed", rounds=1, quorum={"min_sites": 2, "join_timeout_s": 30, "round_timeout_s": 90})
    run = subprocess.Popen([str(BIN / "server"), "run", str(exp), "--out", str(out), "--config", str(fed.config)],
                           env=fed.env("cli"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    t0 = time.monotonic()
    audit = fed.sites["hospC"].parent / "audit.jsonl"
    log = fed.sites["hospC"].parent / "cache-supernode.log"
    trains = log.read_text().count("Receiving: train message")
    # the audit log exists once the site has replied to anything (test order is not guaranteed under xdist)
    replies = audit.read_text().count('"kind": "train"') if audit.exists() else 0
    # Mid-round: hospC has pulled its train message (its ClientApp is training) and not replied.
    wait_for(lambda: log.read_text().count("Receiving: train message") > trains or run.poll() is not None, 300,
             "hospC to receive its train message", step=0.5)  # fmt: skip
    assert run.poll() is None, run.communicate()[0]
    fed.kill_site("hospC")
    output, _ = run.communicate(timeout=400)
    took = time.monotonic() - t0
    assert run.returncode == 0, output
    summary = json.loads((out / "federation.json").read_text())
    rnd = summary["rounds"][0]
    assert len(rnd["accepted"]) == 2 and len(rnd["sent"]) == 3, rnd
    assert (audit.read_text().count('"kind": "train"') if audit.exists() else 0) == replies  # died before replying
    assert took < 30 + 90 + 200, took  # join + round deadline + census/evaluation slack


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_coordinator_killed_restarted_and_resume_continues(fed):
    alive = [n for n in NAMES if n in fed.site_procs]
    assert len(alive) >= 2
    out = fed.coord_dir / "runs" / "resumed"
    exp = fed.experiment("resumed", rounds=2, quorum={"min_sites": 2, "join_timeout_s": 20, "round_timeout_s": 300})
    run = subprocess.Popen([str(BIN / "server"), "run", str(exp), "--out", str(out), "--config", str(fed.config)],
                           env=fed.env("cli"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    rounds_csv = out / "rounds.csv"
    wait_for(lambda: rounds_csv.is_file() and len(rounds_csv.read_text().splitlines()) >= 2, 400, "round 1", 0.5)
    fed.crash_server()
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0, output  # the follower notices the coordinator is gone
    assert not (out / "federation.json").exists()
    fed.start_server()
    fed.wait_online(alive, timeout=240)  # SuperNodes reconnect by themselves (retry with backoff)
    res = fed.server("run", exp, "--out", out, "--resume")
    assert "finished:completed" in res.stdout
    summary = json.loads((out / "federation.json").read_text())
    assert summary["resumed_after"] == 1
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert len(summary["rounds"][1]["accepted"]) == len(alive)
