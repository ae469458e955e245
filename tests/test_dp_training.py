"""common/dp_training.py: Opacus through fit's make_private hook (resnet18, and DenseNet-121 for the backbone registry's
Opacus-compatible form; 32 px, a dozen patients, a few steps)."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus.validators import ModuleValidator

from common.backbones.base import under
from common.config import PrivacyConfig
from common.dp_training import (
    DPConfigurationError,
    dp_site_refusal,
    site_sample_rate,
    start_dp_round,
)
from common.model import ModelConfig, build_model, exchange_keys
from common.privacy import (
    ExperimentBudgetExceeded,
    LedgerError,
    NoiseLimitExceeded,
    PrivacyBudgetExceeded,
    PrivacyLedger,
)
from common.training import fit
from tests.fakes import small, write_cache

torch.set_num_threads(1)
N = 12


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("dpcache"), n=N)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        yield


def privacy(tmp_path, **kw) -> PrivacyConfig:
    base = dict(dp=True, epsilon_budget=8.0, delta=1e-5, max_grad_norm=1.0, ledger=tmp_path / "privacy" / "ledger.json")
    base["ledger_record"] = tmp_path / "keys" / "secret-privacy-record.json"  # beside the pseudonym secret
    return PrivacyConfig(**{**base, **kw})


def ledger_of(priv: PrivacyConfig) -> PrivacyLedger:
    return PrivacyLedger(priv.ledger, record=priv.ledger_record)


def model(norm: str, trainable: str, arch: str = "resnet18"):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, norm=norm, trainable=trainable, image_size=32))


def dp_round(priv, **kw):
    args = dict(experiment="exp", n_site=N, batch_size=4, epochs=1, planned_rounds_total=4, purpose="round 1", seed=0)
    return start_dp_round(priv, **{**args, **kw})


# The last-stage group under both spellings: the alias on the ResNet (as in existing experiments), the canonical name
# on the DenseNet; and the head alone.
@pytest.mark.parametrize(
    "arch,trainable",
    [("resnet18", "layer4+head"), ("densenet121", "last-stage+head"), ("densenet121", "head")],
)
def test_frozen_batchnorm_and_frozen_tensors_unchanged_after_dp_fit(tmp_path, site, arch, trainable):
    net = model("batch", trainable, arch)
    paths = net.layout.trainable_paths(trainable)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    dp = dp_round(privacy(tmp_path))
    fit(net, site, range(N), small(), trainable=trainable, make_private=dp.make_private)
    arrays = dp.exchange_arrays(net)  # raises if a non-DP exchanged tensor moved
    dp.finish()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    batch_norms = {n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    dp_trained = {n for n, _ in net.named_parameters() if under(n, paths) and n.rsplit(".", 1)[0] not in batch_norms}
    assert changed and changed <= dp_trained  # no BatchNorm parameter or statistic moved, nothing frozen either
    assert all("running_" not in k and "num_batches" not in k for k in changed)
    assert any(k.startswith(net.layout.head + ".") for k in changed)
    if trainable != "head":  # the last stage's convolutions trained privately too
        assert any(k.startswith(net.layout.stages[-1] + ".") for k in changed)
    assert list(arrays) == exchange_keys(net, trainable)
    for k in arrays:
        if k not in dp_trained:
            assert torch.equal(torch.as_tensor(arrays[k]), before[k]), k
    # The round was charged once, at the site's q and the planned σ, for the steps actually taken.
    (entry,) = ledger_of(dp.privacy).history()
    assert (entry.sigma, entry.q, entry.steps) == (dp.sigma, dp.q, dp.steps) and dp.steps_taken() == dp.steps


def test_groupnorm_densenet_trains_a_dp_step_through_its_dense_blocks(tmp_path, site):
    """The usual DenseNet traps under Opacus (in-place ReLUs, torch.cat in the dense blocks, BatchNorm): the GroupNorm
    model trains its last dense block, norm5 and classifier privately, and nothing before them moves."""
    net = model("group", "last-stage+head", "densenet121").train()
    assert ModuleValidator.validate(net, strict=False) == []
    paths = net.layout.trainable_paths("last-stage+head")
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    dp = dp_round(privacy(tmp_path))
    res = fit(net, site, range(N), small(), trainable="last-stage+head", make_private=dp.make_private)
    arrays = dp.exchange_arrays(net)
    eps = dp.finish()
    assert res.steps >= 1 and dp.steps_taken() == dp.steps and 0 < eps <= 8.0
    changed = {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(under(k, paths) for k in changed)
    assert any(k.startswith("features.denseblock4.denselayer1.") for k in changed)  # the first layer of the block
    assert any(k.startswith("features.norm5.") for k in changed)
    assert list(arrays) == exchange_keys(net, "last-stage+head")
    assert all(torch.isfinite(v).all() for v in net.state_dict().values() if v.is_floating_point())


def test_release_refused_when_a_non_private_tensor_moved(tmp_path, site):
    net = model("batch", "head")
    dp = dp_round(privacy(tmp_path))
    fit(net, site, range(N), small(), trainable="head", make_private=dp.make_private)
    with torch.no_grad():
        net.layer4[0].bn1.running_mean.add_(1.0)  # what a BN in training mode would have done
        net.fc.weight.add_(0.0)
    dp.exchange_arrays(net)  # layer4 does not travel in "head" mode: nothing to refuse
    net2 = model("batch", "layer4+head")
    dp2 = dp_round(privacy(tmp_path), purpose="round 2")
    fit(net2, site, range(N), small(), trainable="layer4+head", make_private=dp2.make_private)
    with torch.no_grad():
        net2.layer4[0].bn1.running_mean.add_(1.0)
    with pytest.raises(Exception, match="non-private tensor"):
        dp2.exchange_arrays(net2)


def test_groupnorm_model_is_opacus_valid_and_trains_a_dp_step(tmp_path, site):
    for trainable in ("all", "layer4+head"):
        net = model("group", trainable).train()
        assert ModuleValidator.validate(net, strict=False) == []
    net50 = build_model(ModelConfig(arch="resnet50", norm="group", image_size=32)).train()
    assert ModuleValidator.validate(net50, strict=False) == []
    net = model("group", "all")
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    dp = dp_round(privacy(tmp_path))
    res = fit(net, site, range(N), small(), trainable="all", make_private=dp.make_private)
    eps = dp.finish()
    assert res.steps >= 1 and dp.steps_taken() == dp.steps
    assert 0 < eps <= 8.0 and eps == pytest.approx(ledger_of(dp.privacy).epsilon(1e-5))
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items() if k.startswith("layer1."))
    assert all(torch.isfinite(v).all() for v in net.state_dict().values() if v.is_floating_point())


def test_empty_poisson_batches_take_a_noise_step_and_keep_the_loss_finite(tmp_path, site):
    net = model("group", "head")
    # n_site far above the patients that train: most Poisson batches are empty.
    dp = dp_round(privacy(tmp_path, epsilon_budget=50.0), n_site=400, planned_rounds_total=1)
    res = fit(net, site, range(N), small(), trainable="head", make_private=dp.make_private)
    assert dp.steps == 100 and dp.steps_taken() == 100 and dp._loader.empty_steps > 0
    assert res.train_loss == res.train_loss  # not NaN: the reply would be rejected


def test_round_over_budget_refused_before_training_ledger_unchanged(tmp_path, site):
    priv = privacy(tmp_path, epsilon_budget=2.0)
    dp = dp_round(priv, planned_rounds_total=1)
    fit(model("group", "head"), site, range(N), small(), trainable="head", make_private=dp.make_private)
    ledger = ledger_of(priv)
    before = ledger.path.read_bytes()
    with pytest.raises(ExperimentBudgetExceeded):
        # The plan allowed one round; a second would cross the experiment's cap (half the site's ε = 2).
        dp_round(priv, purpose="round 2")
    assert ledger.path.read_bytes() == before
    # The same refusal inside fit (budget spent by another process between the check and the round): no step taken.
    late = dp_round(privacy(tmp_path, epsilon_budget=1e3), planned_rounds_total=1, experiment="other")
    late.privacy = priv  # same ledger, the site's real budget
    before = ledger.path.read_bytes()
    net = model("group", "head")
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PrivacyBudgetExceeded):
        fit(net, site, range(N), small(), trainable="head", make_private=late.make_private)
    assert ledger.path.read_bytes() == before
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert sum(e.steps for e in ledger.history()) == dp.steps


def test_site_refusals_and_site_only_settings(tmp_path):
    priv = privacy(tmp_path)
    assert dp_site_refusal(priv, {"arch": "resnet50", "norm": "batch", "trainable": "head"}) is None
    assert dp_site_refusal(priv, {"norm": "group", "trainable": "all"}) is None
    msg = dp_site_refusal(priv, {"norm": "batch", "trainable": "all"})
    assert msg and "group" in msg and str(tmp_path) not in msg
    assert dp_site_refusal(privacy(tmp_path, dp=False), {"norm": "batch", "trainable": "all"}) is None
    # An experiment that asks to switch DP off or to raise the budget is not a model: refused, never obeyed.
    asked = {"norm": "batch", "trainable": "head", "dp": False, "epsilon_budget": 1e9}
    assert "cannot read" in dp_site_refusal(priv, asked)
    with pytest.raises(DPConfigurationError):
        dp_round(privacy(tmp_path, dp=False))
    dp = dp_round(priv)
    assert dp.privacy is priv  # budget, δ and clip norm: the site's
    assert site_sample_rate(N, 4) == (1 / 3, 3) and site_sample_rate(3, 8) == (1.0, 1)


def test_batchnorm_all_refused_by_the_hook(tmp_path, site):
    net = model("batch", "all")
    dp = dp_round(privacy(tmp_path))
    with pytest.raises(DPConfigurationError):
        fit(net, site, range(N), small(), trainable="all", make_private=dp.make_private)
    assert ledger_of(dp.privacy).history() == []  # only the experiment's plan was stored


def test_delta_must_be_below_one_over_the_site_size(tmp_path):
    for delta in (1 / N, 0.1):  # δ >= 1/n: a mechanism that may release one patient's record outright
        priv = privacy(tmp_path, delta=delta)
        with pytest.raises(DPConfigurationError, match="not below 1/n") as err:
            dp_round(priv)
        assert str(tmp_path) not in str(err.value)
        assert not priv.ledger.exists()  # refused before anything was planned
    dp = dp_round(privacy(tmp_path, delta=1 / N * 0.99))
    assert dp.delta == 1 / N * 0.99  # the reply reports ε with this δ


def test_spend_rate_is_the_sites(tmp_path):
    # A plan that needs more noise than the site's maximum: refused, no ledger created, nothing trains.
    priv = privacy(tmp_path, max_noise_multiplier=2.0)
    with pytest.raises(NoiseLimitExceeded, match="at most 2"):
        dp_round(priv, planned_rounds_total=400)
    assert not priv.ledger.exists() and not priv.ledger_record.exists()
    # The experiment's own ε stays within the site's per-experiment cap over all its declared rounds.
    priv = privacy(tmp_path, epsilon_budget=8.0, max_epsilon_per_experiment=3.0)
    for r in range(3):  # each declared round admitted, then reserved as make_private does (no training needed)
        dp = dp_round(priv, planned_rounds_total=3, purpose=f"round {r}")
        dp.ledger.reserve(
            dp.sigma, dp.q, dp.steps, dp.purpose, 8.0, 1e-5, experiment=dp.experiment, experiment_epsilon=3.0
        )
    ledger = ledger_of(priv)
    assert 2.5 < ledger.epsilon(1e-5) <= 3.0
    before = ledger.path.read_bytes()
    with pytest.raises(ExperimentBudgetExceeded, match="planned-rounds"):  # a 4th round the plan did not declare
        dp_round(priv, planned_rounds_total=3, purpose="round 3")
    assert ledger.path.read_bytes() == before


def test_a_tampered_ledger_refuses_the_round_before_training(tmp_path):
    priv = privacy(tmp_path)
    dp_round(priv).ledger.charge(1.0, 1 / 3, 3, "earlier round")
    priv.ledger.unlink()  # deleted: a fresh budget if it counted as a new site
    with pytest.raises(LedgerError, match="missing") as err:
        dp_round(priv)
    assert str(tmp_path) not in str(err.value)
    assert not priv.ledger.exists()
    no_record = privacy(tmp_path / "other", ledger_record=None)
    assert "record" in dp_site_refusal(no_record, {"norm": "group", "trainable": "head"})
    with pytest.raises(LedgerError):
        dp_round(no_record)
