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

Packing (`pack_arrays` / `unpack_arrays`): on the wire all tensors of a message travel as one byte buffer plus its
layout (key, dtype, shape per tensor), not as one Flower Array each. Flower 1.42 moves every Array, and every 5 MB
chunk of it, as a separate object with its own HTTP request at each hop (ServerApp → SuperLink → front → SuperNode →
ClientApp, and back), each with database bookkeeping at the SuperLink: a full ResNet50 is 322 tensors, ~650 objects
per message, and that per-object cost, not the bytes, dominated a round. Packed it is ~20 objects. The receiver
unpacks before anything else, so checks, aggregation and training still see named float32 tensors.

Copies (`pack_npy` / `npy_view`): Flower's Array holds a tensor as the bytes `np.save` writes (.npy). Going through
np.save / np.load costs four copies of the packed buffer out and two in; `pack_npy` writes the .npy bytes with one
copy and `npy_view` reads them with none. A packed layer4+head reply is 60 MB, and every copy of it was 10–30 ms of
each message on a 2-core machine (bench/federation_overhead.py).
"""

from __future__ import annotations

import io
import json
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


PACKED, LAYOUT = "packed", "packed-layout"  # the two array keys of a packed message
WIRE_DTYPES = ("float16", "float32", "float64", "int64", "int32", "bool")


def _flat(arrays: Mapping[str, np.ndarray]) -> tuple[bytes, list[np.ndarray]]:
    """The layout (UTF-8 JSON: key, dtype, shape per tensor, keys sorted) and each tensor's bytes, in that order."""
    keys = sorted(arrays)
    parts = [np.asarray(arrays[k]) for k in keys]
    layout = json.dumps([[k, str(a.dtype), list(a.shape)] for k, a in zip(keys, parts)]).encode()
    # ascontiguousarray turns a 0-d tensor into shape (1,): harmless here, the layout keeps the true shape.
    return layout, [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in parts]


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All tensors as one uint8 buffer (keys in sorted order) and the layout as UTF-8 JSON bytes."""
    layout, flat = _flat(arrays)
    data = np.concatenate(flat) if flat else np.zeros(0, np.uint8)
    return {PACKED: data, LAYOUT: np.frombuffer(layout, dtype=np.uint8)}


def npy_header(dtype, shape: tuple[int, ...]) -> bytes:
    """The header np.save writes before a C-ordered array of this dtype and shape."""
    fp = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(fp, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return fp.getvalue()


def pack_npy(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, bytes]]:
    """`pack_arrays` as {key: (length, .npy bytes)}: the bytes np.save would write for each of its two uint8 arrays
    (what a Flower Array holds), with the tensors copied once."""
    layout, flat = _flat(arrays)
    size = sum(f.size for f in flat)
    return {
        PACKED: (size, b"".join([npy_header(np.uint8, (size,)), *flat])),
        LAYOUT: (len(layout), npy_header(np.uint8, (len(layout),)) + layout),
    }


def npy_view(data: bytes) -> np.ndarray:
    """The array in .npy bytes as a read-only view of them (np.load copies). ValueError when they are not a plain
    .npy array whose header matches its length (object arrays are refused, as np.load without pickle does)."""
    head = io.BytesIO(memoryview(data)[:65536])
    try:
        major, _ = np.lib.format.read_magic(head)
        read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}[major]
        shape, fortran, dtype = read(head)
    except (ValueError, KeyError, EOFError, SyntaxError) as exc:
        raise ValueError(f"not a readable .npy array ({type(exc).__name__})") from None
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.hasobject or head.tell() + count * dtype.itemsize != len(data):
        raise ValueError("the .npy bytes do not match their header")
    return np.frombuffer(data, dtype, count, head.tell()).reshape(shape, order="F" if fortran else "C")


def unpack_arrays(arrays: Mapping[str, np.ndarray], copy: bool = True) -> dict[str, np.ndarray]:
    """The named tensors of a packed message; a message that is not packed is returned as it is. ValueError (naming
    what is wrong, no values) when the layout does not describe the buffer exactly. `copy` False: views into the
    buffer (read-only when it is; possibly unaligned), for a receiver that only reads them."""
    if PACKED not in arrays and LAYOUT not in arrays:
        return {k: np.array(v) for k, v in arrays.items()} if copy else dict(arrays)
    if set(arrays) != {PACKED, LAYOUT}:
        raise ValueError("packed tensors: expected exactly the arrays 'packed' and 'packed-layout'")
    data = np.asarray(arrays[PACKED])
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError("packed tensors: the buffer is not a flat byte array")
    try:
        layout = json.loads(np.asarray(arrays[LAYOUT]).tobytes().decode())
        entries = [(str(k), np.dtype(d), tuple(int(n) for n in shape)) for k, d, shape in layout]
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"packed tensors: unreadable layout ({type(exc).__name__})") from None
    out, offset = {}, 0
    for key, dtype, shape in entries:
        if dtype.name not in WIRE_DTYPES or any(n < 0 for n in shape) or key in out:
            raise ValueError(f"packed tensors: bad layout entry for {key[:80]!r}")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > data.size:
            raise ValueError("packed tensors: the layout describes more bytes than were sent")
        view = data[offset : offset + size].view(dtype).reshape(shape)
        out[key] = view.copy() if copy else view  # a copy is aligned, writable and owned
        offset += size
    if offset != data.size:
        raise ValueError("packed tensors: the layout describes fewer bytes than were sent")
    return out
