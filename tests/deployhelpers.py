"""Real-process deployment helpers for tests and bench: certificates, a coordinator (`server`), sites (`client --site`).

Every process started here, and whatever it starts (SuperLink, SuperExec, ServerApp, nginx, SuperNode, ClientApp),
inherits `SPINEFED_TEST_MARKER=<marker>` and `SPINEFED_TEST_ROLE=<role>` in its environment, so that a role can be
killed as a whole (a site's machine lost, the coordinator crashed) and the test can prove nothing is left.
nginx rewrites its own environment for its process title, so it is also found by its prefix on the command line.

Sites run only app bundles they approved (client/approval.py): each site's site.yaml lists the hash of the bundle
`server run` will send, built from this checkout with Flower's deterministic builder, as the coordinator's
`server run --dry-run` computes it. Editing the app's code while a deployment is up therefore makes its sites refuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.processes import free_port
from tests.tinysites import make_site

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEST_MARKER, TEST_ROLE = "SPINEFED_TEST_MARKER", "SPINEFED_TEST_ROLE"


def make_certs(folder: Path, *names: str) -> tuple[Path, Path, Path]:
    """CA + front certificate (SANs 127.0.0.1, localhost and `names`) via deploy/make_certs.sh: (ca.crt, front.crt,
    front.key)."""
    subprocess.run(["bash", str(REPO / "deploy" / "make_certs.sh"), str(folder), *names, "--days", "2"], check=True,
                   capture_output=True)  # fmt: skip
    return folder / "ca.crt", folder / "front.crt", folder / "front.key"


def _nginx_of(marker: str, entry: Path, cmdline: bytes) -> bool:
    """An nginx process of this marker's front: the master names its prefix (which holds the marker) on its command
    line; a worker names nothing, but holds the front's log files (under the marker's coordinator folder) open."""
    if not cmdline.startswith(b"nginx"):
        return False
    if marker.encode() in cmdline:
        return True
    with contextlib.suppress(OSError):
        return any(marker in os.readlink(fd) for fd in (entry / "fd").iterdir())
    return False


def pids_with(marker: str, role: str | None = None) -> list[int]:
    """Live processes carrying the test marker (and role); the front's nginx processes found by `_nginx_of`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"{TEST_MARKER}={marker}".encode() in env
            and (role is None or f"{TEST_ROLE}={role}".encode() in env)
            or role in (None, "coordinator")
            and _nginx_of(marker, entry, cmdline)
        ):
            found.append(int(entry.name))
    return found


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in task.read_text().split()]
    return out


def kill_role(marker: str, role: str | None = None, sig: int = signal.SIGKILL) -> list[int]:
    """Kill the marked processes and their direct children: nginx workers carry no marker (nginx clears their
    environment), and a SIGKILLed master would leave them orphaned, as a crashed machine would not."""
    pids = pids_with(marker, role)
    pids += [c for pid in pids for c in _children(pid) if c not in pids]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def app_bundle_hash() -> str:
    """sha256 of the app bundle (FAB) that `server run` builds from this checkout (Flower's builder, deterministic)."""
    from client.approval import build_local_bundle, bundle_hash

    return bundle_hash(build_local_bundle(REPO))


