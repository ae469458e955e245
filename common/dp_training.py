"""Differentially private local training with Opacus, plugged into `common.training.fit` through its hooks.

Use (one DP round; the ClientApp's train handler):

    refusal = dp_site_refusal(site.config.privacy, cfg["model"])        # before loading anything
    if refusal: raise SiteRefusal(refusal)
    dp = start_dp_round(site.config.privacy, experiment=..., n_site=..., batch_size=..., epochs=...,
                        planned_steps_total=..., purpose="tenfold fold 3 round 2")
    # may raise PrivacyBudgetExceeded (or its subclasses), LedgerError, DPConfigurationError: all safe to send
    result = fit(model, data, idx, tcfg, trainable=..., make_private=dp.make_private)
    arrays = dp.exchange_arrays(model)   # the exchanged tensors; raises if a non-DP tensor changed
    epsilon = dp.finish()                # ε spent by the site so far (RDP), for the reply's `epsilon` metric

What happens, and why:
- Sampling: Poisson, at a sample rate fixed per site and batch size, q = 1/k with k = round(n_site / batch_size)
  steps per epoch, whatever subset (fold, inner split) trains; each patient's inclusion is an independent draw with
  probability q, which is what the accountant assumes, and a q that does not move between folds keeps the ledger at
  one entry per experiment. "One epoch" is k steps: every training sample is drawn once in expectation.
- Noise: σ fixed once per experiment by the ledger's plan (common/privacy.py) for the declared total steps, never per
  round, by the site's policy: the site's budget, its per-experiment cap (privacy.max_epsilon_per_experiment) and its
  noise limit (privacy.max_noise_multiplier); a task that needs more noise than the limit is refused, never trained
  on noise. The steps of a round are reserved in the ledger (locked check + charge) inside `make_private`, before the
  first step: over the site's budget or the experiment's cap, the round is refused and the ledger untouched. The
  PrivacyEngine's own accountant only confirms afterwards that no more steps were taken than reserved.
- δ: the site's, and below 1/n for its n patients (else refused); DPRound.delta carries it to the reply with ε.
- Ledger: the site's ledger and its tamper-evident record (privacy.ledger, privacy.ledger_record); a ledger that is
  missing, emptied, replaced or rolled back is refused (LedgerError) before anything trains.
- Randomness: the noise and the Poisson draws come from generators seeded from the OS (os.urandom), never from the
  experiment's seed: a coordinator who knew the noise could subtract it. (Opacus' secure_mode needs torchcsprng,
  not installed here; pass a generator of your own in production if it is.)
- Memory: BatchMemoryManager caps physical batches (default: the batch size); logical Poisson batches larger than
  that are split and their clipped gradients summed before the one noisy step.
- Data path: the Poisson draws are Opacus' own sampler's, an epoch's at a time on the host; fit's loader gathers
  the batches on the training device from stacks already there (no per-step copy or sync on a GPU).
- Norms: GroupNorm trains privately. BatchNorm cannot (it mixes samples): with norm "batch" every BatchNorm is frozen
  in eval mode, its affine parameters out of the optimizer, re-applied before every forward (fit calls `train()` and
  `apply_trainable` every epoch, which would otherwise put the last stage's BN back in training mode), so its buffers
  and parameters leave the site exactly as they arrived. "all" with BatchNorm is refused: every convolution would move
  under statistics frozen for the old weights.
- Only DP-trained tensors change: `exchange_arrays` compares every exchanged tensor that is not a DP-trained
  parameter with its value at `make_private` and raises if one moved.
Under DP nothing derived from private labels scales the gradients or picks the release: fit takes the class weight
the site declares (privacy.class_weight, public) and releases the last epoch. Not covered by the guarantee (report
it; deploy/DATA_FLOW.md lists them): every evaluation output, and the counts (the site's patient count, which sets
q, is declared public).
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn

from common.backbones import TRAINABLE, trainable_group
from common.config import PrivacyConfig
from common.errors import SpineFedError
from common.model import ModelConfig, exchange_keys, get_exchange_arrays, unwrap
from common.privacy import PrivacyLedger

log = logging.getLogger(__name__)

_BATCHNORM = nn.modules.batchnorm._BatchNorm
# The groups that train with BatchNorm frozen, as the messages name them (registry spellings, the alias too).
_PARTIAL = " or ".join(repr(t) for t in TRAINABLE if trainable_group(t) != "all")


class DPConfigurationError(SpineFedError):
    """The experiment cannot be trained under this site's DP setting (message safe for the coordinator)."""


