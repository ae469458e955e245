"""common/model.py: shapes, pretrained loading (incl. the 3→6 channel mapping), trainable subsets, exchanged tensors,
Opacus readiness. Tiny inputs (32 px) so a ResNet50 forward stays well under a second on 2 shared cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from common.errors import SpineFedError
from common.model import (
    ADAPTER_INIT,
    ModelConfig,
    apply_trainable,
    build_model,
    exchange_keys,
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
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_output_is_one_logit_per_image(mode, arch):
    model = build_model(ModelConfig(arch=arch, input_mode=mode)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 6, 32, 32))
    assert out.shape == (3,)
    first = model.adapter if mode == "adapter" else model.conv1
    assert first.in_channels == 6


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
    with pytest.raises(SpineFedError, match="not a ResNet"):
        load_pretrained(model, tmp_path / "other.pt", "adapter")
    with pytest.raises(SpineFedError, match="resnet18"):  # a ResNet50 file into a ResNet18
        load_pretrained(model, tv_weights, "adapter")
    with pytest.raises(ValueError):
        load_pretrained(model, tv_weights, "conv1")


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


def test_group_norm_resnet50_passes_opacus_validator():
    from opacus.validators import ModuleValidator

    model = build_model(ModelConfig(norm="group"))
    model.train()
    assert ModuleValidator.validate(model, strict=True) == []


def test_config_round_trip(tmp_path):
    cfg = ModelConfig(arch="resnet18", input_mode="conv1", norm="group", trainable="head", pretrained=tmp_path / "w.pt")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg.to_dict()["pretrained"], str)
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="trainable"):
        ModelConfig(trainable="layer3")
