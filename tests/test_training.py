"""common/training.py and common/augment.py on a tiny learnable cache (32 px, 20 patients, seconds on 2 cores)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.augment import augment_batch
from common.model import ModelConfig, build_model, exchange_keys
from common.sitedata import SiteData
from common.training import FitResult, TrainConfig, choose_threshold, fit, predict, stack_dataset
from tests.fakes import SIZE, small, write_cache

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> SiteData:
    return write_cache(tmp_path_factory.mktemp("cache"))


def r18(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="resnet18", **kw))


def bce(labels, scores) -> float:
    p = np.clip(scores, 1e-6, 1 - 1e-6)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def test_choose_threshold_youden():
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)  # J = 0.5 at 0.8 (first)
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.6, 0.9]) == pytest.approx(0.6)
    assert choose_threshold([1, 1, 1], [0.1, 0.2, 0.3]) == 0.5
    assert choose_threshold([], []) == 0.5


def test_stack_dataset_resizes_and_labels(site):
    ds = stack_dataset(site, [0, 1, 2], image_size=16)
    x, y = ds[1]
    assert x.shape == (6, 16, 16) and x.dtype == torch.float32
    assert float(y) == 1.0
    assert len(site) == 20  # the skipped row is not a patient


def test_loss_falls_and_validation_stays_inside_training_indices(site):
    test = np.arange(16, 20)  # a held-out "test fold": fit must never see it
    train = np.arange(0, 16)
    model = r18()
    cfg = small(epochs=4, lr=2e-3)
    before = bce(site.labels[train], predict(model, site, train, cfg))
    res = fit(model, site, train, cfg)
    after = bce(site.labels[train], predict(model, site, train, cfg))
    assert isinstance(res, FitResult)
    assert after < before
    assert set(res.val_indices) <= set(train) and not set(res.val_indices) & set(test)
    assert res.n_examples + len(res.val_indices) == len(train)
    assert np.array_equal(res.val_labels, site.labels[res.val_indices])
    assert res.val_scores.shape == res.val_indices.shape and 0 <= res.threshold <= 1
    n, b = res.n_examples, cfg.batch_size
    per_epoch = n // b if n > b and n % b == 1 else math.ceil(n / b)  # fit drops a last batch of one
    assert 1 <= res.best_epoch <= 4 and res.steps == 4 * per_epoch and math.isfinite(res.train_loss)
    assert not model.training


@pytest.mark.parametrize("trainable", ["head", "layer4+head"])
def test_frozen_part_and_its_bn_buffers_do_not_change(site, trainable):
    model = build_model(ModelConfig(arch="resnet50", trainable=trainable))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, site, np.arange(8), small(val_fraction=0.0, augment=True), trainable=trainable)
    moved = exchange_keys(model, trainable)
    for k, v in model.state_dict().items():
        if k in moved:
            continue
        assert torch.equal(v, before[k]), f"frozen tensor {k} changed"
    assert not torch.equal(model.fc.weight, before["fc.weight"])
    if trainable == "layer4+head":
        assert not torch.equal(model.layer4[0].bn1.running_mean, before["layer4.0.bn1.running_mean"])
    assert all(p.grad is None for n, p in model.named_parameters() if n.split(".")[0] not in ("fc", "layer4"))


def test_fedprox_pulls_towards_global_weights(site):
    init = r18()
    global_state = {k: v.clone() for k, v in init.state_dict().items()}

    def distance(mu: float) -> float:
        model = r18()
        fit(
            model,
            site,
            np.arange(16),
            small(epochs=2, optimizer="sgd", lr=0.05, fedprox_mu=mu),
            global_state=global_state,
        )
        return sum(float(((p.detach() - global_state[n]) ** 2).sum()) for n, p in model.named_parameters())

    assert distance(5.0) < 0.9 * distance(0.0)


def test_sampler_imbalance_and_progress(site):
    calls = []
    fit(
        r18(trainable="head"),
        site,
        np.arange(12),
        small(imbalance="sampler"),
        trainable="head",
        progress=lambda s, t: calls.append((s, t)),
    )
    assert calls and calls[-1][0] == calls[-1][1] == len(calls)


def test_fit_is_deterministic(site):
    a, b = r18(trainable="head"), r18(trainable="head")
    cfg = small(augment=True)
    fit(a, site, np.arange(12), cfg, trainable="head")
    fit(b, site, np.arange(12), cfg, trainable="head")
    assert torch.equal(a.fc.weight, b.fc.weight)


def test_one_dp_step_through_the_make_private_hook(site):
    from opacus import PrivacyEngine

    model = build_model(ModelConfig(norm="group"))
    engine = PrivacyEngine(accountant="rdp")

    def make_private(m, opt, loader):
        return engine.make_private(
            module=m, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False
        )

    before = model.fc.weight.detach().clone()
    res = fit(model, site, np.arange(4), small(batch_size=2, val_fraction=0.0), make_private=make_private)
    assert res.steps == 2
    assert not torch.equal(model.fc.weight, before)
    assert engine.accountant.get_epsilon(delta=1e-5) > 0


def test_dp_over_frozen_batchnorm_leaves_its_buffers_unchanged(site):
    """Opacus calls model.train() itself; the frozen BatchNorm must still not update its statistics."""
    from opacus import PrivacyEngine

    model = r18(trainable="head")
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    engine = PrivacyEngine(accountant="rdp")

    def make_private(m, opt, loader):
        return engine.make_private(
            module=m, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
        )  # Poisson sampling: batches of varying size

    fit(
        model,
        site,
        np.arange(8),
        small(batch_size=4, val_fraction=0.0, epochs=2),
        trainable="head",
        make_private=make_private,
    )
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k


def test_augmentation_keeps_anterior_left_and_is_seeded():
    x = torch.zeros(16, 6, 32, 32)
    x[:, :, :, :16] = 1.0  # anterior half bright (columns run anterior → posterior)
    x[:, :, :8, :] += 0.5  # superior band
    out = augment_batch(x, torch.Generator().manual_seed(0))
    again = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert out.shape == x.shape
    assert (out[..., :16].mean(dim=(2, 3)) > out[..., 16:].mean(dim=(2, 3))).all()  # never flipped A-P
    assert (out[..., :8, :].mean(dim=(2, 3)) > out[..., 24:, :].mean(dim=(2, 3))).all()  # never flipped S-I


def test_train_config_round_trip():
    cfg = small(imbalance="sampler", image_size=64)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="imbalance"):
        TrainConfig(imbalance="smote")


def test_pretrain_round_trip_through_load_pretrained(site, tmp_path):
    """The stand-in file is torchvision layout, loads into both input modes and reproduces the pretrained function."""
    import json

    import torchvision

    from common.model import ADAPTER_INIT
    from simulations.pretrain import PROVENANCE, pretrain, sidecar_path

    out = pretrain(
        [site.cache], tmp_path / "w" / "standin.pt", ModelConfig(arch="resnet18", image_size=SIZE), small(epochs=1)
    )
    sd = torch.load(out, weights_only=True)
    assert sd["conv1.weight"].shape[1] == 3 and not any(k.startswith("adapter.") for k in sd)
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["provenance"] == PROVENANCE and meta["caches"][0]["patients"] == len(site)

    tv = torchvision.models.resnet18(num_classes=1)
    tv.load_state_dict(sd)  # strict: exactly torchvision's layout
    tv.eval()
    x = torch.randn(2, 6, SIZE, SIZE)
    with torch.no_grad():
        expected = tv(torch.einsum("oc,nchw->nohw", ADAPTER_INIT, x)).squeeze(-1)
        for mode in ("adapter", "conv1"):
            model = build_model(ModelConfig(arch="resnet18", input_mode=mode, pretrained=out)).eval()
            model.fc.load_state_dict(tv.fc.state_dict())  # the head is re-initialised on load, as for ImageNet
            assert torch.allclose(model(x), expected, atol=1e-4), mode