def dp_site_refusal(site_privacy: PrivacyConfig, experiment_model_cfg: Mapping | ModelConfig) -> str | None:
    """Why this site refuses the experiment's model under its DP setting, or None. Site values only decide.

    The experiment can ask for any model; it cannot switch the site's DP off or change its budget: this function
    reads `dp` from the site's PrivacyConfig and looks at nothing in the experiment but the model's norm and trainable
    subset. Messages name no patient, file or path (they go to the coordinator).
    """
    if not site_privacy.dp:
        return None
    try:
        cfg = (
            experiment_model_cfg
            if isinstance(experiment_model_cfg, ModelConfig)
            else ModelConfig.from_dict(experiment_model_cfg)
        )
    except (TypeError, ValueError) as exc:
        return f"this site trains with differential privacy and cannot read the experiment's model: {exc}"
    if cfg.norm == "batch" and cfg.trainable == "all":
        return (
            "this site trains with differential privacy: a batch-norm model can only train with its BatchNorm frozen "
            f"(trainable {_PARTIAL}); 'all' would need norm 'group'"
        )
    if site_privacy.ledger is None:
        return "this site trains with differential privacy but has no privacy ledger configured"
    if site_privacy.ledger_record is None:
        return "this site trains with differential privacy but has no privacy ledger record configured"
    return None


def site_sample_rate(n_site: int, batch_size: int) -> tuple[float, int]:
    """(q, steps per epoch): q = 1/k, k = max(1, round(n_site / batch_size)). Depends on the site and batch only."""
    if n_site < 1 or batch_size < 1:
        raise ValueError("n_site and batch_size must be >= 1")
    k = max(1, round(n_site / batch_size))
    return 1.0 / k, k


def _seeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
    return g


class _FrozenNormGuard(nn.Module):
    """Wraps the GradSampleModule: keeps every BatchNorm in eval mode with frozen affine parameters before each
    forward and after each train(), whatever the training loop did in between. `_module` so that unwrap() sees
    through it to the SpineNet."""

    def __init__(self, gsm: nn.Module, norms: list[nn.Module]):
        super().__init__()
        self._module = gsm
        self._norms = norms  # plain list: not registered again as submodules

    def _freeze(self) -> None:
        for m in self._norms:
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> _FrozenNormGuard:
        super().train(mode)
        self._freeze()
        return self

    def forward(self, *args, **kwargs):
        self._freeze()
        return self._module(*args, **kwargs)


class _PlannedLoader:
    """The physical-batch loader, limited to the epochs reserved in the ledger (an extra epoch would be unaccounted).

    An empty Poisson batch still takes its noisy step (skipping it would reveal that the batch was empty), but here,
    without a forward pass: fit's mean loss over an empty batch is NaN, and one NaN train-loss makes the coordinator
    reject the whole reply. The step is the one Opacus would take: zero per-sample gradients, clip, noise, update.
    """

    def __init__(self, loader, epochs: int, optimizer, params: list[nn.Parameter]):
        self.loader, self.epochs, self.started = loader, epochs, 0
        self.optimizer, self.params = optimizer, params
        self.empty_steps = 0
        self.augments = getattr(loader, "augments", False)  # fit must not augment these batches a second time

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.started >= self.epochs:
            raise SpineFedError(f"DP training: more epochs than the {self.epochs} reserved in the privacy ledger")
        self.started += 1
        return self._batches()

    def _batches(self):
        for batch in self.loader:
            if batch[0].shape[0] == 0:
                self.optimizer.zero_grad(set_to_none=True)
                for p in self.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.empty_steps += 1
                continue
            yield batch


