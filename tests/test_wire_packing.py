"""Wire packing (common/transfer.py): every tensor of a message in one buffer, named tensors back exactly."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from common.model import ModelConfig, build_model, get_exchange_arrays
from common.transfer import LAYOUT, PACKED, encode_arrays, npy_view, pack_arrays, pack_npy, unpack_arrays


def test_a_resnet50_update_travels_as_two_arrays_and_comes_back_bit_identical():
    torch.manual_seed(0)
    arrays = get_exchange_arrays(build_model(ModelConfig(arch="resnet50", image_size=32)), "all")
    for wire in (dict(arrays), encode_arrays(arrays, "float16")):
        packed = pack_arrays(wire)
        assert set(packed) == {PACKED, LAYOUT} and packed[PACKED].dtype == np.uint8
        assert packed[PACKED].nbytes == sum(np.asarray(a).nbytes for a in wire.values())
        back = unpack_arrays(packed)
        assert set(back) == set(wire) and len(back) == 322
        for key, value in wire.items():
            value = np.asarray(value)
            assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
            assert back[key].tobytes() == value.tobytes(), key
            assert back[key].flags.writeable and back[key].flags.aligned


def test_zero_dimensional_and_empty_inputs_keep_their_shape():
    back = unpack_arrays(pack_arrays({"n": np.array(5, np.int64), "e": np.zeros((0, 3), np.float32)}))
    assert back["n"].shape == () and int(back["n"]) == 5 and back["e"].shape == (0, 3)
    assert unpack_arrays(pack_arrays({})) == {}


def test_unpacked_messages_pass_through():
    arrays = {"w": np.ones(3, np.float32)}
    assert unpack_arrays(arrays) is not arrays and unpack_arrays(arrays).keys() == {"w"}


def _layout(entries) -> np.ndarray:
    return np.frombuffer(json.dumps(entries).encode(), dtype=np.uint8)


@pytest.mark.parametrize(
    ("arrays", "why"),
    [
        ({PACKED: np.zeros(8, np.uint8)}, "exactly the arrays"),
        ({PACKED: np.zeros(8, np.uint8), LAYOUT: _layout([]), "x": np.zeros(1)}, "exactly the arrays"),
        ({PACKED: np.zeros(2, np.float32), LAYOUT: _layout([])}, "not a flat byte array"),
        ({PACKED: np.zeros(8, np.uint8), LAYOUT: np.frombuffer(b"{not json", np.uint8)}, "unreadable layout"),
        ({PACKED: np.zeros(8, np.uint8), LAYOUT: _layout([["w", "object", [1]]])}, "unreadable layout|bad layout"),
        ({PACKED: np.zeros(8, np.uint8), LAYOUT: _layout([["w", "complex64", [1]]])}, "bad layout entry"),
        ({PACKED: np.zeros(8, np.uint8), LAYOUT: _layout([["w", "float32", [-2]]])}, "bad layout entry"),
        ({PACKED: np.zeros(8, np.uint8), LAYOUT: _layout([["w", "float32", [1]], ["w", "float32", [1]]])}, "bad"),
        ({PACKED: np.zeros(8, np.uint8), LAYOUT: _layout([["w", "float32", [3]]])}, "more bytes than were sent"),
        ({PACKED: np.zeros(8, np.uint8), LAYOUT: _layout([["w", "float32", [1]]])}, "fewer bytes than were sent"),
    ],
)
def test_a_layout_that_does_not_describe_the_buffer_exactly_is_refused(arrays, why):
    with pytest.raises(ValueError, match=why):
        unpack_arrays(arrays)


def _saved(a: np.ndarray) -> bytes:
    fp = io.BytesIO()
    np.save(fp, a, allow_pickle=False)
    return fp.getvalue()


def test_the_one_copy_npy_path_writes_what_np_save_writes_and_reads_it_without_a_copy():
    torch.manual_seed(0)
    arrays = get_exchange_arrays(build_model(ModelConfig(arch="resnet18", image_size=32)), "all")
    arrays |= {"n": np.array(7, np.int64), "e": np.zeros((0, 2), np.float16), "h": np.ones(3, np.float16)}
    packed, fast = pack_arrays(arrays), pack_npy(arrays)
    for key in (PACKED, LAYOUT):
        size, data = fast[key]
        assert data == _saved(packed[key]) and size == packed[key].size  # a Flower Array's bytes, as np.save makes
        view = npy_view(data)
        assert view.base is not None and not view.flags.writeable  # a view of the message, not a copy
        assert np.array_equal(view, packed[key])
    back = unpack_arrays({k: npy_view(d) for k, (_, d) in fast.items()}, copy=False)
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert back[key].tobytes() == np.asarray(value).tobytes(), key
    copied = unpack_arrays({k: npy_view(d) for k, (_, d) in fast.items()})
    assert all(a.flags.writeable and a.flags.owndata for a in copied.values())


def test_npy_view_reads_fortran_order_and_refuses_what_is_not_a_plain_npy_array():
    f = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert np.array_equal(npy_view(_saved(f)), f)
    data = _saved(np.arange(4, dtype=np.float32))
    fp = io.BytesIO()
    np.save(fp, np.array([None, 1], dtype=object), allow_pickle=True)
    for bad in (b"", b"not npy at all", data[:-1], data + b"\0", fp.getvalue()):
        with pytest.raises(ValueError):
            npy_view(bad)


def test_the_coordinator_reads_a_reply_in_place_and_flowers_fedavg_averages_held_tensors():
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from server.wire import HeldArray, held_record, packed_record, read_packed

    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, np.int64)}
    b = {"w": np.full((2, 3), 10, np.float32), "n": np.array(5, np.int64)}
    record = packed_record(a)
    got = read_packed(record)
    assert got["w"].base is not None and not got["w"].flags.writeable  # no copy of the reply
    held = HeldArray(got["w"])
    assert held.numpy() is got["w"] and np.array_equal(np.load(io.BytesIO(held.data)), a["w"])
    replies = [
        RecordDict({"arrays": held_record(read_packed(packed_record(x))), "m": MetricRecord({"num-examples": n})})
        for x, n in ((a, 1), (b, 3))
    ]
    mean = aggregate_arrayrecords(replies, "num-examples")
    assert np.allclose(mean["w"].numpy(), (a["w"] + 3 * b["w"]) / 4)
    assert float(mean["n"].numpy()) == 4.5
    half = read_packed(packed_record(a, "float16"))
    assert half["w"].dtype == np.float16 and half["n"].dtype == np.int64


def test_the_one_pass_weighted_mean_is_flowers_fedavg_bit_for_bit():
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from server.wire import held_record, weighted_mean

    rng = np.random.default_rng(3)
    shapes = {"w": (300, 257), "b": (257,), "n": ()}
    replies = [
        {
            k: (rng.normal(size=s).astype(np.float32) if k != "n" else np.array(i + 2, np.int64))
            for k, s in shapes.items()
        }
        for i in range(4)
    ]
    weights = [3, 1, 7, 2]
    ours = weighted_mean(replies, weights)
    contents = [RecordDict({"a": held_record(r), "m": MetricRecord({"n": w})}) for r, w in zip(replies, weights)]
    flower = aggregate_arrayrecords(contents, "n")
    for key in shapes:
        assert ours[key].dtype == flower[key].numpy().dtype and ours[key].shape == flower[key].numpy().shape
        assert ours[key].tobytes() == flower[key].numpy().tobytes(), key
