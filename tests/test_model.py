"""common/model.py and the backbone registry (common/backbones): shapes, pretrained loading (incl. the 3→6 channel
mapping), trainable groups, exchanged tensors, Opacus readiness, and that ResNets are what they were before the
registry. Tiny inputs (32 px) so a ResNet50 or DenseNet-121 forward stays well under a second on 2 shared cores."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch
import torchvision

from common.backbones import ARCHS, TRAINABLE, TRAINABLE_GROUPS, builder, trainable_group
from common.errors import SpineFedError
from common.model import (
    ADAPTER_INIT,
    ModelConfig,
    apply_trainable,
    build_model,
    exchange_keys,
    frozen_modules,
    get_exchange_arrays,
    is_norm_buffer,
    load_pretrained,
    set_exchange_arrays,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tv_weights(tmp_path_factory):
    """A torchvision ResNet50 state dict (random, 1000-class head) saved the way a user would save ImageNet weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet50_tv.pt"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


@pytest.mark.parametrize("mode", ["adapter", "conv1"])
@pytest.mark.parametrize("arch", ARCHS)  # every registered backbone
def test_output_is_one_logit_per_image(mode, arch):
    model = build_model(ModelConfig(arch=arch, input_mode=mode)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 6, 32, 32))
    assert out.shape == (3,)
    first = model.adapter if mode == "adapter" else model.get_submodule(model.layout.first_conv)
    assert first.in_channels == 6
    assert model.get_submodule(model.layout.first_conv).in_channels == (3 if mode == "adapter" else 6)
    assert model.get_submodule(model.layout.head).out_features == 1
    for path in (*model.layout.stages, *model.layout.last_stage, model.layout.gradcam_layer):
        model.get_submodule(path)  # every path the shared code uses exists


# Reference fingerprints of the ResNets as built before the backbone registry (#22 item 2), computed at commit 3ee3707
# by a script doing what `_fingerprint` below does (values rounded), torch 2.14.1 on CPU: sha256 (first 16 hex) of the
# exchanged keys with their shapes per trainable group, of every state-dict key and tensor after torch.manual_seed(0),
# the logits of a seeded 2×6×32×32 input, and the first torch.rand(1) after building (the global RNG a seeded run goes
# on with). Identical values mean the same parameter names, exchange order, initialisation and random draws
# afterwards: old checkpoints, pretrained files and experiments give the same results.
_BEFORE_REGISTRY = {
    ("resnet18", "adapter", "batch"): (
        {"all": "a2a81dc4ca32f57d", "layer4+head": "9bc93d96e1eb31a1", "head": "2c5db3f562243d00"},
        "daaacc9b9c3c9e89",
        [0.0510227, 0.0126068],
        0.108902,
    ),
    ("resnet18", "conv1", "group"): (
        {"all": "53c622578f52f37e", "layer4+head": "e70200822c52c208", "head": "2c5db3f562243d00"},
        "e83ee378b6b937f3",
        [0.6400029, 0.3229704],
        0.341225,
    ),
    ("resnet50", "adapter", "batch"): (
        {"all": "1e115e881569b4b9", "layer4+head": "82ce2a846f9df9ba", "head": "1976dbc70b7be7d1"},
        "bf8f188b00631131",
        [0.6138899, 0.6809544],
        0.92782,
    ),
    ("resnet50", "conv1", "group"): (
        {"all": "0244298854856489", "layer4+head": "1bbd4cf13dfdc678", "head": "1976dbc70b7be7d1"},
        "76ac1ddd5fff1e62",
        [0.6876692, 0.6224288],
        0.46962,
    ),
}