@dataclass
class DPRound:
    """One DP training round at a site: the fit hook, the release check, the ledger. Built by start_dp_round."""

    privacy: PrivacyConfig
    sigma: float
    q: float
    steps_per_epoch: int
    epochs: int
    purpose: str
    experiment: str | None = None  # the plan's experiment id (start_dp_round sets it; None: the site budget only)
    max_physical_batch_size: int | None = None
    grad_sample_mode: str = "hooks"
    seed: int | None = None  # tests and benchmarks only: None draws from the OS
    eps_after: float | None = None
    _engine: PrivacyEngine | None = field(default=None, repr=False)
    _gsm: nn.Module | None = field(default=None, repr=False)
    _frozen: dict = field(default_factory=dict, repr=False)
    _dp_names: set = field(default_factory=set, repr=False)
    _trainable: str = "all"
    _loader: _PlannedLoader | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def delta(self) -> float:
        """The site's δ (reported with every ε)."""
        return self.privacy.delta

    @property
    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.privacy.ledger, record=self.privacy.ledger_record)

    def make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader) -> tuple:
        """fit's hook: reserve the round in the ledger, then wrap model/optimizer/loader for DP-SGD."""
        if self._engine is not None:
            raise SpineFedError("DP round already used: start a new round (one reservation per round)")
        net = unwrap(model)
        self._trainable = getattr(net, "trainable", "all")
        norms = [m for m in net.modules() if isinstance(m, _BATCHNORM)]
        if norms and self._trainable == "all":
            raise DPConfigurationError(
                f"differential privacy with BatchNorm needs a partial trainable subset ({_PARTIAL})"
            )
        for m in norms:
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        dp_params = [p for p in net.parameters() if p.requires_grad]
        if not dp_params:
            raise DPConfigurationError("nothing to train privately")
        keep = {id(p) for p in dp_params}
        for group in optimizer.param_groups:  # fit built the optimizer before the BatchNorm freeze
            group["params"] = [p for p in group["params"] if id(p) in keep]
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        self._dp_names = {name for name, p in net.named_parameters() if id(p) in keep}
        leaving = set(exchange_keys(net, self._trainable))
        sd = net.state_dict()
        self._frozen = {k: sd[k].detach().clone() for k in leaving if k not in self._dp_names}

        device = dp_params[0].device
        dataset = loader.dataset
        batch_size = loader.batch_size or max(1, round(self.q * len(dataset)))
        dl = DPDataLoader(dataset, sample_rate=self.q, generator=_seeded_generator(torch.device("cpu"), self.seed))
        dl.batch_sampler.steps = self.steps_per_epoch  # q is the site's, not 1/len(this subset's loader)
        engine = PrivacyEngine(accountant="rdp")
        gsm, dp_opt, dl = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=dl,
            noise_multiplier=self.sigma,
            max_grad_norm=self.privacy.max_grad_norm,
            poisson_sampling=False,  # dl already samples by Poisson at the site's q
            loss_reduction="mean",
            grad_sample_mode=self.grad_sample_mode,
            noise_generator=_seeded_generator(device, None if self.seed is None else self.seed + 1),
        )
        if not math.isclose(1 / len(dl), self.q, rel_tol=1e-12):
            raise SpineFedError("DP training: the loader's sample rate differs from the planned one")
        # Opacus scales the noisy sum by 1/expected batch; ours is q × this subset's size (the site's q).
        dp_opt.expected_batch_size = max(1, round(self.q * len(dataset)))
        physical = self.max_physical_batch_size or batch_size
        # BatchMemoryManager's __exit__ does nothing (opacus 1.6): the split loader stays valid for fit's epochs.
        with BatchMemoryManager(data_loader=dl, max_physical_batch_size=physical, optimizer=dp_opt) as phys_dl:
            pass
        # Reserve last, before the first step: a refused round takes no step and leaves the ledger untouched; a
        # wrapping failure above charges nothing.
        try:
            self.eps_after = self.ledger.reserve(
                self.sigma,
                self.q,
                self.steps,
                self.purpose,
                self.privacy.epsilon_budget,
                self.privacy.delta,
                experiment=self.experiment,
                experiment_epsilon=self.privacy.experiment_epsilon,
            )
        except BaseException:
            gsm._close()
            raise
        self._engine, self._gsm = engine, gsm
        log.info(
            "DP round %s: sigma=%g q=%g %d step(s), clip %g, physical batch <= %d",
            self.purpose,
            self.sigma,
            self.q,
            self.steps,
            self.privacy.max_grad_norm,
            physical,
        )
        # fit's DeviceBatches index the stacks where they live: Opacus' Poisson sampler (split into physical batches,
        # its skip signals queued in order) only supplies the index lists, an epoch's at a time, and the per-epoch
        # draw from its generator that its DataLoader made stays in place. Any other loader goes through Opacus'.
        if hasattr(loader, "with_batch_sampler"):
            batches = loader.with_batch_sampler(phys_dl.batch_sampler, phys_dl.generator)
        else:
            batches = phys_dl
        self._loader = _PlannedLoader(batches, self.epochs, dp_opt, dp_params)
        return _FrozenNormGuard(gsm, norms), dp_opt, self._loader

    def steps_taken(self) -> int:
        """Noisy optimizer steps the round actually took (from the PrivacyEngine's accountant)."""
        if self._engine is None:
            return 0
        return sum(n for _, _, n in self._engine.accountant.history)

    def exchange_arrays(self, model: nn.Module) -> OrderedDict[str, np.ndarray]:
        """The exchanged tensors, after checking that every one that is not DP-trained is unchanged."""
        net = unwrap(model)
        if self._engine is None:
            raise SpineFedError("DP round: nothing was trained privately, nothing to release")
        sd = net.state_dict()
        moved = [k for k, v in self._frozen.items() if not torch.equal(sd[k], v)]
        if moved:
            raise SpineFedError(f"DP release refused: {len(moved)} non-private tensor(s) changed, e.g. {moved[0]}")
        return get_exchange_arrays(net, self._trainable)

    def finish(self) -> float:
        """Close the round: check the steps taken against the reservation, remove Opacus' hooks; → ε spent (RDP)."""
        taken = self.steps_taken()
        if self._engine is not None:
            for s, q, _ in self._engine.accountant.history:
                if s != self.sigma or not math.isclose(q, self.q, rel_tol=1e-12):
                    raise SpineFedError("DP training: the accountant saw another noise or sample rate than planned")
        if taken > self.steps:  # cannot happen with _PlannedLoader; never under-count if it does
            self.ledger.charge(
                self.sigma, self.q, taken - self.steps, self.purpose + " (extra steps)", experiment=self.experiment
            )
        elif taken < self.steps:
            log.info(
                "DP round %s: %d of %d reserved step(s) taken; the ledger keeps all", self.purpose, taken, self.steps
            )
        if self._gsm is not None and hasattr(self._gsm, "_close"):
            self._gsm._close()
        return self.ledger.epsilon(self.privacy.delta)


