"""Experiment configuration (experiment.yaml), owned by the coordinator and validated once on load.

The model and train sections are passed through as dicts (common/model.py and common/training.py validate their own
fields); everything the federation itself needs is typed here. The fingerprint identifies what a checkpoint belongs
to: it covers everything except `rounds` and `quorum`, so a finished run can be extended with more rounds and resumed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from common.backbones import TRAINABLE  # the registry's spellings, aliases included
from common.config import Section, read_yaml
from common.transfer import TRANSFER_DTYPES
from server.strategies import STRATEGIES as REGISTERED

STRATEGIES = tuple(REGISTERED)
EVALUATE = ("final", "every-round", "none")


@dataclass(frozen=True)
class StrategyConfig:
    """Server aggregation: a strategy registered by name (server/strategies.py) and its parameters. FedBN keeps each
    site's own BatchNorm tensors at the site (see server/strategy.py).

    The parameters of the first four strategies are fields (they are in every experiment's fingerprint and results
    since then); those of strategies registered later are in `params` (`to_dict` lists them beside the others, as
    experiment.yaml does)."""

    name: str = "fedavg"
    fedbn: bool = False
    proximal_mu: float = 0.0
    eta: float = 0.01  # server learning rate (FedAdam/FedYogi)
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    params: dict = field(default_factory=dict)

    def value(self, key: str):
        """A parameter of the strategy, wherever it is kept."""
        return getattr(self, key) if key in _FIELDS else self.params[key]

    @classmethod
    def from_section(cls, st: Section) -> StrategyConfig:
        """Validate experiment.yaml's `strategy` section against the registry; errors name the file and the key."""
        name = st.choice("name", STRATEGIES, "fedavg")
        own = REGISTERED[name].params
        for key in st.data:
            if key in ("name", "fedbn") or key in _FIELDS or key in own:
                continue
            users = sorted(n for n, r in REGISTERED.items() if key in r.params)
            what = f"a parameter of {', '.join(users)}" if users else "an unknown key"
            raise st.fail(key, f"a parameter of strategy '{name}' ({', '.join(own) or 'it has none'}); this is {what}")
        params = {}
        for key, spec in own.items():
            if key in _FIELDS:
                continue
            value = st.data.get(key, spec.default)
            if not spec.accepts(value):
                raise st.fail(key, spec.expected(), value)
            params[key] = spec.kind(value)
        return cls(
            name=name,
            fedbn=st.bool("fedbn", False),
            proximal_mu=st.float("proximal_mu", 0.0, lo=0.0),
            eta=st.float("eta", 0.01, lo=0.0),
            beta_1=st.float("beta_1", 0.9, lo=0.0, hi=1.0),
            beta_2=st.float("beta_2", 0.99, lo=0.0, hi=1.0),
            tau=st.float("tau", 1e-3, lo=0.0),
            params=params,
        )


_FIELDS = ("proximal_mu", "eta", "beta_1", "beta_2", "tau")


@dataclass(frozen=True)
class QuorumConfig:
    """How long the coordinator waits, and for how many sites, before it goes on without the others."""

    min_sites: int = 2
    join_timeout_s: float = 300.0  # waiting for sites to connect before a round
    round_timeout_s: float = 3600.0  # waiting for the replies of one round


@dataclass(frozen=True)
class FoldPlan:
    """Which patients a round trains on: all labelled ones (k = 0) or all but fold `held_out` of k site-made folds."""

    k: int = 0
    seed: int = 0
    held_out: int = -1


@dataclass(frozen=True)
class PlanConfig:
    """Which units a protocol run trains (server/protocols.py); not part of the fingerprint (a unit's training is
    the same whichever other units run).

    max_folds / max_held_out: 0 = all (a reduced plan for smoke tests runs the first N); local_only: the local-only
    baseline and its cross-site matrix (protocols `all`, and `tenfold` when set); final_model: train the deployable
    model on every patient after the validation protocols (`all`; `train` always does); repeats: how many tenfolds
    the `repeated-tenfold` protocol runs (server/repeated_tenfold.py).
    """

    max_folds: int = 0
    max_held_out: int = 0
    local_only: bool = True
    final_model: bool = True
    repeats: int = 3


@dataclass(frozen=True)
class InfluenceConfig:
    """How much one site can move the global model in a round (server/strategy.InfluenceBound).

    max_site_share: the most of a round's total aggregation weight one site's reply may carry (1: no cap; with n
    replies below 1/n every site weighs the same). max_update_ratio: an update whose distance from the global model
    (L2 over the exchanged float tensors other than BatchNorm running statistics) exceeds this multiple of the global
    model's own norm is scaled back to it (logged; generous by default: ordinary local training moves far less). A
    reply's num-examples above the site's census total is always rejected."""

    max_site_share: float = 1.0
    max_update_ratio: float = 1.0