def wait_for(cond, timeout: float, what: str, step: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Deployment:
    """One coordinator and N sites on 127.0.0.1, all through the real CLIs (`server`, `client`).

    front_host: the address the front listens on and the sites dial (another loopback address such as 127.0.0.2 is
    outside NO_PROXY's loopback defaults, so a site's proxy applies to it; its certificate gets a SAN for it)."""

    def __init__(self, root: Path, marker: str, front_host: str = "127.0.0.1"):
        self.root, self.marker, self.front_host = Path(root), marker, front_host
        self.root.mkdir(parents=True, exist_ok=True)
        extra_san = () if front_host in ("127.0.0.1", "localhost") else (front_host,)
        self.ca, crt, key = make_certs(self.root / "certs", *extra_san)
        # The marker in the state path lets the nginx master be found by its command line (`-p <state>/front`).
        self.coord_dir = self.root / f"coordinator-{marker}"
        self.coord_dir.mkdir()
        self.front_port, self.link_port = free_port(), free_port()
        self.config = self.coord_dir / "coordinator.yaml"
        self.config.write_text(
            f"name: test\nsuperlink:\n  port: {self.link_port}\nfront:\n  host: {front_host}\n  port: {self.front_port}\n"
            f"  certificate: {crt}\n  key: {key}\n"
        )
        self.server_proc: subprocess.Popen | None = None
        self.bundle_sha256 = app_bundle_hash()
        self.sites: dict[str, Path] = {}
        self._site_yaml: dict[str, str] = {}  # each site's site.yaml without its federation section
        self.site_procs: dict[str, subprocess.Popen] = {}

    @property
    def front(self) -> str:
        return f"{self.front_host}:{self.front_port}"

    @property
    def log_dir(self) -> Path:
        return self.coord_dir / "logs"

    def env(self, role: str) -> dict:
        return {**os.environ, TEST_MARKER: self.marker, TEST_ROLE: role, "PYTHONUNBUFFERED": "1"}

    # --- coordinator ---
    def start_server(self, timeout: float = 90) -> None:
        out = (self.coord_dir / "server.out").open("ab")
        self.server_proc = subprocess.Popen([str(BIN / "server"), "--config", str(self.config)], cwd=self.coord_dir,
                                            env=self.env("coordinator"), stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        out.close()
        pid_file = self.coord_dir / "state" / "server.pid"

        def ready():
            assert self.server_proc.poll() is None, (self.coord_dir / "server.out").read_text()[-2000:]
            return pid_file.is_file()

        wait_for(ready, timeout, "the coordinator to start", 0.5)

    def server(self, *args, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([str(BIN / "server"), *map(str, args), "--config", str(self.config)], cwd=self.coord_dir,
                             env=self.env("cli"), capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if check:
            assert res.returncode == 0, f"server {args}: {res.stdout}\n{res.stderr}"
        return res

    def stop_server(self) -> int | None:
        proc, self.server_proc = self.server_proc, None
        if proc is None:
            return None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def crash_server(self) -> None:
        """The coordinator's machine dies: SIGKILL to every coordinator process (detached ones included)."""
        if self.server_proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server_proc.pid, signal.SIGKILL)
            self.server_proc.wait()
            self.server_proc = None
        kill_role(self.marker, "coordinator")
        time.sleep(1.0)
        kill_role(self.marker, "coordinator")
        (self.coord_dir / "state" / "server.pid").unlink(missing_ok=True)

    def site_states(self) -> dict[str, str]:
        res = self.server("status", check=False, timeout=120)
        states = {}
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in self.sites:
                states[parts[0]] = parts[1]
        return states

    def wait_online(self, names, timeout: float = 120) -> None:
        wait_for(lambda: all(self.site_states().get(n) == "online" for n in names), timeout,
                 f"sites {sorted(names)} online", step=3.0)  # fmt: skip

    # --- sites ---
    def add_site(self, name: str, n: int = 12, seed: int = 0, register: bool = True, **extra) -> Path:
        """A site that approves this checkout's app bundle (see the module docstring); `extra`: more site.yaml
        sections (tests/tinysites.py `make_site`), e.g. network={"proxy": ...}."""
        cfg = make_site(self.root / "sites", name, n=n, seed=seed, **extra)
        self._site_yaml[name] = cfg.read_text() + "audit_log: audit.jsonl\n"
        self.sites[name] = cfg
        self.approve(name, [self.bundle_sha256])
        res = subprocess.run([str(BIN / "client"), "keygen", "--config", str(cfg)], capture_output=True, text=True,
                             env=self.env(f"site-{name}"))  # fmt: skip
        assert res.returncode == 0, res.stderr
        if register:
            self.server("register-site", name, cfg.parent / "supernode.key.pub")
        return cfg

    def approve(self, name: str, hashes: list[str]) -> None:
        """Set the site's federation.approved_apps (atomic: the launcher re-reads site.yaml for every message)."""
        listed = "".join(f'\n    - "{h}"' for h in hashes) or " []"
        text = self._site_yaml[name] + (f"federation:\n  superlink: {self.front}\n  root_certificates: {self.ca}\n"
                                        f"  approved_apps:{listed}\n")  # fmt: skip
        cfg = self.sites[name]
        tmp = cfg.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, cfg)

    def start_site(self, name: str) -> subprocess.Popen:
        cfg = self.sites[name]
        out = (cfg.parent / "client.out").open("ab")
        proc = subprocess.Popen([str(BIN / "client"), "--site", name, "--config", str(cfg)], env=self.env(f"site-{name}"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        out.close()
        self.site_procs[name] = proc
        return proc

    def kill_site(self, name: str) -> None:
        """The site's machine dies: SIGKILL to `client`, its SuperNode and any ClientApp."""
        kill_role(self.marker, f"site-{name}")
        proc = self.site_procs.pop(name, None)
        if proc is not None:
            proc.wait(timeout=10)

    def stop_sites(self) -> None:
        for name in list(self.site_procs):
            proc = self.site_procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    kill_role(self.marker, f"site-{name}")

    def close(self) -> list[int]:
        """Stop everything; returns ids that were still alive afterwards and had to be killed."""
        self.stop_sites()
        self.stop_server()
        time.sleep(1.0)
        late = kill_role(self.marker)
        return late

    def experiment(self, name: str, **plan) -> Path:
        from tests.tinysites import TINY_MODEL, TINY_TRAIN

        data = {"rounds": 2, "evaluate": "final", "model": TINY_MODEL, "train": TINY_TRAIN}
        data["quorum"] = {"min_sites": 2, "join_timeout_s": 10, "round_timeout_s": 240}
        data.update(plan)
        path = self.coord_dir / f"{name}.yaml"
        path.write_text(json.dumps(data))  # JSON is YAML
        return path
