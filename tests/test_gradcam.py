"""Grad-CAM (common/gradcam.py): the map comes from the requested backbone layer and has the stack's shape; the same
tests for a ResNet and a DenseNet (the default layer comes from the backbone registry's layout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import SpineFedError
from common.gradcam import default_layer, gradcam, save_overlay
from common.model import ModelConfig, apply_trainable, build_model

# arch → its default layer, then layers with the side of their map at 64 px (deep, middle, early).
LAYERS = {
    "resnet18": ("layer4.1", [("layer4.1", 2), ("layer3", 4), ("layer2.1", 8)]),
    "densenet121": (
        "features.norm5",
        [("features.norm5", 2), ("features.denseblock3", 4), ("features.denseblock2.denselayer12", 8)],
    ),
}


@pytest.fixture(scope="module", params=list(LAYERS))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def layers(arch):
    return LAYERS[arch]


@pytest.fixture(scope="module")
def model(arch):
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch=arch, image_size=64))
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


def test_default_layer_is_the_last_feature_map(model, layers, stack):
    assert default_layer(model) == layers[0]
    assert gradcam(model, stack).layer == layers[0]
    if model.arch == "resnet18":
        assert default_layer(build_model(ModelConfig(arch="resnet50", image_size=32))) == "layer4.2"


def test_map_has_stack_shape_and_layer_resolution(model, layers, stack):
    for layer, side in layers[1]:
        r = gradcam(model, stack, layer=layer, target="malignant")
        assert r.cam.shape == (64, 64) and r.cam.dtype == np.float32
        assert r.raw.shape == (side, side)
        assert r.cam.min() >= 0.0 and r.cam.max() <= 1.0
        assert r.layer == layer and 0.0 <= r.probability <= 1.0


def test_map_is_computed_from_the_requested_layer(model, layers, stack):
    """Recompute Grad-CAM by hand from the layer's activation and gradient: the result must match. The class the
    model calls, so that the map is not all zero (an untrained DenseNet sees only benign evidence)."""
    (_, _), (middle, _), (early, _) = layers[1]
    layer = model.get_submodule(middle)
    seen = {}
    h = layer.register_forward_hook(lambda mod, i, o: seen.setdefault("act", o))
    x = torch.from_numpy(stack)[None]
    logit = model(x)[0]
    h.remove()
    act = seen["act"]
    sign = 1.0 if torch.sigmoid(logit) >= 0.5 else -1.0
    (grad,) = torch.autograd.grad(sign * logit, act)
    expected = torch.relu((grad[0].mean(dim=(1, 2))[:, None, None] * act[0]).sum(0)).detach().numpy()
    r = gradcam(model, stack, layer=middle, target="call")
    assert r.target == ("malignant" if sign > 0 else "benign") and r.raw.max() > 0
    np.testing.assert_allclose(r.raw, expected, rtol=1e-4, atol=1e-6)
    other = gradcam(model, stack, layer=early, target="call")
    assert not np.allclose(other.cam, r.cam, atol=1e-3)


def test_benign_and_malignant_evidence_do_not_overlap(model, layers, stack):
    early = layers[1][2][0]
    mal = gradcam(model, stack, layer=early, target="malignant")
    ben = gradcam(model, stack, layer=early, target="benign")
    assert np.all(mal.raw * ben.raw == 0) and (mal.raw.sum() + ben.raw.sum()) > 0
    call = gradcam(model, stack, layer=early, target="call", threshold=0.0)
    assert call.target == "malignant"
    assert gradcam(model, stack, layer=early, target="call", threshold=1.0).target == "benign"


def test_weights_mode_and_grads_untouched_with_frozen_backbone(arch, stack):
    torch.manual_seed(1)
    m = build_model(ModelConfig(arch=arch, image_size=64, trainable="head"))
    apply_trainable(m, "head")
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = gradcam(m, stack)  # every backbone parameter frozen: gradients still reach the last feature map
    assert r.raw.shape == (2, 2)
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def test_unknown_layer_and_bad_stack(model, layers, stack):
    with pytest.raises(SpineFedError, match=layers[0]):  # names the backbone's own layers
        gradcam(model, stack, layer="layer9")
    with pytest.raises(ValueError, match="6, S, S"):
        gradcam(model, stack[:3])


def test_overlay_png_is_readable_size(model, stack, tmp_path):
    r = gradcam(model, stack)
    out = save_overlay(tmp_path / "cam.png", stack, r, (20, 20, 40, 40), title="t", footer="research use only")
    with Image.open(out) as im:
        w, h = im.size
    assert w >= 2 * 384 and h >= 2 * 384
