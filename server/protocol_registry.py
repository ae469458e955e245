"""The registered validation protocols, in running and report order (server/protocol_kinds.py says what one is).
A new protocol: its module, and one entry here."""

from __future__ import annotations

from server import repeated_tenfold
from server.protocol_kinds import FINAL, LOCAL, SITE_HELD_OUT, TENFOLD, ProtocolKind

KINDS: dict[str, ProtocolKind] = {k.name: k for k in (TENFOLD, SITE_HELD_OUT, repeated_tenfold.KIND, LOCAL, FINAL)}


def kind_of(name: str) -> ProtocolKind:
    return KINDS[name]


def selectable() -> tuple[str, ...]:
    """What an experiment's `protocol` may be: `train` (one federated training), `all` (every kind that `all`
    includes), or a registered kind's name."""
    return ("train", *(k.name for k in KINDS.values() if k.selectable), "all")


def results_order() -> tuple[str, ...]:
    return tuple(k.results_key for k in KINDS.values())


def by_results_key(key: str) -> ProtocolKind | None:
    return next((k for k in KINDS.values() if k.results_key == key), None)
