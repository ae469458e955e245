"""`server`: the coordinator side.

server --config coordinator.yaml                   start the SuperLink (127.0.0.1) and its TLS front (Fleet API only);
                                                   foreground; Ctrl-C / SIGTERM stops both cleanly
server register-site NAME KEY.pub                  register a site's public key (made by `client keygen` at the site)
server revoke-site NAME                            unregister the site's node at the SuperLink; its key stays refused
server run experiment.yaml [--resume] [--dry-run]  run an experiment on the connected sites, follow it, check its status;
                                                   --dry-run: ask every site whether it is ready, train nothing
server status                                      connected sites by name, recent runs
server cancel [RUN_ID]                             stop a run (default: the one running)

Every subcommand takes --config, before or after its name (default: $SPINEFED_COORDINATOR or ./coordinator.yaml).
The subcommands talk to the local Control API only (127.0.0.1), with a project-owned FLWR_HOME inside the state
folder; run them on the coordinator's machine while `server` is running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from common import umask
from common.cli import Command, CommandLine
from common.errors import SpineFedError, run_command
from server import flwrctl
from server.coordinator import (
    CONNECTION,
    CoordinatorConfig,
    SiteRegistry,
    ensure_state,
    key_fingerprint,
    load_coordinator_config,
)

log = logging.getLogger("spinefed.server")
APP_DIR = (
    Path(__file__).resolve().parent.parent
)  # the Flower app (pyproject.toml [tool.flwr.app]) that `flwr run` ships


class Shutdown(Exception):
    """SIGTERM/SIGINT received by the foreground `server`."""


def _config(args) -> CoordinatorConfig:
    path = getattr(args, "config", None) or os.environ.get("SPINEFED_COORDINATOR") or "coordinator.yaml"
    return load_coordinator_config(path)


def _env(cfg: CoordinatorConfig, marker: str | None = None) -> dict:
    flwrctl.write_connection(cfg.flwr_home, CONNECTION, cfg.local_address, cfg.state_dir / "loopback" / "ca.crt")
    return flwrctl.flwr_env(cfg.flwr_home, marker)


def _running_pid(cfg: CoordinatorConfig) -> int | None:
    try:
        pid = int(cfg.pid_file.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _require_running(cfg: CoordinatorConfig) -> dict:
    env = _env(cfg)
    if _running_pid(cfg) is None:
        raise SpineFedError(f"the coordinator is not running (start it with `server --config {cfg.file}`)")
    return env


def cmd_start(args) -> int:
    from server.front import Front
    from server.superlink import SuperLink

    cfg = _config(args)
    ensure_state(cfg)
    # A state, log or runs folder left group/world-readable by an earlier start under a looser umask (the database
    # holds every site's updates, runs/ the final arrays). The front's traversal-only folders (0711) stay as they are.
    traverse = [cfg.state_dir, cfg.state_dir / "front", cfg.state_dir / "front" / "temp"]
    fixed = umask.tighten([cfg.state_dir, cfg.log_dir, cfg.runs_dir], allow=traverse)
    if os.geteuid() == 0:
        # nginx's workers (www-data) must traverse to their own temp folders below state/front/temp/ (server/front.py
        # chmods state/ and state/front/ to 0711 and chowns the leaves); under umask 077 the `temp` folder between
        # them would be root's 0700. Traverse only: nothing here can be listed or read by the workers.
        (cfg.state_dir / "front" / "temp").mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.state_dir / "front" / "temp", 0o711)
    pid = _running_pid(cfg)
    if pid is not None:
        raise SpineFedError(f"a coordinator is already running from {cfg.state_dir} (pid {pid})")
    logging.basicConfig(
        filename=cfg.log_dir / "server.log", level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    if fixed:
        log.warning(
            "made %d file(s)/folder(s) owner-only that an earlier start had left readable to others", len(fixed)
        )
    marker = f"coordinator-{uuid.uuid4().hex}"
    env = _env(cfg, marker)
    front = Front(
        nginx=cfg.nginx,
        prefix=cfg.state_dir / "front",
        log_dir=cfg.log_dir,
        listen_host=cfg.front_host,
        listen_port=cfg.front_port,
        certificate=cfg.certificate,
        key=cfg.key,
        upstream_port=cfg.superlink_port,
        upstream_ca=cfg.state_dir / "loopback" / "ca.crt",
    )
    link = SuperLink(cfg, env)

    def on_signal(signum, frame):
        raise Shutdown(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code, reason = 0, "stopped"
    try:
        link.start()
        front.start()
        probe = "127.0.0.1" if cfg.front_host in ("0.0.0.0", "::", "[::]") else cfg.front_host.strip("[]")
        flwrctl.wait_port(probe, cfg.front_port, front.proc, timeout=20, what="nginx (the TLS front)")
        cfg.pid_file.write_text(str(os.getpid()))
        log.info("started: superlink 127.0.0.1:%d, front %s:%d", cfg.superlink_port, cfg.front_host, cfg.front_port)
        print(
            f"server: SuperLink on {cfg.local_address} (loopback only); sites connect to "
            f"{cfg.front_host}:{cfg.front_port} (TLS, Fleet API only); logs in {cfg.log_dir}",
            flush=True,
        )
        while True:
            if not link.alive():
                code, reason = 1, "the SuperLink exited; see superlink.log"
                break
            if front.proc is not None and front.proc.poll() is not None:
                code, reason = 1, "nginx exited; see front-error.log"
                break
            time.sleep(1.0)
    except Shutdown as sig:
        reason = f"stopped by {sig}"
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        front.stop()
        link.stop()
        late = flwrctl.stop(None, marker)  # ServerApp processes SuperExec started, if a run was going on
        cfg.pid_file.unlink(missing_ok=True)
        log.info("%s (late processes ended: %s)", reason, late)
    print(f"server: {reason}", file=sys.stderr if code else sys.stdout)
    return code


def cmd_register(args) -> int:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    cfg = _config(args)
    env = _require_running(cfg)
    try:
        text = Path(args.key).read_bytes()
        key = load_ssh_public_key(text)
    except OSError as exc:
        raise SpineFedError(f"{args.key}: cannot read ({exc.strerror})") from None
    except (ValueError, TypeError):
        raise SpineFedError(
            f"{args.key}: not an OpenSSH public key (send the .pub that `client keygen` printed)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SpineFedError(f"{args.key}: not an EC key; sites make ECDSA P-384 keys with `client keygen`")
    registry = SiteRegistry(cfg.registry_file)
    fingerprint = key_fingerprint(text)
    registry.check_new(args.name, fingerprint)
    out = flwrctl.flwr("supernode", "register", Path(args.key).resolve(), CONNECTION, "--name", args.name,
                       "--format", "json", env=env)  # fmt: skip
    node_id = flwrctl.json_tail(out).get("node-id")
    if not node_id:
        raise SpineFedError("the SuperLink did not return a node id; see superlink.log")
    registry.add(args.name, int(node_id), fingerprint)
    print(f"registered site {args.name}: node {node_id}, key sha256 {fingerprint[:16]}…")
    return 0


def cmd_revoke(args) -> int:
    cfg = _config(args)
    env = _require_running(cfg)
    registry = SiteRegistry(cfg.registry_file)
    info = registry.active().get(args.name)
    if info is None:
        registry.revoke(args.name)  # raises the right message: unknown or already revoked
    # The SuperLink first: if it fails, the register still says the site is active, which is what is true.
    flwrctl.flwr("supernode", "unregister", str(info["node_id"]), CONNECTION, "--format", "json", env=env)
    registry.revoke(args.name)
    log.info("revoked site %s (node %s)", args.name, info["node_id"])
    print(f"revoked site {args.name}: node {info['node_id']} unregistered at the SuperLink; its key "
          f"(sha256 {info['key_sha256'][:16]}…) cannot be registered again")  # fmt: skip
    return 0


def _nodes(env: dict) -> list[dict]:
    return flwrctl.json_tail(flwrctl.flwr("supernode", "list", CONNECTION, "--format", "json", env=env)).get(
        "nodes", []
    )


def site_states(cfg: CoordinatorConfig, env: dict) -> dict[str, str]:
    """Registered site name → the SuperLink's node status (online, offline, registered, ...)."""
    status = {int(n["node-id"]): n["status"] for n in _nodes(env)}
    return {
        name: "revoked" if info.get("revoked_at") else status.get(int(info["node_id"]), "unknown")
        for name, info in SiteRegistry(cfg.registry_file).load().items()
    }


