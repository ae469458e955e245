"""Repeated tenfold: r tenfold cross-validations with different fold seeds, and the spread between them.

The usual answer to "how stable is a 190-patient cross-validation": each repeat assigns every patient to a fold from
another seed (common/splits.py), trains and scores its folds like the tenfold, and is pooled on its own (its own
evaluation tag; each patient scored once per repeat). The results block is the first repeat's (rendered like the
tenfold) plus, per repeat, the headline figures, and their spread: mean, standard deviation, min and max over the
repeats. The spread is between repeats of the same data, so it shows how much the estimate depends on the fold split,
not how it would vary on new patients (that is the confidence interval's job).
"""

from __future__ import annotations

import math

from server import aggregates as A
from server.experiment import ExperimentConfig
from server.protocol_kinds import ProtocolKind, Unit, held_out_folds

NAME = "repeated-tenfold"


def plan(exp: ExperimentConfig, sites: list[str], base_tag: str) -> list[Unit]:
    """Repeat r (1-based) uses fold seed `folds.seed + r - 1`, so repeat 1 splits like the plain tenfold."""
    units = []
    for rep in range(1, exp.plan.repeats + 1):
        name, tag = f"{NAME}/rep-{rep:02d}", f"{base_tag}-rep{rep:02d}"
        units += held_out_folds(exp, sites, name, NAME, tag, exp.folds.seed + rep - 1)
    return units


def _headline(block: dict) -> dict:
    pooled, re = block.get("pooled", {}), block.get("random_effects", {})
    return {
        "auc_random_effects": (re.get("auc") or {}).get("estimate", math.nan),
        "auc_histogram": pooled.get("auc_histogram", math.nan),
        **{m: (pooled.get(m) or {}).get("value", math.nan) for m in ("accuracy", "sensitivity", "specificity")},
        "n": pooled.get("n", 0),
    }


def _spread(values: list[float]) -> dict:
    v = [x for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return {"mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan, "k": 0}
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return {"mean": mean, "sd": sd, "min": min(v), "max": max(v), "k": len(v)}


def results(units: list[Unit], reports: dict, pooled: dict) -> dict | None:
    tags = list(dict.fromkeys(u.tag for u in units))
    seeds = {u.tag: u.exp.folds.seed for u in units}
    blocks = [A.combine({s: r["tags"].get(t, {}) for s, r in reports.items()}, pooled.get(f"report/{t}")) for t in tags]
    if not blocks or not blocks[0].get("pooled"):
        return None
    repeats = [{"repeat": i + 1, "fold_seed": seeds[t], **_headline(b)} for i, (t, b) in enumerate(zip(tags, blocks))]
    metrics = ("auc_random_effects", "auc_histogram", "accuracy", "sensitivity", "specificity")
    spread = {m: _spread([r[m] for r in repeats]) for m in metrics}
    label = f"repeated tenfold ({len(tags)} repeats; per-site table: repeat 1)"
    return {"label": label, **blocks[0], "repeats": repeats, "spread": spread}


def report(block: dict) -> list[tuple]:
    """The repeats and their spread."""

    def f(x) -> str:
        return f"{x:.3f}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"

    head = ["repeat", "fold seed", "AUC (random effects)", "sensitivity", "specificity", "accuracy", "n"]
    rows = [
        [
            str(r["repeat"]),
            str(r["fold_seed"]),
            f(r["auc_random_effects"]),
            f(r["sensitivity"]),
            f(r["specificity"]),
            f(r["accuracy"]),
            str(r["n"]),
        ]  # fmt: skip
        for r in block.get("repeats", [])
    ]
    sp = block.get("spread", {})
    text = (
        "Spread between the repeats (same patients, another fold split each; mean ± SD [min, max]): "
        + "; ".join(
            f"{m.replace('_', ' ')} {f(s['mean'])} ± {f(s['sd'])} [{f(s['min'])}, {f(s['max'])}]" for m, s in sp.items()
        )
        + ". It shows how much the estimate depends on the fold split, not how it would vary on new patients."
    )
    return [("table", head, rows), ("p", text)]


KIND = ProtocolKind(
    NAME,
    "repeated tenfold",
    plan,
    lambda exp: exp.protocol == NAME,
    results,
    report,
    per_fold=True,
)
