"""Processes that Flower starts: their environment, a marker to find them, and ending them by id.

Pure standard library (no flwr import), so that both sides use it: the coordinator (server/flwrctl.py, which
re-exports these) and the site's SuperNode launcher (client/node.py). Rules:
- every Flower process gets a project-owned FLWR_HOME (never the user's ~/.flwr), telemetry, update checks and
  runtime dependency installation off, and NO_PROXY for loopback (Flower's httpx honours HTTPS_PROXY; the local
  Control and Runtime APIs must not go through a site's proxy);
- every process started carries a marker in its environment, so whatever Flower spawns below it, detached into its
  own session (SuperExec, ServerApp, ClientApp, Ray workers), can be found and ended by id afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
MARKER = "SPINEFED_SIM_RUN"  # historical name (simulate run introduced it); any spinefed-started Flower process


def flwr_env(home: Path | None, marker: str | None = None, base: dict | None = None) -> dict:
    """Environment for Flower processes (see module docstring). The venv's bin goes first on PATH because the
    SuperLink and SuperNode launch `flower-superexec` by name."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    no_proxy = {p for p in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if p}
    env["NO_PROXY"] = env["no_proxy"] = ",".join(sorted(no_proxy | {"127.0.0.1", "localhost", "::1"}))
    if home is not None:
        env["FLWR_HOME"] = str(home)
    if marker:
        env[MARKER] = marker
    return env


def free_port() -> int:
    """A free TCP port on loopback (racy by nature; Flower binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked(marker: str) -> list[int]:
    """Ids of live processes whose environment carries this marker (only this user's are readable)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def children(pid: int) -> list[int]:
    """Direct children of a live process (Linux /proc; empty elsewhere or once it has gone)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            out += [int(c) for c in task.read_text().split()]
    return out


def _start_time(pid: int) -> str | None:
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return None


def identify(pids) -> dict[int, str]:
    """pid → start time: lets a later kill spare a process that has since exited and had its id reused."""
    return {pid: t for pid in pids if (t := _start_time(pid)) is not None}


def kill_same(ids: dict[int, str], sig: int = signal.SIGKILL) -> None:
    """Signal the processes of `identify(...)` that are still the same processes."""
    for pid, started in ids.items():
        if _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def stop_group(proc: subprocess.Popen | None, grace_s: float = 15.0) -> None:
    """SIGTERM the process group a `start_new_session` child leads, SIGKILL it after `grace_s`."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    # Children of a group leader that already exited may still hold the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def stop(proc: subprocess.Popen | None, marker: str) -> list[int]:
    """Stop a process group, then anything else carrying `marker`; returns ids that had to be ended late."""
    stop_group(proc)
    late: list[int] = []
    for attempt in range(20):
        pids = marked(marker)
        if not pids:
            break
        late = sorted(set(late) | set(pids))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if attempt < 10 else signal.SIGKILL)
        time.sleep(0.5)
    return late
