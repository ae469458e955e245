"""Coordinator checkpoint after every round: global tensors, strategy state, round and experiment fingerprint.

Layout in the checkpoint folder: `arrays.npz` (keys `global/<name>` and `state/<entry>`) and `checkpoint.json`
(round, fingerprint, sha256 of the npz, strategy history). Both are written to temporary files and renamed; the json
is renamed last and names the npz's hash, so a crash between the two renames is detected as a mismatch and the
previous json is never paired with a half-written npz.

Strategy state is whatever the strategy keeps between rounds (server/strategy.StrategyState: attribute → value), so
FedAdam's moments, FedAvgM's momentum or a new strategy's state survive a resume without code here. Each attribute is
stored as `state/<attribute>:<kind>[/<item>]`, kind one of `array`, `scalar`, `dict` (per key), `list` (per index),
`arrayrecord` (per key) or `empty-dict` / `empty-list`; None is not stored (a fresh strategy starts with it). A value
of another type stops the checkpoint with an error naming the attribute: a strategy's state never resets silently.
Checkpoints made before this layout hold `state/m_t/<key>` and `state/v_t/<key>` (FedAdam/FedYogi moments): read as
the dicts they were.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from common.errors import SpineFedError
from common.fileio import atomic_write_bytes

ARRAYS, META = "arrays.npz", "checkpoint.json"


class CheckpointError(SpineFedError):
    """The checkpoint cannot be used for this experiment (other fingerprint, damaged files)."""


@dataclass
class Checkpoint:
    round: int
    fingerprint: str
    global_arrays: dict[str, np.ndarray]
    strategy_state: dict[str, object] = field(default_factory=dict)  # attribute → value (see the module docstring)
    meta: dict = field(default_factory=dict)


def flatten_state(state: dict[str, object]) -> dict[str, np.ndarray]:
    """Strategy state as named arrays (`<attribute>:<kind>[/<item>]`); TypeError naming an attribute it cannot
    store."""
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if value is None:
            continue
        if isinstance(value, ArrayRecord):
            out.update({f"{name}:arrayrecord/{k}": a.numpy() for k, a in value.items()})
        elif isinstance(value, np.ndarray):
            out[f"{name}:array"] = value
        elif isinstance(value, (bool, int, float, np.generic)):
            out[f"{name}:scalar"] = np.asarray(value)
        elif isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
            out.update({f"{name}:dict/{k}": v for k, v in value.items()} or {f"{name}:empty-dict": np.zeros(0)})
        elif isinstance(value, (list, tuple)) and all(isinstance(v, np.ndarray) for v in value):
            out.update({f"{name}:list/{i:06d}": v for i, v in enumerate(value)} or {f"{name}:empty-list": np.zeros(0)})
        else:
            raise TypeError(
                f"strategy state '{name}' ({type(value).__name__}) cannot be checkpointed: server/checkpoint.py "
                "stores None, numbers, arrays, dicts or lists of arrays and ArrayRecords"
            )
    return out


def unflatten_state(arrays: dict[str, np.ndarray]) -> dict[str, object]:
    """The inverse of flatten_state (and the layout before it: `m_t/<key>`, `v_t/<key>`)."""
    out: dict[str, object] = {}
    lists: dict[str, dict[int, np.ndarray]] = {}
    for key, value in arrays.items():
        if ":" not in key:  # older checkpoints: server-optimizer moments, `<attribute>/<tensor>`
            name, item = key.split("/", 1)
            out.setdefault(name, {})[item] = value
            continue
        name, rest = key.split(":", 1)
        kind, _, item = rest.partition("/")
        if kind == "array":
            out[name] = value
        elif kind == "scalar":
            out[name] = value.item()
        elif kind in ("dict", "empty-dict"):
            part = out.setdefault(name, {})
            if item:
                part[item] = value
        elif kind == "arrayrecord":
            out.setdefault(name, ArrayRecord())[item] = Array(np.asarray(value))
        elif kind in ("list", "empty-list"):
            part = lists.setdefault(name, {})
            if item:
                part[int(item)] = value
        else:
            raise CheckpointError(f"strategy state entry '{key}' has an unknown kind")
    out.update({name: [items[i] for i in sorted(items)] for name, items in lists.items()})
    return out


def save(folder: str | Path, ckpt: Checkpoint) -> None:
    """Write the checkpoint atomically (npz first, then the json that commits it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    payload = {f"global/{k}": v for k, v in ckpt.global_arrays.items()}
    payload.update({f"state/{k}": v for k, v in flatten_state(ckpt.strategy_state).items()})
    np.savez(buf, **payload)
    data = buf.getvalue()
    atomic_write_bytes(folder / ARRAYS, data)
    meta = {
        "round": ckpt.round,
        "fingerprint": ckpt.fingerprint,
        "arrays_sha256": hashlib.sha256(data).hexdigest(),
        "meta": ckpt.meta,
    }
    atomic_write_bytes(folder / META, json.dumps(meta, indent=1, default=float).encode())


def exists(folder: str | Path) -> bool:
    return (Path(folder) / META).is_file()


def load(folder: str | Path, fingerprint: str | None = None) -> Checkpoint:
    """Read the checkpoint; with `fingerprint`, refuse one made by a different experiment."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
        data = (folder / ARRAYS).read_bytes()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: checkpoint unreadable ({exc.__class__.__name__})") from None
    if hashlib.sha256(data).hexdigest() != meta.get("arrays_sha256"):
        raise CheckpointError(f"{folder}: {ARRAYS} does not match {META} (interrupted write?)")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{folder}: checkpoint belongs to another experiment (fingerprint {str(meta.get('fingerprint'))[:12]}…, "
            f"this one {fingerprint[:12]}…); use a new output folder or the original experiment.yaml"
        )
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        g = {k[len("global/") :]: npz[k] for k in npz.files if k.startswith("global/")}
        s = {k[len("state/") :]: npz[k] for k in npz.files if k.startswith("state/")}
    return Checkpoint(int(meta["round"]), meta["fingerprint"], g, unflatten_state(s), meta.get("meta", {}))
