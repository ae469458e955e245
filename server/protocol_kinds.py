"""What a validation protocol is, as one object: how it plans its units and what its results block holds.

A protocol run (server/protocols.py) is a list of units, each one federated training and one evaluation; a protocol
kind plans the units of its kind and turns the sites' reports under its tags into its block of results.json
`protocols`, which the report renders whatever the kind (server/report.py). The runner itself knows kinds only by the
flags below. The built-in kinds are here; a new one is its own module and one line in server/protocol_registry.py
(server/repeated_tenfold.py is the example).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from server import aggregates as A
from server.experiment import ExperimentConfig, FoldPlan


@dataclass
class Unit:
    """One training + evaluation of a protocol. `test`: site → subset it scores ("held-out" fold or "all")."""

    name: str
    kind: str  # the ProtocolKind's name
    exp: ExperimentConfig
    train_sites: tuple[str, ...]
    test: dict[str, str] = field(default_factory=dict)
    tag: str = ""

    @property
    def owner(self) -> str:
        """The site a local-only unit belongs to (its training site, even when it sat the unit out)."""
        return self.name.split("/", 1)[1]


Plan = Callable[[ExperimentConfig, list[str], str], list[Unit]]
Results = Callable[[list[Unit], dict, dict], dict | None]


@dataclass(frozen=True)
class ProtocolKind:
    """One protocol. `plan(exp, sites, base_tag)` → its units in running order; `included(exp)`: whether the
    experiment runs it; `results(units, reports, pooled)` → its results.json block (None: nothing to report), from
    the sites' reports (site → client/tasks.report) and the report's secure sums (summation id → server/protocols
    collect_reports); `report(block)` → extra report blocks after the standard ones.

    Flags the runner reads: `selectable` (an experiment's `protocol` may name it); `per_fold` (its units hold one
    fold out: membership counts of that fold and fold seed); `alone` (each site trains its own model, all sites in one
    message batch per round: the local-only baseline); `pooled_tags` (the report pools each tag's histograms over
    the sites that scored under it); `readers` (the reader comparison runs on its tag)."""

    name: str
    label: str
    plan: Plan
    included: Callable[[ExperimentConfig], bool]
    results: Results | None = None
    report: Callable[[dict], list[tuple]] | None = None
    key: str = ""  # results.json `protocols` key (default: the name)
    selectable: bool = True
    per_fold: bool = False
    alone: bool = False
    pooled_tags: bool = True
    readers: bool = False

    @property
    def results_key(self) -> str:
        return self.key or self.name


def fold_count(exp: ExperimentConfig) -> int:
    return exp.folds.k if exp.folds.k >= 2 else 10


def tag_results(label: str) -> Results:
    """The standard block: one tag's reports combined over sites (per-site metrics, pooled, random effects)."""

    def results(units: list[Unit], reports: dict, pooled: dict) -> dict:
        tag = units[0].tag
        return {
            "label": label,
            **A.combine({s: r["tags"].get(tag, {}) for s, r in reports.items()}, pooled.get(f"report/{tag}")),
        }

    return results


def held_out_folds(exp: ExperimentConfig, sites: list[str], name: str, kind: str, tag: str, seed: int) -> list[Unit]:
    """One unit per held-out fold (every site trains on its other folds and scores the held-out one)."""
    k = fold_count(exp)
    n = min(k, exp.plan.max_folds) if exp.plan.max_folds else k
    units = []
    for fold in range(n):
        e = exp.with_(folds=FoldPlan(k=k, seed=seed, held_out=fold), evaluate="none")
        units.append(Unit(f"{name}/fold-{fold:02d}", kind, e, tuple(sites), dict.fromkeys(sites, "held-out"), tag))
    return units


def _no_folds(exp: ExperimentConfig) -> ExperimentConfig:
    return exp.with_(folds=FoldPlan(k=0, seed=exp.folds.seed, held_out=-1), evaluate="none")


def _plan_tenfold(exp: ExperimentConfig, sites: list[str], base_tag: str) -> list[Unit]:
    return held_out_folds(exp, sites, "tenfold", "tenfold", f"{base_tag}-tenfold", exp.folds.seed)


def _plan_site_held_out(exp: ExperimentConfig, sites: list[str], base_tag: str) -> list[Unit]:
    chosen = sites[: exp.plan.max_held_out] if exp.plan.max_held_out else sites
    return [
        Unit(
            f"site-held-out/{held}",
            "site-held-out",
            _no_folds(exp),
            tuple(s for s in sites if s != held),
            {held: "all"},
            f"{base_tag}-sho",
        )  # fmt: skip
        for held in chosen
    ]


def _plan_local(exp: ExperimentConfig, sites: list[str], base_tag: str) -> list[Unit]:
    e = exp.with_(folds=FoldPlan(k=fold_count(exp), seed=exp.folds.seed, held_out=0), evaluate="none")
    return [
        Unit(
            f"local/{site}",
            "local",
            e,
            (site,),
            {s: ("held-out" if s == site else "all") for s in sites},
            f"{base_tag}-local-{site}",
        )  # fmt: skip
        for site in sites
    ]


def _local_results(units: list[Unit], reports: dict, pooled: dict) -> dict:
    """Each local-only model scored by every site: the cross-site matrix, and its diagonal (own fold 0) combined."""
    matrix: dict[str, dict] = {}
    diagonal = {}
    for u in units:
        row = {}
        for test_site, r in reports.items():
            rep = r["tags"].get(u.tag, {})
            if rep.get("n", 0) > 0:
                row[test_site] = A.site_metrics(rep)
                if test_site == u.owner:
                    diagonal[u.owner] = rep
        matrix[u.owner] = row
    block = A.combine(diagonal, pooled.get("report/local-diagonal"))
    return {"label": "local-only (own fold 0)", **block, "matrix": matrix}


def _plan_final(exp: ExperimentConfig, sites: list[str], base_tag: str) -> list[Unit]:
    return [Unit("final", "final", _no_folds(exp), tuple(sites), {}, f"{base_tag}-final")]


TENFOLD = ProtocolKind(
    "tenfold",
    "federated tenfold",
    _plan_tenfold,
    lambda exp: exp.protocol in ("tenfold", "all"),
    tag_results("federated tenfold"),
    per_fold=True,
    readers=True,
)
SITE_HELD_OUT = ProtocolKind(
    "site-held-out",
    "federated site-held-out",
    _plan_site_held_out,
    lambda exp: exp.protocol in ("site-held-out", "all"),
    tag_results("federated site-held-out"),
    readers=True,
)
LOCAL = ProtocolKind(
    "local",
    "local-only (own fold 0)",
    _plan_local,
    lambda exp: exp.plan.local_only and exp.protocol in ("all", "tenfold", "site-held-out"),
    _local_results,
    key="local-only",
    selectable=False,
    per_fold=True,
    alone=True,
    pooled_tags=False,
)
FINAL = ProtocolKind(
    "final",
    "final model",
    _plan_final,
    lambda exp: exp.protocol == "train" or (exp.protocol == "all" and exp.plan.final_model),
    selectable=False,
    pooled_tags=False,
)
