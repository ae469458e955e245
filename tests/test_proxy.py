"""The hospital's web proxy (site.yaml `network:`), tested through a real forward proxy: Debian's tinyproxy.

tinyproxy runs on 127.0.0.1 with a config written here (basic authentication, CONNECT allowed only to the front's
port, a log file in tmp). The coordinator's front listens on 127.0.0.2, which Linux routes over loopback but which is
outside NO_PROXY's loopback defaults, so the site's proxy applies to it. tinyproxy opens its outgoing connections from
127.0.0.3 (`Bind`), so the front's access log shows which requests came through the proxy: the end-to-end test
proves that every request the site's SuperNode made did.

Skipped where tinyproxy is missing (`apt-get install -y --no-install-recommends tinyproxy`; .ci/run installs it).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from client.node import check, proxy_route, supernode_proxy_env
from common.config import load_site_config
from common.errors import ConfigError
from common.processes import free_port
from tests.deployhelpers import BIN, Deployment, make_certs, pids_with, wait_for
from tests.tinysites import make_site

TINYPROXY = shutil.which("tinyproxy")
needs_tinyproxy = pytest.mark.skipif(
    TINYPROXY is None,
    reason="tinyproxy not installed (as root: apt-get install -y --no-install-recommends tinyproxy; .ci/run does)",
)
USER, PASSWORD = "spinefed-site", "s3cret.Pw_9-x"  # tinyproxy's BasicAuth takes [-a-zA-Z0-9._] only
FRONT_HOST, PROXY_SOURCE = "127.0.0.2", "127.0.0.3"


class Tinyproxy:
    """tinyproxy in the foreground on 127.0.0.1 with its own config, pid and log files in `folder`."""

    def __init__(self, folder: Path, connect_port: int, bind: str | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.log = free_port(), folder / "tinyproxy.log"
        conf = folder / "tinyproxy.conf"
        conf.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 50\nLogLevel Connect\n"
            f'LogFile "{self.log}"\nPidFile "{folder / "tinyproxy.pid"}"\nAllow 127.0.0.1\n'
            f"BasicAuth {USER} {PASSWORD}\nConnectPort {connect_port}\n" + (f"Bind {bind}\n" if bind else "")
        )
        out = (folder / "tinyproxy.out").open("wb")
        self.proc = subprocess.Popen([TINYPROXY, "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
        out.close()

        def listening():
            assert self.proc.poll() is None, (folder / "tinyproxy.out").read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 10, "tinyproxy to listen", 0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _auth_file(folder: Path, text: str = f"{USER}:{PASSWORD}\n", mode: int = 0o600) -> Path:
    path = folder / "proxy.auth"
    path.write_text(text)
    path.chmod(mode)
    return path


def _site(tmp_path: Path, superlink: str, ca: Path, **network) -> Path:
    cfg = make_site(tmp_path / "sites", "hospP", network=network) if network else make_site(tmp_path / "sites", "hospP")
    cfg.write_text(cfg.read_text() + f"federation:\n  superlink: {superlink}\n  root_certificates: {ca}\n")
    return cfg


# --- configuration (no proxy process) --------------------------------------------------------------------------


def test_network_keys_parse_and_bad_values_name_the_key(tmp_path):
    auth = _auth_file(tmp_path)
    cfg = load_site_config(make_site(tmp_path, "a", network={"proxy": "http://proxy.hospital.local:3128",
                                                             "proxy_auth_file": auth, "no_proxy": "pacs.local,.lan"}))  # fmt: skip
    assert cfg.network.proxy == "http://proxy.hospital.local:3128" and cfg.network.proxy_auth_file == auth
    assert cfg.network.no_proxy == ("pacs.local", ".lan")
    assert load_site_config(make_site(tmp_path, "b")).network.proxy is None  # no section: the environment's route
    bad = {
        "http://user:hunter2@proxy:3128": "credentials do not belong in site.yaml",
        "https://proxy:3128": "expected http://HOST:PORT",
        "http://proxy": "expected http://HOST:PORT",
        "proxy:3128": "expected http://HOST:PORT",
    }
    for value, message in bad.items():
        with pytest.raises(ConfigError, match=r"key 'network.proxy'") as err:
            load_site_config(make_site(tmp_path, "c", network={"proxy": value}))
        assert message in str(err.value) and "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match=r"key 'network.proxy_auth_file': expected to be set together"):
        load_site_config(make_site(tmp_path, "d", network={"proxy_auth_file": auth}))
    with pytest.raises(ConfigError, match=r"key 'network.no_proxy'.*'http://x y'"):
        load_site_config(make_site(tmp_path, "e", network={"no_proxy": "a.lan,http://x y"}))


def test_proxy_auth_file_must_be_owner_only_and_one_user_password_line(tmp_path):
    cfg = load_site_config(make_site(tmp_path, "a", network={"proxy": "http://proxy:3128",
                                                             "proxy_auth_file": tmp_path / "proxy.auth"}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"'network.proxy_auth_file': .*proxy.auth not found"):
        cfg.network.proxy_credentials(cfg.file)
    _auth_file(tmp_path, mode=0o644)
    with pytest.raises(ConfigError, match=r"readable by others; run `chmod 600"):
        cfg.network.proxy_credentials(cfg.file)
    _auth_file(tmp_path, "hunter2\n")
    with pytest.raises(ConfigError, match=r"must hold one line `user:password`") as err:
        cfg.network.proxy_credentials(cfg.file)
    assert "hunter2" not in str(err.value)
    _auth_file(tmp_path, "user:pa:ss@w%rd\n")  # a password may hold any character; the first ':' ends the user
    assert cfg.network.proxy_credentials(cfg.file) == ("user", "pa:ss@w%rd")


def test_site_yaml_route_wins_over_the_environment_and_the_supernode_gets_it(tmp_path, monkeypatch):
    import httpx

    auth = _auth_file(tmp_path, "us er:pa:ss@w%rd/\n")
    monkeypatch.setenv("HTTPS_PROXY", "http://env-proxy:8080")
    monkeypatch.setenv("https_proxy", "http://env-proxy:8080")
    monkeypatch.setenv("NO_PROXY", "coordinator.example.org")
    monkeypatch.delenv("no_proxy", raising=False)
    plain = load_site_config(make_site(tmp_path, "a"))
    assert proxy_route(plain, "coordinator.example.org").url is None  # the environment's NO_PROXY
    assert proxy_route(plain, "other.example.org").url == "http://env-proxy:8080"
    assert "HTTPS_PROXY in the environment" in proxy_route(plain, "other.example.org").source
    cfg = load_site_config(make_site(tmp_path, "b", network={"proxy": "http://proxy.hospital:3128",
                                                             "proxy_auth_file": auth, "no_proxy": ".lan"}))  # fmt: skip
    route = proxy_route(cfg, "coordinator.example.org")  # network.no_proxy replaces NO_PROXY
    assert route.url == "http://proxy.hospital:3128" and route.auth == ("us er", "pa:ss@w%rd/")
    assert "pa:ss" not in repr(route) and "pa:ss" not in route.describe()
    assert proxy_route(cfg, "pacs.lan").url is None and proxy_route(cfg, "lan").url is not None  # subdomains only
    assert proxy_route(cfg, "127.0.0.1").url is None and proxy_route(cfg, "localhost").url is None
    # What `client` hands the SuperNode: the proxy without credentials, loopback direct; the SuperNode's own process
    # adds the credentials, percent-encoded so that httpx (its Fleet client) recovers them exactly.
    env = supernode_proxy_env(cfg)
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://proxy.hospital:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == ".lan,127.0.0.1,localhost,::1"
    assert "pa:ss" not in "".join(env.values())
    proxy = httpx.Proxy(supernode_proxy_env(cfg, with_credentials=True)["https_proxy"])
    assert proxy.auth == ("us er", "pa:ss@w%rd/") and str(proxy.url) == "http://proxy.hospital:3128"


# --- `client check` against a real proxy that refuses ----------------------------------------------------------


def _reachability(cfg_file: Path) -> str:
    verdicts = {v.what: v for v in check(load_site_config(cfg_file))}
    verdict = verdicts["reachability"]
    assert not verdict.ok and "certificate" not in verdicts
    return verdict.detail


@needs_tinyproxy
def test_check_fails_clearly_on_a_wrong_proxy(tmp_path):
    front_port = free_port()
    ca = make_certs(tmp_path / "certs")[0]
    proxy = Tinyproxy(tmp_path / "proxy", connect_port=front_port)
    try:
        auth = _auth_file(tmp_path, f"{USER}:not-the-password\n")
        detail = _reachability(_site(tmp_path, f"{FRONT_HOST}:{front_port}", ca, proxy=proxy.url, proxy_auth_file=auth))
        # tinyproxy answers wrong credentials with 401 (other proxies: 407); both are the credentials' fault
        assert f"proxy {proxy.url} rejected the credentials from {auth} (HTTP 401)" in detail, detail
        assert "not-the-password" not in detail
        detail = _reachability(_site(tmp_path, f"{FRONT_HOST}:{front_port}", ca, proxy=proxy.url))
        assert "requires authentication (HTTP 407)" in detail and "network.proxy_auth_file" in detail, detail
        auth = _auth_file(tmp_path)
        other = f"{FRONT_HOST}:{free_port()}"  # a port the proxy does not allow CONNECT to
        detail = _reachability(_site(tmp_path, other, ca, proxy=proxy.url, proxy_auth_file=auth))
        assert f"refused CONNECT to {other} (HTTP 403): ask the hospital's network team to allow" in detail, detail
    finally:
        proxy.stop()
    assert f"CONNECT {FRONT_HOST}:{front_port}" in proxy.log.read_text()
    nobody = f"http://127.0.0.1:{free_port()}"
    detail = _reachability(_site(tmp_path, f"{FRONT_HOST}:{front_port}", ca, proxy=nobody, proxy_auth_file=auth))
    assert f"proxy {nobody} refused the connection (nothing listens on" in detail and "network.proxy" in detail


# --- a site whose route is the proxy joins a run and trains ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
@needs_tinyproxy
def test_site_behind_an_authenticating_proxy_checks_joins_and_trains_a_round(tmp_path, monkeypatch):
    marker = uuid.uuid4().hex[:12]
    dep = Deployment(tmp_path / "deploy", marker, front_host=FRONT_HOST)
    proxy = Tinyproxy(tmp_path / "proxy", connect_port=dep.front_port, bind=PROXY_SOURCE)
    auth = _auth_file(tmp_path)
    try:
        dep.start_server()
        cfg = dep.add_site("hospP", n=12, network={"proxy": proxy.url, "proxy_auth_file": auth})
        env = dep.env("cli")
        res = subprocess.run([str(BIN / "client"), "check", "--config", str(cfg)], capture_output=True, text=True,
                             env=env, timeout=120)  # fmt: skip
        assert f"OK    reachability: coordinator reached through proxy {proxy.url} (CONNECT 200)" in res.stdout, (
            res.stdout + res.stderr
        )
        assert "OK    fleet API" in res.stdout and PASSWORD not in res.stdout + res.stderr
        for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        direct = cfg.with_name("direct.yaml")  # the same site without network.proxy: check says it went direct
        direct.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(cfg.read_text()).items() if k != "network"}))
        verdicts = {v.what: v for v in check(load_site_config(direct))}
        assert verdicts["reachability"].detail.startswith("coordinator reached directly: TLS handshake with "
                                                          f"{dep.front} succeeded"), verdicts["reachability"]  # fmt: skip
        dep.start_site("hospP")
        dep.wait_online(["hospP"], timeout=90)
        exp = dep.experiment("one_round", rounds=1, quorum={"min_sites": 1, "join_timeout_s": 10,
                                                            "round_timeout_s": 120})  # fmt: skip
        res = dep.server("run", exp, "--out", dep.coord_dir / "runs" / "one", timeout=240)
        assert "finished:completed" in res.stdout, res.stdout
        site_pids = pids_with(marker, "site-hospP")
        # The credentials are in no site process's command line or inherited environment, and in no log.
        for pid in site_pids:
            for part in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{part}", "rb") as fh:
                    assert PASSWORD.encode() not in fh.read(), (pid, part)
    finally:
        dep.close()
        proxy.stop()
    deadline = time.monotonic() + 40
    while (left := pids_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"
    fed = json.loads((dep.coord_dir / "runs" / "one" / "federation.json").read_text())
    assert [len(r["accepted"]) for r in fed["rounds"]] == [1]
    assert f"CONNECT {FRONT_HOST}:{dep.front_port} HTTP/1.1" in proxy.log.read_text()
    # Every request of the SuperNode's reached the front from the proxy's outgoing address: none went direct. The one
    # direct request is the probe of the check run without network.proxy.
    access = (dep.log_dir / "front-access.log").read_text().splitlines()
    via_proxy = "\n".join(line for line in access if line.startswith(PROXY_SOURCE + " "))
    direct = [line for line in access if not line.startswith(PROXY_SOURCE + " ")]
    assert len(direct) == 1 and '"POST /v1/fleet/get-run ' in direct[0], direct
    for path in ("activate-node", "pull-messages", "push-messages", "get-fab"):
        assert f"/v1/fleet/{path} " in via_proxy, path
    site_logs = (
        "".join(p.read_text(errors="replace") for p in cfg.parent.glob("*.log"))
        + (cfg.parent / "client.out").read_text()
    )
    assert f"reached through proxy {proxy.url}" in site_logs and PASSWORD not in site_logs
