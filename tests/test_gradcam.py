"""Grad-CAM (common/gradcam.py): the map comes from the requested backbone layer and has the stack's shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import SpineFedError
from common.gradcam import default_layer, gradcam, save_overlay
from common.model import ModelConfig, apply_trainable, build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="resnet18", image_size=64))
    # Non-trivial BN statistics and head so maps are not degenerate at initialisation.
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 6, 64, 64))
    return m.eval()


@pytest.fixture(scope="module")
def stack():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (6, 64, 64)).astype(np.float32)
    x[:, 20:40, 20:40] -= 2.0
    return x


def test_default_layer_is_last_block_of_layer4(model):
    assert default_layer(model) == "layer4.1"
    assert default_layer(build_model(ModelConfig(arch="resnet50", image_size=32))) == "layer4.2"


def test_map_has_stack_shape_and_layer_resolution(model, stack):
    for layer, side in (("layer4.1", 2), ("layer3", 4), ("layer2.1", 8)):
        r = gradcam(model, stack, layer=layer, target="malignant")
        assert r.cam.shape == (64, 64) and r.cam.dtype == np.float32
        assert r.raw.shape == (side, side)
        assert r.cam.min() >= 0.0 and r.cam.max() <= 1.0
        assert r.layer == layer and 0.0 <= r.probability <= 1.0


def test_map_is_computed_from_the_requested_layer(model, stack):
    """Recompute Grad-CAM by hand from the layer's activation and gradient: the result must match."""
    layer = model.get_submodule("layer3")
    seen = {}
    h = layer.register_forward_hook(lambda mod, i, o: seen.setdefault("act", o))
    x = torch.from_numpy(stack)[None]
    logit = model(x)[0]
    h.remove()
    act = seen["act"]
    (grad,) = torch.autograd.grad(logit, act)
    expected = torch.relu((grad[0].mean(dim=(1, 2))[:, None, None] * act[0]).sum(0)).detach().numpy()
    r = gradcam(model, stack, layer="layer3", target="malignant")
    np.testing.assert_allclose(r.raw, expected, rtol=1e-4, atol=1e-6)
    other = gradcam(model, stack, layer="layer2", target="malignant")
    assert not np.allclose(other.cam, r.cam, atol=1e-3)


def test_benign_and_malignant_evidence_do_not_overlap(model, stack):
    mal = gradcam(model, stack, layer="layer2", target="malignant")
    ben = gradcam(model, stack, layer="layer2", target="benign")
    assert np.all(mal.raw * ben.raw == 0) and (mal.raw.sum() + ben.raw.sum()) > 0
    call = gradcam(model, stack, layer="layer2", target="call", threshold=0.0)
    assert call.target == "malignant"
    assert gradcam(model, stack, layer="layer2", target="call", threshold=1.0).target == "benign"


def test_weights_mode_and_grads_untouched_with_frozen_backbone(stack):
    torch.manual_seed(1)
    m = build_model(ModelConfig(arch="resnet18", image_size=64, trainable="head"))
    apply_trainable(m, "head")
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = gradcam(m, stack)  # every backbone parameter frozen: gradients still reach layer4
    assert r.raw.shape == (2, 2)
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def test_unknown_layer_and_bad_stack(model, stack):
    with pytest.raises(SpineFedError, match="layer4.1"):
        gradcam(model, stack, layer="layer9")
    with pytest.raises(ValueError, match="6, S, S"):
        gradcam(model, stack[:3])


def test_overlay_png_is_readable_size(model, stack, tmp_path):
    r = gradcam(model, stack)
    out = save_overlay(tmp_path / "cam.png", stack, r, (20, 20, 40, 40), title="t", footer="research use only")
    with Image.open(out) as im:
        w, h = im.size
    assert w >= 2 * 384 and h >= 2 * 384
