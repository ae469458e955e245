"""The site's own ClientApp launcher: Flower's SuperExec and `flwr-clientapp`, with the approval check in between.

Flower 1.42 under `flower-supernode --isolation process`: the SuperNode only stores messages and the run's FAB; a
separate `flower-superexec` polls the SuperNode's Runtime API for tasks and starts one `flwr-clientapp` process per
task (the command name comes from `flwr.supercore.constant.TASK_TYPE_TO_COMMAND`). That process pulls the message,
the run and the FAB bytes, then calls `install_from_fab` (unzip under FLWR_HOME) and imports the app from there.

This module runs these steps from the site's installed code:
- `supernode` (run by client/node.py) is Flower's `flower-supernode`, polling the coordinator every second instead of
  every 3 s while idle;
- `superexec` (run by client/node.py) is Flower's SuperExec whose ClientApp tasks are forked from a warm process that
  has already imported the app (client/warmstart.py), or, if that is unavailable, started through a small shim that
  runs `clientapp` below instead of `flwr-clientapp` from PATH;
- `clientapp` is Flower's `flwr-clientapp` with `install_from_fab` wrapped: the bundle's bytes go through
  client/approval.py first, so a bundle that is not approved, or whose version differs from the installed release,
  is never unpacked or imported. Flower turns the refusal into an Error reply, so the coordinator sees why
  (hashes and versions only). Every run the site sees is recorded for `client review RUN` (client/review.py).

The site config comes from SPINEFED_SITE_CONFIG in the environment (set by client/node.py), read afresh for every
task, so a hash added to approved_apps takes effect without a restart. Without it, or with an empty approved_apps,
every bundle is refused.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import stat
import sys
import time
from pathlib import Path

ENV_CONFIG = "SPINEFED_SITE_CONFIG"
log = logging.getLogger("spinefed.site.launcher")


def review_dir(cache: Path) -> Path:
    """Where the launcher records the runs and bundles this site has seen (beside the cache, site-local)."""
    return cache.parent / f"{cache.name}-review"


def record_run(folder: Path, run, fab: bytes, verdict: str) -> Path:
    """Keep the bundle (by hash) and what the site knows of the run, so `client review RUN` can show it later."""
    from client.approval import bundle_hash

    digest = bundle_hash(fab)
    bundles = folder / "bundles"
    bundles.mkdir(parents=True, exist_ok=True)
    fab_file = bundles / f"{digest}.fab"
    if not fab_file.exists():
        fab_file.write_bytes(fab)
    info = {
        "run_id": int(run.run_id),
        "fab_id": run.fab_id,
        "fab_version": run.fab_version,
        "fab_hash": digest,
        "run_config": {k: v for k, v in dict(run.override_config).items()},
        "verdict": verdict,
        "seen_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = folder / "runs" / f"{int(run.run_id)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
    return out


def approve_or_refuse(fab: bytes, run=None, config_path: str | None = None):
    """The gate: load the site config, check the bundle, record the run; raises NotApproved on refusal.

    The refusal's message goes to the coordinator (hashes, versions, the key to set; no paths); the site's own log
    also names its site.yaml, so site IT knows which file to edit."""
    from client.approval import NotApproved, check_bundle
    from common.config import load_site_config
    from common.errors import SpineFedError

    config_path = config_path or os.environ.get(ENV_CONFIG)
    if not config_path:
        raise NotApproved(f"the site launcher has no site configuration ({ENV_CONFIG} unset); refusing every bundle")
    try:
        cfg = load_site_config(config_path)
    except SpineFedError:
        raise NotApproved("the site configuration cannot be read; refusing every bundle") from None
    run_id = int(run.run_id) if run is not None else None
    verdict = "approved"
    try:
        return check_bundle(fab, cfg.federation.approved_apps, run_id=run_id)
    except NotApproved as exc:
        verdict = f"refused: {exc}"
        log.warning("site %s refused run %s: %s (site config: %s)", cfg.site, run_id, exc, cfg.file)
        raise
    finally:
        if run is not None:
            try:
                record_run(review_dir(cfg.cache), run, fab, verdict)
            except OSError as exc:  # the record helps review; it must not decide the verdict
                log.warning("could not record run %s for review: %s", run_id, exc)


def install_gate(rc) -> None:
    """Wrap `rc.install_from_fab` (rc: flwr.supernode.runtime.run_clientapp) with the approval check, and
    `rc.pull_task_input` to know which run the bundle belongs to. The check comes after the message is pulled, so
    Flower sends the refusal back as an Error reply; `rc.push_message` records that Error in the site's audit log
    (client/audit.py), as the app's audit mod records every reply the app makes."""
    from client import audit  # the installed copy: the app's audit_mod (loaded later) shares its RECORDED

    seen = {}
    pull, install, push = rc.pull_task_input, rc.install_from_fab, getattr(rc, "push_message", None)

    def pull_task_input(client):
        message, context, run, fab = pull(client)
        audit.RECORDED.clear()  # one task, one message: nothing of it is recorded yet
        seen.update(run=run, message=message, context=context)
        return message, context, run, fab

    def push_message(client, message, context):
        # Everything that leaves goes into the site's audit log: a refusal here never reached the app's audit_mod.
        audit.record_unseen(seen.get("message"), message, context)
        return push(client, message, context)

    def guarded_install(fab_file, *args, **kwargs):
        if not isinstance(fab_file, bytes):  # Flower passes the bytes it pulled; anything else is not this path
            raise TypeError("the site launcher only installs bundles given as bytes")
        approve_or_refuse(fab_file, seen.get("run"))
        return install(fab_file, *args, **kwargs)

    rc.pull_task_input, rc.install_from_fab = pull_task_input, guarded_install
    if push is not None:
        rc.push_message = push_message


