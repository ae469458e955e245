"""The coordinator's checks on a site's reply, before anything aggregates or trusts it: one implementation for the
strategy's rounds (server/strategy.ReplyFilter) and the protocol runner's own messages (server/protocols.py).

A reply is usable when it holds exactly one MetricRecord with the fixed schema's keys (common/replies.py), every
metric finite, and, where tensors are expected, exactly one ArrayRecord whose (packed, common/transfer.py) tensors are
the expected names and shapes, floating-point ones in the experiment's wire dtype, none NaN or Inf. Flower would raise
`InconsistentMessageReplies` for most of these and stop the ServerApp; here a bad reply costs only that site's part.
Every reason is text the coordinator can log and record: it names keys and tensors, never a patient or a path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Message

from common.replies import NUM_EXAMPLES
from common.transfer import decode_arrays
from server.wire import read_packed

Layout = Mapping[str, tuple[tuple[int, ...], np.dtype]]  # tensor name → (shape, dtype) the coordinator sent


def error_reason(text: str) -> str:
    """The site's own message from an Error reply's reason (simulation wraps it in Ray's traceback text)."""
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1]
    return " ".join(text.replace("'>", "").split())[:300]


def _finite(value) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def metrics_problem(msg: Message, keys: frozenset, positive_examples: bool = True) -> str | None:
    """Why the reply's metrics are unusable, or None. `positive_examples`: its num-examples must be > 0 (a weight)."""
    content = msg.content
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    if set(metrics.keys()) != keys:
        missing, extra = sorted(keys - set(metrics.keys())), sorted(set(metrics.keys()) - keys)
        return f"metric keys differ from the schema (missing {missing}, extra {extra})"
    bad = [k for k, v in metrics.items() if not _finite(v)]
    if bad:
        return f"non-finite metric(s) {bad}"
    if positive_examples and not float(metrics[NUM_EXAMPLES]) > 0:
        return "num-examples is not positive"
    return None


def tensors_of(msg: Message, layout: Layout, wire_dtype: str) -> dict[str, np.ndarray] | str:
    """The reply's tensors by name, float32 again and in the layout's order and shapes; or why they are unusable.

    Floating-point tensors must arrive in `wire_dtype` (one schema per experiment). A 0-d tensor (BN batch counter)
    sent as shape (1,) (np.ascontiguousarray does that) is the same tensor and gets its shape back. The arrays may be
    read-only views into the reply (no copy)."""
    content = msg.content
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}"
    record = next(iter(content.array_records.values()))
    try:  # packed on the wire (common/transfer.py): named tensors again (views into the reply) before any check
        arrays = read_packed(record)
    except ValueError as exc:
        return str(exc)
    if set(arrays) != set(layout):
        missing, extra = set(layout) - set(arrays), set(arrays) - set(layout)
        return f"tensor keys differ ({len(missing)} missing, {len(extra)} extra)"
    for key, a in arrays.items():
        if a.dtype.kind == "f" and a.dtype != wire_dtype:
            return f"tensor {key} sent as {a.dtype}; this experiment transfers {wire_dtype}"
    arrays = decode_arrays(arrays)  # float16 on the wire → float32 before any other check
    out = {}
    for key, (shape, _) in layout.items():
        a = arrays[key]
        if tuple(a.shape) != shape:
            if not a.size == 1 == int(np.prod(shape)):
                return f"tensor {key} has shape {tuple(a.shape)}, expected {shape}"
            a = np.reshape(a, shape)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return f"tensor {key} holds NaN or Inf"
        out[key] = a
    return out


def check_reply(
    msg: Message, keys: frozenset, layout: Layout | None = None, wire_dtype: str = "float32", positive_examples=True
) -> tuple[str | None, dict[str, np.ndarray]]:
    """(why the reply is unusable or None, its tensors when `layout` asks for them). Error replies are the caller's:
    their reason is the site's (see error_reason), not the coordinator's verdict."""
    why = metrics_problem(msg, keys, positive_examples)
    if why or layout is None:
        return why, {}
    arrays = tensors_of(msg, layout, wire_dtype)
    return (arrays, {}) if isinstance(arrays, str) else (None, arrays)


_CELL_KEYS = frozenset({"n", "n-pos", "n-neg", "tp", "fp", "tn", "fn", "auc", "auc-var"})


def strata_problem(tag_report: dict) -> str | None:
    """Why a tag report's acquisition strata (client/tasks.acquisition_strata) are unusable, or None (none sent is
    fine). Checked: known attribute names, level names of a level's shape (common.acquisition.is_level), each cell
    either {"suppressed": 1} or whole counts that add up (n = n-pos + n-neg, tp + fn = n-pos, tn + fp = n-neg), an
    AUC in [0, 1] (−1: none) with a variance ≥ 0 (−1), no attribute counting more patients than the tag itself.
    The caller drops only the strata of a report that fails (its other figures stand)."""
    from common.acquisition import ATTRIBUTES, is_level

    strata = tag_report.get("strata")
    if strata is None:
        return None
    if not isinstance(strata, dict) or not isinstance(strata.get("attributes"), dict):
        return "strata are not a mapping with 'attributes'"
    cell_floor = strata.get("min-cell")
    if not isinstance(cell_floor, int) or isinstance(cell_floor, bool) or cell_floor < 1:
        return "strata carry no minimum cell count"
    total = tag_report.get("n", 0)
    for name, levels in strata["attributes"].items():
        if name not in ATTRIBUTES:
            return f"unknown acquisition attribute {str(name)[:40]!r}"
        if not isinstance(levels, dict) or not levels:
            return f"{name}: no levels"
        counted = 0
        for level, cell in levels.items():
            if not is_level(level):
                return f"{name}: a level name that is not a short bin name"
            if not isinstance(cell, dict):
                return f"{name}/{level}: not a mapping"
            if cell == {"suppressed": 1}:
                continue
            if set(cell) != _CELL_KEYS:
                return f"{name}/{level}: keys differ from the stratum schema"
            counts = [cell[k] for k in ("n", "n-pos", "n-neg", "tp", "fp", "tn", "fn")]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                return f"{name}/{level}: counts must be whole numbers >= 0"
            n, pos, neg, tp, fp, tn, fn = counts
            if n != pos + neg or tp + fn != pos or tn + fp != neg:
                return f"{name}/{level}: counts do not add up"
            if n < cell_floor:
                return f"{name}/{level}: {n} patients, under the report's own minimum cell count"
            auc, var = cell["auc"], cell["auc-var"]
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) for v in (auc, var))
            if not numbers or not (auc == -1 or 0 <= auc <= 1) or not (var == -1 or var >= 0):
                return f"{name}/{level}: AUC or its variance out of range"
            counted += n
        if counted > total:
            return f"{name}: levels count {counted} patients, the tag {total}"
    return None
