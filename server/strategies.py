"""The aggregation strategies an experiment can name (`strategy.name` in experiment.yaml): Flower's own classes, each
registered with the parameters experiment.yaml may set. server/strategy.py puts the project's parts in front of the
chosen class; server/experiment.py validates the parameters on load.

| name | Flower class | weights replies by num-examples | bad sites it is built to withstand (n = accepted replies) |
|---|---|---|---|
| fedavg | FedAvg | yes (weighted mean) | none: one bad site moves the mean anywhere |
| fedprox | FedProx | yes (weighted mean; `proximal_mu` goes to the sites) | none |
| fedadam, fedyogi | FedAdam, FedYogi | yes (weighted mean, then a server Adam/Yogi step) | none |
| fedavgm | FedAvgM | yes (weighted mean, then server momentum) | none |
| fedmedian | FedMedian | no: coordinate-wise median, each site counts once | fewer than half of n |
| fedtrimmedavg | FedTrimmedAvg | no: per coordinate, drops ⌊beta·n⌋ lowest and highest, then an unweighted mean | at most ⌊beta·n⌋ (beta < 0.5) |
| krum | Krum | no: keeps the one reply closest to its n − f − 2 nearest others (f = `num_malicious_nodes`) | f, with n ≥ 2f + 3 for Krum's guarantee |

When to use which (bench/poisoned_site.py: ten sites, one hostile): every strategy gets the coordinator's bounds
first (server/strategy.InfluenceBound: a num-examples above the site's census is rejected; `influence.max_update_ratio`
and `influence.max_site_share` bound a reply's size and weight). With those set tighter than the defaults (0.1 and
0.3 there), FedAvg held a scaled, a sign-flipped and a count-inflating site to within 0.03 AUC of the clean run;
without them, a false count alone handed the model to the hostile site. Prefer `fedtrimmedavg` (beta 0.1–0.2) when
a site may be hostile or broken in ways no size bound sees (it matched FedAvg when all were honest and held every
attack); `fedmedian` costs a little accuracy when all are honest; `krum` keeps a single site's model and lost 0.11 AUC
on small heterogeneous sites: use it only with many similar sites.

Robust aggregators act on the trainable tensors only, float32 as received (decoded from the wire, server/wire.py);
BatchNorm running statistics are averaged plainly over every accepted reply, weighted by num-examples, whatever the
strategy (server/strategy.NormAveraging): a hostile site can still skew them. Reply metrics (counts, histograms) are
summed over the replies the aggregator used (Krum: the selected reply only); every accepted reply is recorded.

Adding a strategy: a `Registered` entry below (its Flower class, or a short subclass of one, and its parameters).
Parameters that existed before this registry (`proximal_mu`, `eta`, `beta_1`, `beta_2`, `tau`) are fields of
server/experiment.StrategyConfig; newer ones live in `StrategyConfig.params`, which stays out of the experiment's
fingerprint and results when empty, so older experiments keep theirs. Whatever state the class keeps between rounds
is checkpointed and restored without further code (server/strategy.StrategyState, server/checkpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum


@dataclass(frozen=True)
class Param:
    """One constructor parameter experiment.yaml may set: `kind` int or float, bounds (None = open)."""

    kind: type
    default: float | int
    lo: float | None = None
    hi: float | None = None
    hi_open: bool = False  # the upper bound itself is not allowed

    def expected(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        hi = "∞" if self.hi is None else self.hi
        return f"{noun} in [{self.lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        if self.lo is not None and value < self.lo:
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)


@dataclass(frozen=True)
class Registered:
    """A strategy by name: its Flower class, its parameters (name → Param), and which of Flower's constructor
    arguments come from elsewhere in the experiment (`from_experiment`: argument → ExperimentConfig attribute)."""

    cls: type
    params: dict[str, Param] = field(default_factory=dict)
    from_experiment: dict[str, str] = field(default_factory=dict)


_FEDOPT = {
    "eta": Param(float, 0.01, lo=0.0),  # server learning rate
    "beta_1": Param(float, 0.9, lo=0.0, hi=1.0),
    "beta_2": Param(float, 0.99, lo=0.0, hi=1.0),
    "tau": Param(float, 1e-3, lo=0.0),
}

STRATEGIES: dict[str, Registered] = {
    "fedavg": Registered(FedAvg),
    "fedprox": Registered(FedProx, {"proximal_mu": Param(float, 0.0, lo=0.0)}),
    "fedadam": Registered(FedAdam, _FEDOPT, {"eta_l": "lr"}),
    "fedyogi": Registered(FedYogi, _FEDOPT, {"eta_l": "lr"}),
    "fedavgm": Registered(
        FedAvgM, {"server_learning_rate": Param(float, 1.0, lo=0.0), "server_momentum": Param(float, 0.0, lo=0.0)}
    ),
    "fedmedian": Registered(FedMedian),
    "fedtrimmedavg": Registered(FedTrimmedAvg, {"beta": Param(float, 0.2, lo=0.0, hi=0.5, hi_open=True)}),
    "krum": Registered(Krum, {"num_malicious_nodes": Param(int, 0, lo=0)}),
}
