"""The same apps over real processes: a TLS SuperLink and two SuperNodes on 127.0.0.1, two rounds, status completed.

Certificates are made by deploy/make_certs.sh (CA + server certificate with SANs for 127.0.0.1/localhost). Each SuperNode finds its
site through its node config (`site-config`), as a hospital's would. Every process started carries a marker in its
environment and is ended by id at the end, whatever happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from common.processes import free_port, marked, stop
from server.flwrctl import json_tail
from simulations.run import _env, _flwr
from tests.deployhelpers import make_certs
from tests.tinysites import TINY_MODEL, TINY_TRAIN, make_site

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower")]
BIN = Path(sys.executable).parent


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """CA, server certificate (SAN IP:127.0.0.1, DNS:localhost) and its key, via deploy/make_certs.sh."""
    return make_certs(folder)


def test_two_supernodes_over_tls_complete_two_rounds(tmp_path):
    ca, cert, key = make_certificates(tmp_path / "certs")
    sites = [make_site(tmp_path / "sites", "hospA", seed=1), make_site(tmp_path / "sites", "hospB", n=10, seed=2)]
    plan = {"rounds": 2, "evaluate": "final", "model": TINY_MODEL, "train": TINY_TRAIN}
    plan["quorum"] = {"min_sites": 2, "join_timeout_s": 120, "round_timeout_s": 300}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(plan))
    home, port, marker = tmp_path / "flwr_home", free_port(), f"test-{time.time_ns()}"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "t"\n\n[superlink.t]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n'
    )
    env = _env(home, marker)
    procs: list[subprocess.Popen] = []

    def start(cmd, log):
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        )
        return procs[-1]

    try:
        link = start(
            [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert)]
            + ["--ssl-keyfile", str(key), "--host", "127.0.0.1", "--port", str(port), "--isolation", "subprocess"]
            + ["--disable-runtime-dependency-installation"],
            tmp_path / "superlink.log",
        )
        _wait_for_port(port, link)
        for i, site in enumerate(sites):
            start(
                [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(ca)]
                + ["--port", str(free_port()), "--node-config", f"site-config={json.dumps(str(site))}"],
                tmp_path / f"supernode{i}.log",
            )
        out = tmp_path / "run"
        argv = ["run", str(Path(__file__).resolve().parent.parent), "t", "--format", "json"]
        argv += ["--run-config", f"experiment={json.dumps(str(tmp_path / 'experiment.yaml'))}"]
        argv += ["--run-config", f"out-dir={json.dumps(str(out))}", "--run-config", "expected-sites=2"]
        run_id = json_tail(_flwr(*argv, env=env)).get("run-id")
        assert run_id
        status, deadline = "", time.monotonic() + 400
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(3)
            runs = json_tail(_flwr("list", "t", "--run-id", str(run_id), "--format", "json", env=env)).get("runs", [])
            status = runs[0]["status"] if runs else ""
        assert status == "finished:completed", (status, (tmp_path / "superlink.log").read_text()[-3000:])
        fed = json.loads((out / "federation.json").read_text())
        assert {c["site"] for c in fed["census"]} == {"hospA", "hospB"}
        assert [len(r["accepted"]) for r in fed["rounds"]] == [2, 2]
        assert set(fed["final_evaluation"]) == {"hospA", "hospB"}
        # What the coordinator logged and received carries no patient id and no site path.
        seen = (tmp_path / "superlink.log").read_text() + json.dumps(fed)
        assert "PATIENT-" not in seen and str(tmp_path / "sites") not in seen
    finally:
        for proc in procs[1:] + procs[:1]:  # SuperNodes first, then the SuperLink
            stop(proc, marker="__none__")
        stop(None, marker)
    assert marked(marker) == []


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """The SuperLink's port accepts connections (its /health is TLS here, so a plain socket check)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "SuperLink exited at start-up"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError("SuperLink did not open its port")
