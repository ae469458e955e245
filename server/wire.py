"""The coordinator's end of the wire: instructions go out packed (common/transfer.py), replies are read without copies.

A packed layer4+head ResNet50 is 60 MB per message, and a round reads ten replies. Flower's own path (np.load per
Array, np.save per tensor, another np.load when FedAvg averages) copied every reply about six times, which was most of
the coordinator's 0.5 s between the last reply and the next instruction. Here a reply is viewed in place
(`read_packed`), its tensors are handed to Flower's strategies as `HeldArray`s, and what goes out is written with one
copy (`packed_record`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from common.transfer import encode_arrays, npy_header, npy_view, pack_npy, unpack_arrays

NUMPY = "numpy.ndarray"  # Flower's SType for .npy bytes


def view(arr: Array) -> np.ndarray:
    """An Array's tensor without a copy (read-only); Flower's own conversion for anything not .npy bytes."""
    if isinstance(arr, HeldArray):
        return arr.numpy()
    return npy_view(arr.data) if arr.stype == NUMPY else arr.numpy()


def packed_record(arrays: Mapping[str, np.ndarray], dtype: str = "float32") -> ArrayRecord:
    """The tensors in the wire dtype, packed into one buffer, as an ArrayRecord (TransferOverflow: see encode_arrays)."""
    packed = pack_npy(encode_arrays(arrays, dtype))
    record = ArrayRecord()
    for key, (size, data) in packed.items():
        record[key] = Array(dtype="uint8", shape=(size,), stype=NUMPY, data=data)
    return record


def read_packed(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The named tensors of a (packed) reply as read-only views into it; ValueError naming what is wrong."""
    return unpack_arrays({k: view(a) for k, a in record.items()}, copy=False)


class HeldArray(Array):
    """An Array that holds its tensor in memory (a view into a received reply): `numpy()` returns it without the copy
    np.load makes. Server-side only: it stands in a reply's ArrayRecord for the strategy's aggregation and is never
    sent; `data` (the .npy bytes) is written only if something asks for it."""

    def __init__(self, value: np.ndarray):  # Array.__init__ would serialise it
        self.__dict__.update(dtype=str(value.dtype), shape=tuple(value.shape), stype=NUMPY, _held=value)

    @property
    def data(self) -> bytes:
        return array_of(self.__dict__["_held"]).data

    def numpy(self) -> np.ndarray:
        return self.__dict__["_held"]


def array_of(value: np.ndarray) -> Array:
    """`Array(value)` with one copy of the data (np.save into a buffer, then getvalue: two)."""
    value = np.asarray(value)
    value = value if value.flags.c_contiguous else value.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
    flat = value.reshape(-1).view(np.uint8) if value.size else b""
    data = b"".join([npy_header(value.dtype, value.shape), flat])
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=NUMPY, data=data)


_CHUNK = 1 << 16  # elements: the temporary product stays in cache


def weighted_mean(tensors: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Σ wᵢ·xᵢ / Σ wᵢ per key, as Flower's FedAvg computes it (float32 stays float32, integers become float64), with
    one pass over each reply into one buffer per key (Flower allocates two full-size temporaries per reply)."""
    total = float(sum(weights))
    out, tmp = {}, None
    for key in tensors[0]:
        first = np.asarray(tensors[0][key])
        dtype = np.result_type(first.dtype, np.float32)
        acc = np.array(first, dtype=dtype)  # an ndarray even for a 0-d tensor (np.multiply would give a scalar)
        acc *= weights[0] / total
        flat = acc.reshape(-1)  # a view: the sums below land in acc
        if tmp is None or tmp.dtype != dtype:
            tmp = np.empty(_CHUNK, dtype)
        for other, weight in zip(tensors[1:], weights[1:]):
            src, factor = np.asarray(other[key]).reshape(-1), weight / total
            for i in range(0, flat.size, _CHUNK):
                part = tmp[: min(_CHUNK, flat.size - i)]
                np.multiply(src[i : i + part.size], factor, out=part)
                flat[i : i + part.size] += part
        out[key] = acc
    return out


def held_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()  # not ArrayRecord(dict): that rebuilds each Array from its bytes
    for key, value in arrays.items():
        record[key] = HeldArray(value)
    return record
