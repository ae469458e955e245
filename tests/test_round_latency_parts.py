"""The pieces that cut a round's fixed cost: warm ClientApp starts, prompt reply polling, a prompter SuperNode, and a
front whose stop never leaves an nginx worker behind. Each test pins the Flower 1.42 behaviour it relies on, so an
upgrade that changes it fails here rather than slowing (or breaking) a hospital's rounds."""

from __future__ import annotations

import inspect
import os
import signal
import time
from pathlib import Path

import pytest
from flwr.app import Message, Metadata, RecordDict

from server.grid import PromptGrid


def test_warm_task_gets_the_arguments_flowers_executor_gives_flwr_clientapp(monkeypatch):
    import flwr.supercore.superexec.executor.subprocess_executor as sub
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    from client.warmstart import clientapp_args

    seen = []
    monkeypatch.setattr(sub.subprocess, "Popen", lambda args, **kw: seen.append(args))
    for insecure, certs in ((True, None), (False, "/etc/ca.crt")):
        spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="tok",
                             insecure=insecure, root_certificates_path=certs, runtime_dependency_install=False,
                             parent_pid=4242, suppress_output=False, task_id=7)  # fmt: skip
        sub.SubprocessExecutor().launch(spec)
        assert seen[-1][1:] == clientapp_args(spec)  # same arguments, only the command differs


def test_warm_start_replaces_only_subprocess_launches():
    import flwr.supercore.superexec.run_superexec as rs
    from flwr.supercore.constant import ExecutorType

    from client import warmstart

    class Module:
        get_executor = staticmethod(lambda kind, *a, **k: ("flower", kind))

    fake = Module()
    warmstart.install(fake)
    assert fake.get_executor(ExecutorType.KUBERNETES) == ("flower", ExecutorType.KUBERNETES)
    assert "get_executor" in inspect.getsource(rs.run_superexec)  # the name warmstart.install replaces
    assert "client.app" in warmstart.PRELOAD and "client.launcher" in warmstart.PRELOAD


def test_a_task_that_cannot_be_forked_starts_cold(monkeypatch):
    import multiprocessing.forkserver

    import flwr.supercore.superexec.executor.subprocess_executor as sub
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    from client import warmstart

    cold = []
    monkeypatch.setattr(multiprocessing.forkserver, "ensure_running", lambda: None)
    monkeypatch.setattr(sub.SubprocessExecutor, "launch", lambda self, spec: cold.append(spec) or "cold")
    executor = warmstart.make_executor()
    assert executor.warm

    class DeadForkServer:
        def __init__(self, **kw):
            pass

        def start(self):
            raise EOFError("fork server gone")

    monkeypatch.setattr(executor.ctx, "Process", DeadForkServer)
    spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="tok",
                         insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                         parent_pid=None, suppress_output=False, task_id=3)  # fmt: skip
    assert executor.launch(spec) == "cold" and cold == [spec] and executor.tasks == []


def test_forked_task_runs_the_preloaded_installed_code(tmp_path):
    """The fork server imports the site's installed app once; a task forked from it finds it already imported."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["client.app"])
    out = tmp_path / "where.txt"
    proc = ctx.Process(target=_report_app_module, args=(str(out),))
    started = time.monotonic()
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 0
    imported_before, where = out.read_text().split("\n")
    assert imported_before == "True" and Path(where).resolve().parent == Path(__file__).resolve().parent.parent / "client"
    assert time.monotonic() - started < 120


def _report_app_module(path: str) -> None:
    import sys

    before = "client.app" in sys.modules
    import client.app

    Path(path).write_text(f"{before}\n{client.app.__file__}")


def test_supernode_idle_wait_is_shortened_and_flowers_loop_still_has_it():
    import flwr.supernode.start_client_internal as loop

    from client.launcher import SUPERNODE_IDLE_S, _PromptIdle

    assert "time.sleep(3)" in inspect.getsource(loop)  # the 3 s idle wait _PromptIdle shortens
    t = _PromptIdle(0.01)
    started = time.monotonic()
    t.sleep(3)
    assert time.monotonic() - started < 1.0 and t.monotonic() > 0 and SUPERNODE_IDLE_S <= 1.0


class _SlowGrid:
    """Replies become available after `ready_after` seconds."""

    def __init__(self, ready_after: float):
        self.ready_at, self.pulls = time.monotonic() + ready_after, 0

    def push_messages(self, messages):
        return [f"id{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        if time.monotonic() < self.ready_at:
            return []
        return [_reply(i) for i in ids]


def _reply(msg_id: str) -> Message:
    meta = Metadata(run_id=1, message_id="r" + msg_id, src_node_id=1, dst_node_id=0, reply_to_message_id=msg_id,
                    group_id="", created_at=time.time(), ttl=60, message_type="train")  # fmt: skip
    return Message(RecordDict(), metadata=meta)


def test_prompt_grid_returns_soon_after_the_last_reply_and_honours_the_timeout():
    slow = _SlowGrid(ready_after=0.6)
    grid = PromptGrid(slow, poll_s=0.05)
    started = time.monotonic()
    replies = list(grid.send_and_receive([object(), object()], timeout=10))
    took = time.monotonic() - started
    assert len(replies) == 2 and 0.6 <= took < 1.2  # Flower's own grid would have slept until 3 s

    never = PromptGrid(_SlowGrid(ready_after=60), poll_s=0.05)
    started = time.monotonic()
    assert list(never.send_and_receive([object()], timeout=0.5)) == []
    assert 0.5 <= time.monotonic() - started < 1.5


@pytest.mark.skipif(not os.path.exists("/usr/sbin/nginx"), reason="nginx not installed (deploy/install.sh --with-nginx)")
def test_front_stop_leaves_no_worker_even_when_the_master_must_be_killed(tmp_path):
    from common.processes import children, free_port
    from server.front import Front
    from tests.deployhelpers import make_certs

    ca, crt, key = make_certs(tmp_path / "certs")
    front = Front(nginx="nginx", prefix=tmp_path / "front", log_dir=tmp_path / "logs", listen_host="127.0.0.1",
                  listen_port=free_port(), certificate=crt, key=key, upstream_port=free_port(), upstream_ca=ca)  # fmt: skip
    proc = front.start()
    deadline = time.monotonic() + 20
    while not (workers := children(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers, (tmp_path / "logs" / "front-error.log").read_text()
    os.kill(proc.pid, signal.SIGSTOP)  # a master that answers neither SIGQUIT nor SIGTERM: only SIGKILL ends it
    front.stop(grace_s=0.5)
    assert proc.poll() is not None
    time.sleep(0.5)
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and b"nginx" in Path(f"/proc/{w}/cmdline").read_bytes()]
    assert alive == []