def cmd_status(args) -> int:
    cfg = _config(args)
    env = _require_running(cfg)
    states = site_states(cfg, env)
    online = sum(s == "online" for s in states.values())
    print(f"coordinator {cfg.name}: {online} of {len(states)} registered site(s) connected")
    for name, state in sorted(states.items()):
        print(f"  {name:24s} {state}")
    runs = flwrctl.json_tail(flwrctl.flwr("list", CONNECTION, "--format", "json", env=env)).get("runs", [])
    for run in runs[-5:]:
        print(f"  run {run.get('run-id')}: {run.get('status')}")
    return 0


def cmd_cancel(args) -> int:
    cfg = _config(args)
    env = _require_running(cfg)
    run_id = args.run_id
    if run_id is None:
        runs = flwrctl.json_tail(flwrctl.flwr("list", CONNECTION, "--format", "json", env=env)).get("runs", [])
        active = [r for r in runs if not str(r.get("status", "")).startswith("finished")]
        if not active:
            print("no run is going on")
            return 0
        run_id = active[-1]["run-id"]
    flwrctl.flwr("stop", str(run_id), CONNECTION, env=env)
    print(f"run {run_id}: stop requested")
    return 0


def dry_run(args, cfg: CoordinatorConfig, exp, env: dict, registry: dict, states: dict) -> int:
    """`server run --dry-run`: the review package, then a census-only run that asks every connected site whether it
    is ready (server/readiness.py); one row per site; exit 0 when at least the quorum is ready."""
    from server import readiness

    folder = (args.out or cfg.runs_dir / Path(args.experiment).stem).resolve()
    package, digest = readiness.review_package(args.app.resolve(), Path(args.experiment), folder / "review")
    version = readiness.app_version(args.app.resolve())
    print(f"app bundle sha256 {digest} (spinefed {version}); review package for the sites: {package}")
    print(f"  each site approves it by adding `- {digest}` under federation.approved_apps in its site.yaml, after "
          "`client review --fab app.fab --experiment experiment.yaml --config site.yaml`")  # fmt: skip
    online = [n for n, s in states.items() if s == "online"]
    result = None
    if online:
        result = _readiness_run(args, env, folder / "readiness", len(online))
    rows = [readiness.site_row(name, states.get(name, "unknown"), int(info["node_id"]), result, version)
            for name, info in sorted(registry.items())]  # fmt: skip
    for line in readiness.render(rows):
        print(line)
    ready = sum(r["ready"] for r in rows)
    ok = ready >= exp.quorum.min_sites
    print(f"dry run: {ready} of {len(rows)} site(s) ready (connected, bundle approved, same release, data prepared); "
          f"quorum {exp.quorum.min_sites}: {'ready' if ok else 'NOT ready'}")  # fmt: skip
    return 0 if ok else 1