def _fingerprint(arch: str, mode: str, norm: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, input_mode=mode, norm=norm))
    rng_after = torch.rand(1).item()
    sd = model.state_dict()
    keys = {}
    for t in ("all", "layer4+head", "head"):
        listed = "\n".join(f"{k}:{tuple(sd[k].shape)}" for k in exchange_keys(model, t))
        keys[t] = hashlib.sha256(listed.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    torch.manual_seed(1)
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        logits = model.eval()(x).tolist()
    return keys, h.hexdigest()[:16], logits, rng_after


@pytest.mark.parametrize("case", list(_BEFORE_REGISTRY), ids="-".join)
def test_resnets_unchanged_by_the_registry(case):
    keys, weights, logits, rng_after = _fingerprint(*case)
    ref_keys, ref_weights, ref_logits, ref_rng_after = _BEFORE_REGISTRY[case]
    assert keys == ref_keys  # names, shapes and order of the exchanged tensors, each group
    assert weights == ref_weights  # parameter names and seeded initialisation
    assert logits == pytest.approx(ref_logits, abs=2e-6)  # the forward pass
    assert rng_after == pytest.approx(ref_rng_after, abs=1e-6)  # building drew as many random numbers as before


def test_registry_lookup_and_trainable_spellings():
    assert {"resnet18", "resnet34", "resnet50", "densenet121"} <= set(ARCHS)
    with pytest.raises(ValueError, match="densenet121"):  # the message lists what is registered
        builder("vgg16")
    with pytest.raises(ValueError, match="model.arch"):
        ModelConfig(arch="vgg16")
    assert TRAINABLE_GROUPS == ("all", "last-stage+head", "head")
    assert trainable_group("layer4+head") == "last-stage+head" and "layer4+head" in TRAINABLE
    for t in TRAINABLE:
        assert ModelConfig(trainable=t).trainable == t  # accepted and kept as written (fingerprints unchanged)
    with pytest.raises(ValueError, match="last-stage\\+head"):
        trainable_group("layer3+head")


def test_torchvision_weights_load_and_map_3_to_6_channels(tv_weights):
    sd = torch.load(tv_weights, weights_only=True)
    adapter = build_model(ModelConfig(input_mode="adapter", pretrained=tv_weights)).eval()
    conv1 = build_model(ModelConfig(input_mode="conv1", pretrained=tv_weights)).eval()
    for model in (adapter, conv1):
        assert torch.equal(model.layer3[2].conv2.weight, sd["layer3.2.conv2.weight"])
        assert torch.equal(model.layer4[0].bn1.running_var, sd["layer4.0.bn1.running_var"])
        assert model.fc.weight.shape == (1, 2048)  # 1000-class head dropped, fresh 1-logit head
    assert torch.equal(adapter.conv1.weight, sd["conv1.weight"])
    assert torch.equal(adapter.adapter.weight[:, :, 0, 0], ADAPTER_INIT)
    # 3→6: T1[0] (column 1) feeds R with 0.5 and B with 0.25; T2[+1] (column 5) feeds G and B with 0.25 and 0.125.
    w = sd["conv1.weight"]
    assert torch.allclose(conv1.conv1.weight[:, 1], 0.5 * w[:, 0] + 0.25 * w[:, 2])
    assert torch.allclose(conv1.conv1.weight[:, 5], 0.25 * w[:, 1] + 0.125 * w[:, 2])
    # Both input modes start from the same function of the 6-channel stack.
    conv1.fc.load_state_dict(adapter.fc.state_dict())
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert torch.allclose(adapter(x), conv1(x), atol=1e-4)


@pytest.mark.parametrize("legacy", [False, True])
def test_torchvision_densenet_weights_load_in_both_modes(tmp_path, legacy):
    """A torchvision densenet121 file (random weights; the published ones use the older `norm.1` key layout) loads
    like a ResNet one: backbone in, 1000-class head dropped, 3→6 channels in conv1 mode, same function either way."""
    torch.manual_seed(0)
    sd = torchvision.models.densenet121().state_dict()
    saved = (
        {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in sd.items()} if legacy else sd
    )
    assert legacy == ("features.denseblock1.denselayer1.norm.1.weight" in saved)
    path = tmp_path / "densenet121_tv.pt"
    torch.save(saved, path)
    adapter = build_model(ModelConfig(arch="densenet121", pretrained=path)).eval()
    conv1 = build_model(ModelConfig(arch="densenet121", input_mode="conv1", pretrained=path)).eval()
    for model in (adapter, conv1):
        block = model.features.denseblock4.denselayer16
        assert torch.equal(block.conv2.weight, sd["features.denseblock4.denselayer16.conv2.weight"])
        assert torch.equal(model.features.norm5.running_var, sd["features.norm5.running_var"])
        assert model.classifier.weight.shape == (1, 1024)
    assert torch.equal(adapter.features.conv0.weight, sd["features.conv0.weight"])
    w = sd["features.conv0.weight"]
    assert torch.allclose(conv1.features.conv0.weight[:, 1], 0.5 * w[:, 0] + 0.25 * w[:, 2])
    conv1.classifier.load_state_dict(adapter.classifier.state_dict())
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert torch.allclose(adapter(x), conv1(x), atol=1e-4)
    with pytest.raises(SpineFedError, match="not a resnet18 state dict"):  # a DenseNet file into a ResNet
        build_model(ModelConfig(arch="resnet18", pretrained=path))


def test_group_norm_takes_affine_parameters_only(tv_weights):
    sd = torch.load(tv_weights, weights_only=True)
    model = build_model(ModelConfig(norm="group", pretrained=tv_weights))
    assert isinstance(model.bn1, torch.nn.GroupNorm)
    assert torch.equal(model.layer1[0].bn2.weight, sd["layer1.0.bn2.weight"])
    assert not any(is_norm_buffer(k) for k in model.state_dict())


def test_own_state_dict_round_trips_with_head(tmp_path):
    torch.manual_seed(1)
    src = build_model(ModelConfig(arch="resnet18", input_mode="conv1"))
    path = tmp_path / "own.pt"
    torch.save(src.state_dict(), path)
    dst = build_model(ModelConfig(arch="resnet18", input_mode="conv1", pretrained=path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_bad_weight_files_are_clear_errors(tmp_path, tv_weights):
    model = build_model(ModelConfig(arch="resnet18"))
    with pytest.raises(SpineFedError, match="not found"):
        load_pretrained(model, tmp_path / "absent.pt", "adapter")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(SpineFedError, match="not a readable"):
        load_pretrained(model, tmp_path / "junk.pt", "adapter")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SpineFedError, match="not a resnet18 state dict"):
        load_pretrained(model, tmp_path / "other.pt", "adapter")
    with pytest.raises(SpineFedError, match="resnet18"):  # a ResNet50 file into a ResNet18
        load_pretrained(model, tv_weights, "adapter")
    with pytest.raises(ValueError):
        load_pretrained(model, tv_weights, "conv1")


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_layer4_alias_is_the_last_stage_group(arch):
    model = build_model(ModelConfig(arch=arch))
    assert exchange_keys(model, "layer4+head") == exchange_keys(model, "last-stage+head")
    assert frozen_modules(model, "layer4+head") == frozen_modules(model, "last-stage+head")
    last = model.layout.stages[-1]
    assert any(k.startswith(last + ".") for k in exchange_keys(model, "last-stage+head"))
    with pytest.raises(ValueError, match="trainable"):
        exchange_keys(model, "layer3")


@pytest.mark.parametrize("trainable", ["head", "last-stage+head", "all"])
def test_densenet_groups_train_the_last_block_and_classifier(trainable):
    model = build_model(ModelConfig(arch="densenet121", trainable=trainable))
    keys = exchange_keys(model, trainable)
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    tops = {
        "head": {"classifier"},
        "last-stage+head": {"features.denseblock4", "features.norm5", "classifier"},
        "all": None,
    }[trainable]

    def inside(k):
        return tops is None or any(k.startswith(t + ".") for t in tops)

    assert set(keys) == params | {b for b, _ in model.named_buffers() if inside(b)}
    assert params == {n for n, _ in model.named_parameters() if inside(n)}
    assert keys == [k for k in model.state_dict() if k in set(keys)]  # state-dict order
    if trainable == "last-stage+head":
        assert any(k.startswith("features.denseblock4.denselayer16.norm1.running_") for k in keys)
        assert not any(k.startswith("features.transition3.") for k in keys)
        model.train()  # frozen blocks (and their BatchNorm) stay in eval mode
        assert not model.features.denseblock3.training and not model.features.transition3.norm.training
        assert model.features.denseblock4.denselayer1.norm1.training and model.classifier.training


@pytest.mark.parametrize("trainable", ["head", "layer4+head", "all"])
def test_exchange_keys_are_trainable_params_and_their_bn_buffers(trainable):
    model = build_model(ModelConfig(arch="resnet18", trainable=trainable))
    keys = exchange_keys(model, trainable)
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    trained_modules = {"head": {"fc"}, "layer4+head": {"layer4", "fc"}}.get(trainable)
    expected_buffers = {b for b in buffers if trained_modules is None or b.split(".")[0] in trained_modules}
    if trainable == "head":
        assert keys == ["fc.weight", "fc.bias"]
    assert set(keys) == params | expected_buffers
    assert keys == [k for k in model.state_dict() if k in set(keys)]  # state-dict order
    if trainable != "all":
        assert not model.layer1.training and not model.adapter.training
        model.train()  # SpineNet.train keeps the frozen part in eval mode
        assert not model.layer3[0].bn1.training and model.fc.training


def test_exchange_round_trip_and_strictness():
    torch.manual_seed(2)
    a = build_model(ModelConfig(arch="resnet18", trainable="layer4+head"))
    b = build_model(ModelConfig(arch="resnet18", trainable="layer4+head"))
    arrays = get_exchange_arrays(a, "layer4+head")
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    set_exchange_arrays(b, arrays, "layer4+head")
    for k in arrays:
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])
    assert not torch.equal(a.layer1[0].conv1.weight, b.layer1[0].conv1.weight)  # frozen part untouched
    missing = dict(arrays)
    del missing["fc.bias"]
    with pytest.raises(ValueError, match="fc.bias"):
        set_exchange_arrays(b, missing, "layer4+head")
    with pytest.raises(ValueError, match="layer1.0.conv1.weight"):
        set_exchange_arrays(b, {**arrays, "layer1.0.conv1.weight": np.zeros(1)}, "layer4+head")
    with pytest.raises(ValueError, match="fc.weight"):
        set_exchange_arrays(b, {**arrays, "fc.weight": np.zeros((2, 512), np.float32)}, "layer4+head")


