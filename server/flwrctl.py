"""Driving Flower's own processes and CLI from Python: `flwr` calls, run status, process start-up and clean-up.

Shared by `simulate run` (simulations/run.py), `server` (server/cli.py), the SuperNode launcher and the tests, so that
the hygiene rules live in one place:
- environment, markers and process clean-up: common/processes.py (re-exported here; the site's launcher uses them
  too, and client/ must not import server/);
- `flwr run` exits 0 even when the run failed: the final status comes from `flwr list --run-id ... --format json`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from common.errors import SpineFedError
from common.processes import BIN, MARKER, flwr_env, free_port, marked, stop, stop_group  # noqa: F401  (re-exported)

COMPLETED = "finished:completed"


def write_connection(home: Path, name: str, address: str, root_certificates: Path | None = None) -> Path:
    """Write FLWR_HOME/config.toml with one connection (the default); plain HTTP unless a CA is given."""
    home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{root_certificates}"\n' if root_certificates else "insecure = true\n"
    path = home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{tls}')
    return path


def flwr(*argv, env: dict, cwd: Path | None = None, timeout: float = 120) -> str:
    """Run the `flwr` CLI; its stdout, or SpineFedError with the tail of what it said."""
    res = subprocess.run(
        [str(BIN / "flwr"), *map(str, argv)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if res.returncode != 0:
        raise SpineFedError(f"flwr {argv[0]} failed: {(res.stderr or res.stdout).strip()[-500:]}")
    if "--format" in argv and json_tail(res.stdout).get("success") is False:  # exit code 0, JSON says it failed
        message = " ".join(str(json_tail(res.stdout).get("error-message", "")).split())
        raise SpineFedError(f"flwr {argv[0]} failed: {message[-500:]}")
    return res.stdout


def json_tail(text: str) -> dict:
    """The JSON object that `flwr ... --format json` prints after any banner lines."""
    start = text.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return {}


def run_status(run_id: int | str, connection: str, env: dict) -> tuple[str, str]:
    """(status, status details) of one run, e.g. ('finished:completed', ''); ('unknown', '') if not listed."""
    runs = json_tail(flwr("list", connection, "--run-id", str(run_id), "--format", "json", env=env)).get("runs", [])
    if not runs:
        return "unknown", ""
    return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", "") or "")


def start_run(app_dir: Path, connection: str, run_config: dict, env: dict, extra: list[str] | None = None) -> int:
    """`flwr run` the app folder with these run-config values (JSON-quoted); returns the run id."""
    argv: list[str] = ["run", str(app_dir), connection, "--format", "json"]
    for key, value in run_config.items():
        argv += ["--run-config", f"{key}={json.dumps(value)}"]
    argv += extra or []
    run_id = json_tail(flwr(*argv, env=env, cwd=app_dir)).get("run-id")
    if not run_id:
        raise SpineFedError("flwr run did not return a run id (see the SuperLink's log)")
    return int(run_id)


def show_rounds(csv_path: Path, shown: int) -> int:
    """Print the rows of a run's rounds.csv not shown yet, one line per finished round (the one progress format of
    `server run` and `simulate run`); returns how many rows are shown now."""
    if not csv_path.is_file():
        return shown
    lines = csv_path.read_text().strip().splitlines()
    for line in lines[1 + shown :]:
        cells = dict(zip(lines[0].split(","), line.split(","), strict=False))
        auc = f", pooled AUC {cells['eval_pooled_auc']}" if cells.get("eval_pooled_auc") else ""
        print(f"  round {cells['round']}: {cells['sites_ok']}/{cells['sites_sent']} sites ok, "
              f"loss {cells['train_loss'] or '-'}{auc}, {cells['seconds']} s", flush=True)  # fmt: skip
    return max(shown, len(lines) - 1)


def follow_run(
    run_id: int,
    connection: str,
    env: dict,
    deadline: float,
    on_tick: Callable[[], None] | None = None,
    done_hint: Callable[[], bool] | None = None,
    poll_s: float = 5.0,
    unreachable_s: float = 30.0,
) -> tuple[str, str]:
    """Poll until the run finishes or `deadline` (monotonic) passes; (status, details); 'timed out' stops the run.

    Each `flwr list` is a Python process (~0.9 s CPU): poll every `poll_s`, or at once when `done_hint()` says the
    ServerApp has written its last file; `on_tick` (e.g. progress from rounds.csv) runs every second in between.
    """
    last, unreachable_since = 0.0, None
    while True:
        if on_tick:
            on_tick()
        if time.monotonic() - last >= poll_s or (done_hint is not None and done_hint()):
            last = time.monotonic()
            try:
                status, details = run_status(run_id, connection, env)
                unreachable_since = None
            except SpineFedError:
                # A SuperLink restart is survivable; one that stays away is not (a run needs its ServerApp).
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > unreachable_s:
                    raise SpineFedError(
                        f"the SuperLink has been unreachable for {unreachable_s:.0f} s; run {run_id} is lost "
                        "(start the coordinator again and continue with `server run ... --resume`)"
                    ) from None
                status = details = ""
            if status.startswith("finished"):
                if on_tick:
                    on_tick()
                return status, details
        if time.monotonic() > deadline:
            with contextlib.suppress(SpineFedError, subprocess.TimeoutExpired):
                flwr("stop", str(run_id), connection, env=env)
            return "timed out", ""
        time.sleep(1.0)


def wait_healthy(
    port: int, proc: subprocess.Popen, timeout: float = 60.0, what: str = "the SuperLink", ca: Path | None = None
) -> None:
    """Wait for a SuperLink on loopback to answer /health (HTTPS verified with `ca` if given; raises if it exits or
    stays silent)."""
    deadline = time.monotonic() + timeout
    handlers: list = [urllib.request.ProxyHandler({})]  # loopback: never via a proxy
    if ca is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca))))
    opener = urllib.request.build_opener(*handlers)
    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SpineFedError(f"{what} exited at start-up (code {proc.returncode}); see its log")
        try:
            with opener.open(url, timeout=1) as res:
                if res.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SpineFedError(f"{what} did not become ready within {timeout:.0f} s")


def wait_port(
    host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0, what: str = ""
) -> None:
    """Wait until host:port accepts TCP connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SpineFedError(f"{what or 'the process'} exited at start-up (code {proc.returncode}); see its log")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise SpineFedError(f"{what or f'{host}:{port}'} did not open its port within {timeout:.0f} s")