def _readiness_run(args, env: dict, out: Path, expected: int) -> dict | None:
    """Submit the census-only run and wait for its readiness.json (None if the run failed; the reason is printed)."""
    from server import readiness

    request = readiness.write_request(out, expected, args.deadline)
    result_file = out / readiness.RESULT
    result_file.unlink(missing_ok=True)
    run_cfg = {"experiment": str(request), "out-dir": str(out), "expected-sites": expected}
    run_id = flwrctl.start_run(args.app.resolve(), CONNECTION, run_cfg, env)
    print(f"readiness run {run_id}: asking {expected} connected site(s), {args.deadline:g} s to answer", flush=True)
    status, details = flwrctl.follow_run(run_id, CONNECTION, env, time.monotonic() + args.deadline + 180,
                                         done_hint=result_file.is_file)  # fmt: skip
    if status != flwrctl.COMPLETED or not result_file.is_file():
        print(f"readiness run {run_id}: {status}{': ' + details if details else ''}", file=sys.stderr)
        return None
    return json.loads(result_file.read_text())


def cmd_run(args) -> int:
    from server.experiment import load_experiment

    cfg = _config(args)
    exp = load_experiment(args.experiment)
    env = _require_running(cfg)
    registry = SiteRegistry(cfg.registry_file).active()
    states = {n: s for n, s in site_states(cfg, env).items() if n in registry}
    online = sorted(name for name, s in states.items() if s == "online")
    if args.dry_run:
        return dry_run(args, cfg, exp, env, registry, states)
    out = (args.out or cfg.runs_dir / Path(args.experiment).stem).resolve()
    has_checkpoint = (out / "checkpoint").exists()
    if has_checkpoint and not args.resume:
        raise SpineFedError(f"{out} holds a checkpoint: continue it with --resume, or choose another --out")
    if args.resume and not has_checkpoint:
        raise SpineFedError(f"{out}: no checkpoint to resume; run without --resume")
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = {
        "experiment": str(Path(args.experiment).resolve()),
        "out-dir": str(out),
        "resume": bool(args.resume),
        "expected-sites": len(registry),
    }
    run_id = flwrctl.start_run(args.app.resolve(), CONNECTION, run_cfg, env)
    print(f"run {run_id} started: {exp.rounds} round(s), {len(online)} of {len(registry)} site(s) connected; "
          f"results in {out}", flush=True)  # fmt: skip
    shown = 0

    def progress() -> None:
        nonlocal shown
        shown = flwrctl.show_rounds(out / "rounds.csv", shown)

    started = time.time()

    def finished_file() -> bool:
        fed = out / "federation.json"
        return fed.is_file() and fed.stat().st_mtime >= started

    status, details = flwrctl.follow_run(
        run_id, CONNECTION, env, time.monotonic() + args.timeout, on_tick=progress, done_hint=finished_file
    )
    with contextlib.suppress(SpineFedError, OSError):
        (out / f"run-{run_id}.log").write_text(flwrctl.flwr("log", str(run_id), CONNECTION, env=env, timeout=60))
    if status != flwrctl.COMPLETED:
        print(f"run {run_id}: {status}{': ' + details if details else ''}; ServerApp log: {out / f'run-{run_id}.log'}",
              file=sys.stderr)  # fmt: skip
        return 1
    reports = sorted(p.name for p in out.glob("report*"))
    print(f"run {run_id}: {status}; results: {out / 'federation.json'}, {out / 'rounds.csv'}"
          + (f", report: {', '.join(str(out / r) for r in reports)}" if reports else ""))  # fmt: skip
    return 0