@dataclass(frozen=True)
class ExperimentConfig:
    protocol: str = "train"
    rounds: int = 5
    local_epochs: int = 1
    lr: float = 1e-3
    seed: int = 0
    strategy: StrategyConfig = StrategyConfig()
    quorum: QuorumConfig = QuorumConfig()
    folds: FoldPlan = FoldPlan()
    evaluate: str = "final"
    min_cell: int = 5  # requested minimum cell count of the sites' histograms; a site's own privacy.min_cell is a floor
    # Wire precision of the exchanged tensors (common/transfer.py); aggregation and checkpoints stay float32.
    transfer_dtype: str = "float32"
    plan: PlanConfig = PlanConfig()
    influence: InfluenceConfig = InfluenceConfig()
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    file: Path | None = None

    @property
    def trainable(self) -> str:
        return str(self.model.get("trainable", "all"))

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("file")
        # As in experiment.yaml; nothing new for the strategies registered before `params` existed (their results and
        # fingerprints stay as they were).
        out["strategy"].update(out["strategy"].pop("params"))
        if self.protocol != "repeated-tenfold" and self.plan.repeats == PlanConfig.repeats:
            out["plan"].pop("repeats")  # as echoed before the key existed
        return out

    @classmethod
    def from_dict(cls, data: dict, file: Path | str = "<experiment>") -> ExperimentConfig:
        """Validate a mapping shaped like experiment.yaml; errors name the file and the key."""
        from server.protocol_registry import selectable  # the registry's kinds build on this module

        top = Section(data, Path(file))
        st, qu, fo = top.section("strategy"), top.section("quorum"), top.section("folds")
        pl, inf = top.section("plan"), top.section("influence")
        model, train = top.data.get("model") or {}, top.data.get("train") or {}
        if not isinstance(model, dict):
            raise top.fail("model", "a mapping", model)
        if not isinstance(train, dict):
            raise top.fail("train", "a mapping", train)
        if "trainable" in model and model["trainable"] not in TRAINABLE:
            raise top.fail("model.trainable", "one of " + ", ".join(TRAINABLE), model["trainable"])
        if model.get("pretrained"):  # relative to experiment.yaml, like every path in this project's configs
            model = {**model, "pretrained": str(Path(file).parent / Path(str(model["pretrained"])).expanduser())}
        d, dq, dp, di = cls(), QuorumConfig(), PlanConfig(), InfluenceConfig()  # defaults live in the dataclasses
        k = fo.int("k", d.folds.k, lo=0, hi=100)
        if k == 1:
            raise fo.fail("k", "0 (no folds) or at least 2", k)
        held_out = fo.int("held_out", d.folds.held_out, lo=-1, hi=99)
        if held_out >= k and k:
            raise fo.fail("held_out", f"-1 or a fold in [0, {k - 1}]", held_out)
        quorum = QuorumConfig(
            min_sites=qu.int("min_sites", dq.min_sites, lo=1, hi=1000),
            join_timeout_s=qu.float("join_timeout_s", dq.join_timeout_s, lo=0.0),
            round_timeout_s=qu.float("round_timeout_s", dq.round_timeout_s, lo=1.0),
        )
        return cls(
            protocol=top.choice("protocol", selectable(), d.protocol),
            rounds=top.int("rounds", d.rounds, lo=1, hi=10000),
            local_epochs=top.int("local_epochs", d.local_epochs, lo=1, hi=1000),
            lr=top.float("lr", d.lr, lo=0.0),
            seed=top.int("seed", d.seed, lo=0),
            strategy=StrategyConfig.from_section(st),
            quorum=quorum,
            folds=FoldPlan(k=k, seed=fo.int("seed", d.folds.seed, lo=0), held_out=held_out),
            evaluate=top.choice("evaluate", EVALUATE, d.evaluate),
            min_cell=top.int("min_cell", d.min_cell, lo=1, hi=1000),
            transfer_dtype=top.choice("transfer_dtype", TRANSFER_DTYPES, d.transfer_dtype),
            plan=PlanConfig(
                max_folds=pl.int("max_folds", dp.max_folds, lo=0, hi=100),
                max_held_out=pl.int("max_held_out", dp.max_held_out, lo=0, hi=10000),
                local_only=pl.bool("local_only", dp.local_only),
                final_model=pl.bool("final_model", dp.final_model),
                repeats=pl.int("repeats", dp.repeats, lo=2, hi=100),
            ),
            influence=InfluenceConfig(
                max_site_share=inf.float("max_site_share", di.max_site_share, lo=0.01, hi=1.0),
                max_update_ratio=inf.float("max_update_ratio", di.max_update_ratio, lo=1e-6),
            ),
            model=dict(model),
            train=dict(train),
            file=Path(file),
        )

    def fingerprint(self) -> str:
        """sha256 of the canonical experiment without `rounds`, `quorum` and `plan` (extending a run, waiting longer
        for sites, or running more units keeps a checkpoint valid: none changes what a round computes).

        `transfer_dtype` and `influence` count (they change what a round computes) but are left out at their defaults,
        so that fingerprints, checkpoints and evaluation tags made before the keys existed stay valid."""
        data = self.to_dict()
        data.pop("rounds")
        data.pop("quorum")
        data.pop("plan")
        if data["transfer_dtype"] == "float32":
            data.pop("transfer_dtype")
        if self.influence == InfluenceConfig():  # as transfer_dtype: fingerprints from before the key stay valid
            data.pop("influence")
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def with_(self, **changes) -> ExperimentConfig:
        return replace(self, **changes)


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Load and validate experiment.yaml."""
    path = Path(path).resolve()
    return ExperimentConfig.from_dict(read_yaml(path), path)
