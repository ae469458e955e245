"""Coordinator checkpoint after every round: global tensors, strategy state, round and experiment fingerprint.

Layout in the checkpoint folder: `arrays.npz` (keys `global/<name>` and `state/<name>`) and `checkpoint.json`
(round, fingerprint, sha256 of the npz, strategy history). Both are written to temporary files and renamed; the json
is renamed last and names the npz's hash, so a crash between the two renames is detected as a mismatch and the
previous json is never paired with a half-written npz.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
    state_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def save(folder: str | Path, ckpt: Checkpoint) -> None:
    """Write the checkpoint atomically (npz first, then the json that commits it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    payload = {f"global/{k}": v for k, v in ckpt.global_arrays.items()}
    payload.update({f"state/{k}": v for k, v in ckpt.state_arrays.items()})
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
    return Checkpoint(int(meta["round"]), meta["fingerprint"], g, s, meta.get("meta", {}))