def _register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the site's name (its site.yaml `site`)")
    p.add_argument("key", type=Path, help="the site's public key (OpenSSH .pub from `client keygen`)")


def _revoke_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the site's registered name")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", type=Path, help="experiment.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only check readiness: write the app bundle (hash + file) the sites must approve, then ask every "
        "connected site (census only) whether it approved it, runs the same release and has data; one row per site",
    )
    p.add_argument("--deadline", type=float, default=120.0,
                   help="with --dry-run: seconds the sites have to answer (default 120)")  # fmt: skip
    p.add_argument("--out", type=Path, help="output folder (default: runs_dir/<experiment file name>)")
    p.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="stop the run after this many seconds")
    p.add_argument("--app", type=Path, default=APP_DIR, help=argparse.SUPPRESS)


def _cancel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id", nargs="?", type=int, help="run id (see `server status`)")


def _no_arguments(p: argparse.ArgumentParser) -> None:
    pass


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, help="coordinator.yaml (default: $SPINEFED_COORDINATOR or ./coordinator.yaml)"
    )


COMMANDS = [
    Command("register-site", "register a site's public key under its name", _register_arguments, cmd_register),
    Command("revoke-site", "unregister a site's node; its key cannot return", _revoke_arguments, cmd_revoke),
    Command("run", "run an experiment on the connected sites and follow it", _run_arguments, cmd_run),
    Command("status", "registered sites and whether they are connected; recent runs", _no_arguments, cmd_status),
    Command("cancel", "stop a run (default: the one going on)", _cancel_arguments, cmd_cancel),
]


def command_line() -> CommandLine:
    return CommandLine(
        "server",
        COMMANDS,
        _shared,
        description="Coordinator of the federated spine-MRI fracture classifier. Without a subcommand: start the "
        "SuperLink on 127.0.0.1 and the nginx TLS front that exposes only the Fleet API to the sites; runs in the "
        "foreground until Ctrl-C or SIGTERM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )


def main(argv: list[str] | None = None) -> int:
    # Owner-only by construction: everything `server` and its children (SuperLink, SuperExec, nginx) create is
    # 0600/0700 whatever the shell's umask (common/umask.py; exceptions documented in server/front.py).
    umask.owner_only()
    cli = command_line()
    args = cli.parse(argv)
    return run_command(cli.run_of(args) or cmd_start, args)


if __name__ == "__main__":
    sys.exit(main())
