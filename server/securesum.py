"""The coordinator's side of secure summation (common/securesum.py): plan a summation, finish it, fall back.

A summation's first masked vectors ride on a message the protocol sends anyway (the evaluation message of a unit, the
final report query); the sites' run keys ride on the membership query. Finishing takes one more query: the coordinator
announces the set of sites it received vectors from, and each participant reveals its self-mask seed only if that set
is every participant. When a site drops out or refuses, one new attempt runs over the sites that answered (fresh nonce,
so fresh masks) if at least three remain; otherwise every remaining site sends its input in the clear with its minimum
cell count applied, as without secure pooling. The sites keep the rule that makes this safe (client/securesum.py):
each input is released once, in one form. The sums are integers computed here, mod 2^32; Flower's metric
aggregation never sees them.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from common import metrics as M
from common import securesum as S
from common.replies import CONFIG, SECURESUM
from server.replyfilter import error_reason

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2


@dataclass
class Summation:
    """One summation: its id (unit/quantity), the run, the participants' run keys, the vector length."""

    run: str
    sum_id: str
    peers: dict[str, bytes]  # site → its X25519 public key for the run
    size: int
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))

    def spec(self) -> dict:
        keys = sorted(S.b64(k) for k in self.peers.values())
        return {"run": self.run, "id": self.sum_id, "nonce": self.nonce, "peers": keys, "bins": self.size // 2}

    def retry(self, sites) -> Summation:
        return Summation(self.run, self.sum_id, {s: self.peers[s] for s in sites}, self.size)


def plan(run: str, sum_id: str, keys: dict[str, bytes], sites, size: int) -> tuple[Summation | None, dict[str, str]]:
    """The summation over `sites` (those with an input) that gave a run key; None when fewer than three did.
    Returns it and, per site that sends in the clear instead, why."""
    clear = {s: "secure pooling is off at the site (no run key)" for s in sites if s not in keys}
    peers = {s: keys[s] for s in sites if s in keys}
    if len(peers) < S.MIN_PARTICIPANTS:
        why = f"{len(peers)} site(s) could take part; a secure sum needs at least {S.MIN_PARTICIPANTS}"
        clear.update({s: why for s in peers})
        return None, clear
    return Summation(run, sum_id, peers, size), clear


def masked_vector(record: ConfigRecord | None, size: int) -> tuple[np.ndarray | None, int, str]:
    """(masked vector, the site's minimum cell count, why not) from a reply's securesum record."""
    if record is None:
        return None, 0, "no masked vector in the reply"
    if "refused" in record:
        return None, 0, f"the site refused: {str(record['refused'])[:200]}"
    try:
        return S.decode(record["masked"], size), int(record.get("min-cell", 0)), ""
    except (KeyError, S.SumRefused, TypeError, ValueError) as exc:
        return None, 0, f"unusable masked vector ({exc})"


Ask = Callable[[dict[str, dict]], dict[str, Message]]


def asker(grid, nodes: dict[str, int], timeout: float) -> Ask:
    """Send one `securesum` query per site (site → its config) and return site → reply."""

    def ask(cfgs: dict[str, dict]) -> dict[str, Message]:
        msgs = []
        for site, cfg in cfgs.items():
            record = ConfigRecord({"action": "securesum", "request": json.dumps(cfg)})
            msgs.append(Message(RecordDict({CONFIG: record}), message_type=MessageType.QUERY, dst_node_id=nodes[site]))
        replies = grid.send_and_receive(msgs, timeout=timeout) if msgs else []
        site_of = {n: s for s, n in nodes.items()}
        return {site_of[r.metadata.src_node_id]: r for r in replies if r.metadata.src_node_id in site_of}

    return ask


def _answer(msg: Message | None) -> tuple[ConfigRecord | None, str]:
    if msg is None:
        return None, "no reply before the deadline"
    if msg.has_error():
        return None, error_reason(str(msg.error.reason))
    record = msg.content.config_records.get(SECURESUM)
    return (record, "") if record is not None else (None, "no securesum record in the reply")


def finish(
    ask: Ask,
    summation: Summation,
    masked: dict[str, np.ndarray],
    min_cells: dict[str, int],
    totals: dict[str, tuple[int, int]],
    floor: int,
) -> dict:
    """Complete one summation from the vectors its first attempt brought.

    `totals`: site → (malignant, benign) its input holds (the site's own clear counts); `floor`: the experiment's
    minimum cell count. Returns {"mode": "secure" | "clear" | "none", "sum": [pos ‖ neg] exact (secure, on the
    summation's grid) or the sum of the clear suppressed inputs (on the usual 100-bin grid), "participants", "clear": site → its clear suppressed vector, "dropped":
    site → why, "attempts", "seconds", "bytes", "floor"}."""
    t0 = time.monotonic()
    out: dict = {"mode": "none", "participants": [], "clear": {}, "dropped": {}, "attempts": 0, "bytes": 0}
    current = summation
    for attempt in range(1, MAX_ATTEMPTS + 1):
        out["attempts"] = attempt
        out["bytes"] += 4 * current.size * len(masked)
        for site in current.peers:
            if site not in masked and site not in out["dropped"]:
                out["dropped"][site] = "no masked vector"
        if set(masked) == set(current.peers):
            received = current.spec()["peers"]
            reveal = {"op": "reveal", "run": current.run, "id": current.sum_id, "nonce": current.nonce}
            replies = ask({s: {**reveal, "received": received} for s in current.peers})
            seeds = {}
            for site in current.peers:
                record, why = _answer(replies.get(site))
                seed = record.get("seed") if record is not None else None
                if isinstance(seed, bytes) and len(seed) == S.KEY_BYTES:
                    seeds[site] = seed
                else:
                    out["dropped"][site] = why or "no self-mask seed in the reply"
            if len(seeds) < len(current.peers):
                # The sites that revealed have spent their inputs (released once, client/securesum.py): neither a
                # new attempt nor the clear fallback may use them, so this quantity is lost rather than leaked.
                out["lost"] = "a participant revealed no self-mask seed; the others' inputs are spent"
                break
            sites = sorted(current.peers)
            info = S.context(current.run, current.sum_id, current.nonce)
            total = S.unmask([masked[s] for s in sites], [seeds[s] for s in sites], info)
            n_pos, n_neg = (sum(totals[s][i] for s in sites) for i in (0, 1))
            try:
                hp, hn = S.histogram_sum(total, n_pos, n_neg)
            except S.SumRefused as exc:  # a wrong input somewhere; the inputs are spent: nothing to fall back to
                out["lost"] = f"the sum was refused: {exc}"
                break
            out.update(mode="secure", participants=sites, sum=np.concatenate([hp, hn]).tolist())
            out["floor"] = max([floor, *(min_cells.get(s, 0) for s in sites)])
            out["seconds"] = time.monotonic() - t0
            return out
        answering = [s for s in current.peers if s in masked and s not in out["dropped"]]
        if attempt == MAX_ATTEMPTS or len(answering) < S.MIN_PARTICIPANTS:
            break
        current = current.retry(answering)
        log.warning("secure sum %s: attempt %d over %d site(s)", current.sum_id, attempt + 1, len(answering))
        masked = {}
        for site, msg in ask({s: {"op": "mask", "spec": current.spec()} for s in current.peers}).items():
            record, why = _answer(msg)
            vec, cell, why2 = masked_vector(record, current.size) if record is not None else (None, 0, why)
            if vec is not None:
                masked[site], min_cells[site] = vec, cell
            else:
                out["dropped"][site] = why2
    if out.get("lost"):
        log.warning("secure sum %s: %s", summation.sum_id, out["lost"])
        out["seconds"] = time.monotonic() - t0
        return out
    # The fallback: every site that is still answering sends its input with its own minimum cell count applied.
    sites = [s for s in summation.peers if s not in out["dropped"]]
    clear = {"op": "clear", "run": summation.run, "id": summation.sum_id, "min-cell": floor}
    for site, msg in ask({s: clear for s in sites}).items():
        record, why = _answer(msg)
        values = record.get("hist") if record is not None else None
        if isinstance(values, list) and len(values) == 2 * M.N_HIST_BINS:  # the usual grid (client/securesum.py)
            out["clear"][site] = [float(v) for v in values]
        else:
            out["dropped"].setdefault(site, why or "no histogram in the reply")
    out["mode"] = "clear" if out["clear"] else "none"
    out["participants"] = sorted(out["clear"])
    if out["clear"]:
        out["sum"] = np.sum(list(out["clear"].values()), axis=0).tolist()
    out["seconds"] = time.monotonic() - t0
    return out


unb64 = S.unb64


def describe(result: dict | None, clear_sites: dict[str, str]) -> dict:
    """What results.json records about one pooled quantity: how it was pooled, over whom, who sent in the clear
    (`result` None: no summation was possible)."""
    if result is None:
        return {"pooling": "per-site suppressed", "participants": [], "attempts": 0, "clear_sites": dict(clear_sites)}
    mode = {"secure": "secure sum", "clear": "per-site suppressed (fallback)", "none": "none"}[result["mode"]]
    info = {"pooling": mode, "participants": result["participants"], "attempts": result["attempts"]}
    info["clear_sites"] = dict(clear_sites)
    if result["dropped"]:
        info["dropped"] = dict(result["dropped"])
    if result.get("lost"):
        info["lost"] = result["lost"]
    if result["mode"] == "secure":
        info["floor"] = result["floor"]
    info["seconds"] = round(result.get("seconds", 0.0), 3)
    info["bytes"] = result["bytes"]
    return info
