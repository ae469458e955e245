"""The run's Grid, with replies collected promptly.

Flower 1.42's Grid (deployment and simulation alike) checks the SuperLink for replies every 3 s. A round waits for
that twice per message type (train, then evaluate), and the census once, so on a small federation 3–6 s of a round
were spent asleep after the last reply had arrived. Everything is delegated to Flower's grid; only
`send_and_receive` polls more often (a pull is one cheap local call).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

POLL_S = 0.05  # a pull is one local call in simulation, one small gRPC request in deployment


class PromptGrid(Grid):
    def __init__(self, grid: Grid, poll_s: float = POLL_S):
        self._grid, self.poll_s = grid, poll_s

    def __getattr__(self, name):  # anything else a Grid offers (e.g. get_nodes, close)
        return getattr(self._grid, name)

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Same contract as Flower's: push, then pull until every reply is in or `timeout` seconds have passed."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_s)
        return replies
