"""Wire precision of the exchanged tensors (experiment key `transfer_dtype`): float32, or float16 to halve payloads.

Only the wire changes: the sender casts its floating-point tensors to the experiment's dtype (`encode_arrays`), the
receiver casts them back to float32 (`decode_arrays`) before it uses them. Training, aggregation, the server's global
state and checkpoints all stay float32; integer tensors (BN `num_batches_tracked`) travel untouched.

Values beyond the float16 range (|x| > 65504) are refused at the sender (`TransferOverflow`), never cast to inf and
never sent as float32 instead. Why refuse rather than fall back per tensor: a fallback would make a tensor's wire
dtype depend on its values, so the reply schema would vary between sites and rounds (the experiment fixes it:
all float16 or all float32), and a ResNet weight or BN statistic that large is a divergence symptom worth stopping
for. A site's refusal becomes an Error reply and the round goes on with the other sites; at the server it stops the
run before anything is sent. With FedAvg/FedProx the server cannot overflow after round 1 (a weighted mean of
float16-finite replies stays in range); with FedAdam/FedYogi it would mean the server optimizer diverged.
Float16 also rounds (relative 2^-11 ≈ 5e-4) and flushes |x| < 6e-8 to zero: a BN running variance that small is
lost, which BN's eps (1e-5) makes harmless.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.errors import SpineFedError

TRANSFER_DTYPES = ("float32", "float16")
FP16_MAX = float(np.finfo(np.float16).max)  # 65504


class TransferOverflow(SpineFedError):
    """A tensor does not fit the experiment's wire dtype; the message names the tensor (no data, no path)."""


def encode_arrays(arrays: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Floating-point tensors in the wire dtype; integer tensors as they are. TransferOverflow if one does not fit."""
    if dtype not in TRANSFER_DTYPES:
        raise ValueError(f"transfer dtype: expected one of {', '.join(TRANSFER_DTYPES)}, got {dtype!r}")
    out = {}
    for key, value in arrays.items():
        a = np.asarray(value)
        if a.dtype.kind == "f" and a.dtype != np.dtype(dtype):
            if dtype == "float16" and a.size and np.isfinite(a).all() and np.abs(a).max() > FP16_MAX:
                raise TransferOverflow(
                    f"tensor {key} holds |x| = {float(np.abs(a).max()):.4g}, beyond the float16 range (65504): "
                    "this experiment's transfer_dtype float16 cannot carry it (use float32)"
                )
            # NaN/Inf are passed on as they are: the server rejects them with its own, clearer reason.
            a = a.astype(dtype)
        out[key] = a
    return out


def decode_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Received tensors with float16 turned back to float32 (exact: every float16 value is a float32 value)."""
    return {
        k: (np.asarray(v).astype(np.float32) if np.asarray(v).dtype == np.float16 else v) for k, v in arrays.items()
    }


def payload_bytes(arrays: Mapping[str, np.ndarray], dtype: str | None = None) -> int:
    """Bytes of the tensors' data on the wire, as they are or with floating-point ones in `dtype` (without Flower's
    per-array header of ~130 bytes)."""
    return sum(
        a.size * np.dtype(dtype).itemsize if dtype and a.dtype.kind == "f" else a.nbytes
        for a in map(np.asarray, arrays.values())
    )
