"""Bounded wait for sites, replacing Flower's `sample_nodes`, which waits for `min_available_nodes` forever.

Rule: wait up to `timeout_s` for every wanted site; return early once all are connected. When the deadline passes,
go on with whoever is connected if that is at least the quorum, else raise QuorumNotReached (the run stops with a
message that says how many sites were there, instead of hanging).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from common.errors import SpineFedError

log = logging.getLogger("flwr.spinefed.quorum")  # child of flwr: shown in `flwr run --stream`


class QuorumNotReached(SpineFedError):
    """Fewer sites than the quorum were connected when the deadline passed."""


def wait_for_nodes(
    grid,
    quorum: int,
    timeout_s: float,
    wanted: int | None = None,
    allowed: Collection[int] | None = None,
    poll_s: float = 1.0,
) -> list[int]:
    """Node ids to use this round: all `wanted` (default: quorum) as soon as they are there, else the quorum.

    `allowed` restricts the candidates (e.g. a held-out site gets no training message).
    """
    wanted = max(quorum, wanted or quorum)
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(n for n in grid.get_node_ids() if allowed is None or n in allowed)
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() >= deadline:
            break
        log.info("waiting for sites: %d of %d connected (quorum %d)", len(nodes), wanted, quorum)
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    if len(nodes) >= quorum:
        log.warning("deadline passed with %d of %d sites connected: going on with the quorum", len(nodes), wanted)
        return nodes
    raise QuorumNotReached(f"only {len(nodes)} site(s) connected after {timeout_s:.0f} s; the quorum is {quorum}")