def clientapp_main() -> None:
    """`flwr-clientapp` with the approval gate in front of `install_from_fab` (see module docstring)."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    install_gate(run_clientapp)
    flwr_clientapp()


def write_shim(folder: Path) -> Path:
    """An executable that runs `clientapp_main` with this interpreter (SuperExec launches one command path)."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "spinefed-clientapp"
    text = f"#!{sys.executable}\nfrom client.launcher import clientapp_main\n\nclientapp_main()\n"
    if not shim.is_file() or shim.read_text() != text:
        tmp = shim.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(stat.S_IRWXU)  # owner-only like everything the site makes (issue #20)
        os.replace(tmp, shim)
    return shim


def superexec_main(argv: list[str]) -> None:
    """Flower's `flower-superexec` (arguments as usual), launching ClientApps through the shim."""
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    config = os.environ.get(ENV_CONFIG)
    if not config:
        sys.exit(f"error: {ENV_CONFIG} is not set; start the site with `client --site NAME --config site.yaml`")
    shim = write_shim(Path(os.environ.get("FLWR_HOME") or Path(config).parent) / "bin")
    # A dict shared with the subprocess executor: changing the entry in place redirects its launches (the cold path,
    # used when the warm fork server is unavailable).
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(shim)
    from client import warmstart

    warmstart.install(importlib.import_module("flwr.supercore.superexec.run_superexec"))
    # Flower polls for a new task every second; a quarter second keeps a local call cheap and the round short.
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()


class _PromptIdle:
    """`time` as Flower's SuperNode loop sees it: its fixed 3 s wait between two empty pulls becomes `idle_s`."""

    def __init__(self, idle_s: float):
        self.idle_s = idle_s

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle_s if seconds == 3 else seconds)


SUPERNODE_IDLE_S = 1.0


def _proxy_credentials_into_env() -> None:
    """The proxy's credentials (site.yaml network.proxy_auth_file) into this process's own https_proxy, where the
    SuperNode's Fleet client (httpx) reads them and sends Proxy-Authorization: Basic. Only this process holds them:
    `client` passed the proxy without credentials (client/node.py `supernode_proxy_env`), and a variable set here
    changes neither the command line nor /proc/PID/environ."""
    from client.node import ENV_PROXY_AUTH, supernode_proxy_env
    from common.config import load_site_config
    from common.errors import SpineFedError

    if os.environ.pop(ENV_PROXY_AUTH, None) != "1":
        return
    try:
        os.environ.update(supernode_proxy_env(load_site_config(os.environ[ENV_CONFIG]), with_credentials=True))
    except (KeyError, SpineFedError) as exc:  # the message names the key and the file, never the credentials
        sys.exit(f"error: the proxy's credentials: {exc}")


def supernode_main(argv: list[str]) -> None:
    """Flower's `flower-supernode` (arguments as usual), asking the coordinator for new messages every second instead
    of every 3 s when idle: a message then waits 0.5 s on average instead of 1.5 s, several times a round. One more
    small request a second per site is negligible for the coordinator."""
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    loop.time = _PromptIdle(SUPERNODE_IDLE_S)
    _proxy_credentials_into_env()
    sys.argv = ["flower-supernode", *argv]
    sys.exit(flower_supernode())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "supernode":
        supernode_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "superexec":
        superexec_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "clientapp":
        sys.argv = ["flwr-clientapp", *sys.argv[2:]]
        clientapp_main()
    else:
        sys.exit("usage: python -m client.launcher supernode|superexec|clientapp ARGS (started by `client --site`)")
