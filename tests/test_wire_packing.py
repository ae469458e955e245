"""Wire packing (common/transfer.py): every tensor of a message in one buffer, named tensors back exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.model import ModelConfig, build_model, get_exchange_arrays
from common.transfer import LAYOUT, PACKED, encode_arrays, pack_arrays, unpack_arrays


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