def test_is_norm_buffer():
    assert is_norm_buffer("layer4.0.bn1.running_mean")
    assert is_norm_buffer("bn1.num_batches_tracked")
    assert not is_norm_buffer("layer4.0.bn1.weight")


def test_frozen_part_gets_no_gradient():
    model = build_model(ModelConfig(arch="resnet18", trainable="head"))
    model.train()
    apply_trainable(model, "head")
    model(torch.randn(2, 6, 32, 32)).sum().backward()
    assert model.fc.weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc."))


@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_group_norm_model_passes_opacus_validator_and_has_no_inplace_op(arch):
    from opacus.validators import ModuleValidator

    model = build_model(ModelConfig(arch=arch, norm="group"))
    model.train()
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # No module the forward pass runs works in place (torchvision's DenseNet ReLUs do; Opacus' hooks break on them).
    called = []
    hooks = [m.register_forward_hook(lambda m, i, o: called.append(m)) for m in model.modules()]
    model(torch.randn(2, 6, 32, 32))
    for h in hooks:
        h.remove()
    assert called and not [m for m in called if getattr(m, "inplace", False)]


def test_config_round_trip(tmp_path):
    cfg = ModelConfig(arch="resnet18", input_mode="conv1", norm="group", trainable="head", pretrained=tmp_path / "w.pt")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg.to_dict()["pretrained"], str)
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="trainable"):
        ModelConfig(trainable="layer3")
