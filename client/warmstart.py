"""Warm ClientApp starts: each task's ClientApp is forked from a process that has already imported its code.

Flower's SuperExec starts one fresh `flwr-clientapp` process per message (client/launcher.py). Importing flwr, torch,
torchvision and the site's app takes 4–9 s per message on a small CPU machine, several times a round, often longer
than the training itself. Here the SuperExec's subprocess executor is replaced by one that forks each ClientApp from a
multiprocessing fork server started once with those modules imported: a task starts in ~0.1 s.

Why this is safe:
- The fork server only imports modules; it opens no connection, starts no thread pool and touches no GPU (CUDA is
  initialised later, in each task's own process), so what is forked is a plain, single-threaded interpreter.
- Each task still runs in its own process, through the same approval gate (client/launcher.py `clientapp_main`),
  with the same arguments (token, Runtime API address, `--parent-pid`) as Flower's executor gives `flwr-clientapp`.
- The imported app is the site's installed `client`/`common` code, as in a cold start: the launcher imports those
  packages before Flower loads `client.app`, so the bundle's unpacked copy is checked (hash, version) but not imported.
If the fork server cannot start, each task falls back to a fresh process (slower, same behaviour).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys

log = logging.getLogger("spinefed.site.warmstart")

# Imported once by the fork server: what every ClientApp task needs (flwr's clientapp entry point, torch and
# torchvision through the site's app, the training loop the app imports lazily). Import failures there are ignored
# by multiprocessing; the task then imports what it needs itself.
PRELOAD = ["client.launcher", "flwr.supernode.cli.flwr_clientapp", "flwr.supernode.runtime.run_clientapp", "client.app"]
PRELOAD += ["common.training"]


def clientapp_args(spec) -> list[str]:
    """`flwr-clientapp` arguments for an ExecutionSpec, as Flower's subprocess executor passes them."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG

    args = [TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


def run_task(args: list[str], quiet: bool) -> None:
    """Body of a forked task process: `flwr-clientapp ARGS` behind the approval gate."""
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    from client.launcher import clientapp_main

    sys.argv = ["flwr-clientapp", *args]
    clientapp_main()


def make_executor():
    """Flower's SubprocessExecutor with ClientApp tasks forked from a warm fork server (see module docstring)."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    class WarmExecutor(SubprocessExecutor):
        def __init__(self):
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(PRELOAD)
            self.tasks: list = []
            self.warm = False
            try:  # start it now, so the imports happen while the site waits for its first message
                from multiprocessing import forkserver

                forkserver.ensure_running()
                self.warm = True
            except (OSError, ValueError) as exc:
                log.warning("warm ClientApp start unavailable (%s); each task starts a fresh process", exc)

        def launch(self, spec):
            if spec.task_type != TaskType.CLIENT_APP or not self.warm:
                return super().launch(spec)
            proc = self.ctx.Process(target=run_task, args=(clientapp_args(spec), spec.suppress_output),
                                    name=f"clientapp-task-{spec.task_id}")  # fmt: skip
            try:
                proc.start()
            except Exception as exc:  # the SuperNode's task launcher: a dead fork server, or anything, starts it cold
                log.warning("warm ClientApp start failed (%s: %s); starting this task in a fresh process",
                            type(exc).__name__, exc)  # fmt: skip
                return super().launch(spec)
            self.tasks.append(proc)
            return LaunchResult.accepted()

        def reconcile(self):
            self.tasks = [p for p in self.tasks if p.is_alive()]  # is_alive() also reaps finished ones

        def close(self):
            for proc in self.tasks:
                with contextlib.suppress(Exception):
                    proc.terminate()
            self.tasks = []

    return WarmExecutor()


def install(run_superexec_module) -> None:
    """Make Flower's SuperExec (module flwr.supercore.superexec.run_superexec) use the warm executor for subprocess
    launches; other executor types are left to Flower."""
    from flwr.supercore.constant import ExecutorType

    flower_get_executor = run_superexec_module.get_executor

    def get_executor(executor_type, *args, **kwargs):
        if executor_type == ExecutorType.SUBPROCESS:
            return make_executor()
        return flower_get_executor(executor_type, *args, **kwargs)

    run_superexec_module.get_executor = get_executor