def start_dp_round(
    privacy: PrivacyConfig,
    *,
    experiment: str,
    n_site: int,
    batch_size: int,
    epochs: int,
    planned_steps_total: int | None = None,
    planned_rounds_total: int | None = None,
    purpose: str,
    max_physical_batch_size: int | None = None,
    seed: int | None = None,
) -> DPRound:
    """Plan (or reuse) the experiment's σ and check this round fits the site's policy, before any data is loaded.

    n_site: the site's labelled patients (fixes q for every fold of the experiment, and bounds δ < 1/n_site).
    Declare the experiment's total DP steps at this site, or its total local rounds (models × rounds; steps = rounds
    × epochs × steps per epoch). Budget, per-experiment cap, noise limit, δ, clip norm and the ledger come from the
    site's PrivacyConfig only. Raises DPConfigurationError (DP off, δ >= 1/n_site), LedgerError (ledger missing,
    emptied, replaced, rolled back or unreadable), PrivacyBudgetExceeded (budget spent, or this round would cross
    it), NoiseLimitExceeded (the σ the plan needs exceeds privacy.max_noise_multiplier) or ExperimentBudgetExceeded
    (this round would cross the experiment's own cap); every message is safe for the coordinator, and the ledger
    stays byte-identical on refusal.
    """
    if not privacy.dp:
        raise DPConfigurationError("start_dp_round: this site's privacy.dp is off")
    if n_site < 1 or not privacy.delta < 1.0 / n_site:
        raise DPConfigurationError(
            f"differential privacy: this site's δ = {privacy.delta:g} is not below 1/n = {1.0 / max(n_site, 1):.3g} "
            f"for its {n_site} patient(s); the site does not train"
        )
    q, k = site_sample_rate(n_site, batch_size)
    steps = epochs * k
    if planned_steps_total is None:
        if planned_rounds_total is None:
            raise ValueError("declare planned_steps_total or planned_rounds_total")
        planned_steps_total = planned_rounds_total * steps
    planned_steps_total = max(int(planned_steps_total), steps)
    ledger = PrivacyLedger(privacy.ledger, record=privacy.ledger_record)
    sigma = ledger.plan(
        experiment,
        q,
        planned_steps_total,
        privacy.epsilon_budget,
        privacy.delta,
        experiment_epsilon=privacy.experiment_epsilon,
        max_noise_multiplier=privacy.max_noise_multiplier,
    )
    # The round itself (read only): a round the plan did not declare is refused here, before the data is loaded.
    ledger.admit(
        sigma,
        q,
        steps,
        privacy.epsilon_budget,
        privacy.delta,
        experiment=experiment,
        experiment_epsilon=privacy.experiment_epsilon,
    )
    return DPRound(
        privacy=privacy,
        sigma=sigma,
        q=q,
        steps_per_epoch=k,
        epochs=epochs,
        purpose=purpose,
        experiment=experiment,
        max_physical_batch_size=max_physical_batch_size,
        seed=seed,
    )
