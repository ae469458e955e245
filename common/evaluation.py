"""Out-of-fold evaluation shared by the centralized baseline and the federated protocols.

Each patient is scored once by a model that never saw it, and called malignant at the threshold chosen on that
model's own inner validation split. Pooled metrics come from those calls; the AUC from the raw scores, with a DeLong
CI and a cluster bootstrap over sites (patients of one site are not independent). Pooled figures describe the patients
of these sites; the random-effects summaries (``site_meta``) the typical site, their prediction intervals a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.metrics import (
    POOLED_ESTIMAND,
    binary_metrics,
    calibration_curve,
    cluster_bootstrap,
    confusion_metrics,
    confusion_of,
    meta_aucs,
    meta_proportions,
)

# The published single-site result (Yeh et al., tenfold CV, 190 patients): the row every table is printed beside.
PAPER = {"accuracy": 0.92, "sensitivity": 0.94, "specificity": 0.91, "n": 190, "n_pos": 50, "n_neg": 140}


@dataclass
class OutOfFold:
    """Per-patient out-of-fold results (keys are pseudonyms; stays where the data are unless a site shares it)."""

    sites: np.ndarray  # str
    keys: np.ndarray  # str
    folds: np.ndarray  # int
    labels: np.ndarray  # int 0/1
    scores: np.ndarray  # float P(malignant)
    thresholds: np.ndarray  # float, the threshold of the model that scored the patient

    @property
    def calls(self) -> np.ndarray:
        return (self.scores >= self.thresholds).astype(np.int64)

    def subset(self, mask: np.ndarray) -> OutOfFold:
        return OutOfFold(
            *(a[mask] for a in (self.sites, self.keys, self.folds, self.labels, self.scores, self.thresholds))
        )

    def to_records(self) -> list[dict]:
        return [
            {"site": str(s), "key": str(k), "fold": int(f), "label": int(y), "score": float(p), "threshold": float(t)}
            for s, k, f, y, p, t in zip(self.sites, self.keys, self.folds, self.labels, self.scores, self.thresholds)
        ]

    @classmethod
    def from_records(cls, records: list[dict]) -> OutOfFold:
        cols = ("site", "key", "fold", "label", "score", "threshold")
        types = (str, str, np.int64, np.int64, np.float64, np.float64)
        return cls(*(np.asarray([r[c] for r in records], dtype=t) for c, t in zip(cols, types)))


def summarize(oof: OutOfFold, n_boot: int = 2000, seed: int = 0) -> dict:
    """Pooled metrics (calls at each model's own threshold), AUC with DeLong and site-cluster bootstrap CIs,
    calibration, per-site metrics and their random-effects summaries."""
    labels, scores = oof.labels, oof.scores
    pooled = binary_metrics(labels, scores, 0.5)  # AUC, Brier, ECE; the threshold-based parts are replaced below
    pooled.update(confusion_metrics(confusion_of(labels, oof.calls)))
    pooled["confusion"] = confusion_of(labels, oof.calls).as_dict()
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
        pooled[key]["estimand"] = POOLED_ESTIMAND
    pooled["auc"]["method"] = f"{pooled['auc']['method']} on the pooled out-of-fold scores of every site and fold model"
    pooled["auc"]["estimand"] = POOLED_ESTIMAND
    pooled["threshold"] = "per fold (inner validation)"
    pooled["auc_site_bootstrap"] = cluster_bootstrap(labels, scores, oof.sites, n_boot=n_boot, seed=seed)
    pooled["calibration"] = calibration_curve(labels, scores)
    per_site = {}
    for site in sorted(set(oof.sites.tolist())):
        part = oof.subset(oof.sites == site)
        m = binary_metrics(part.labels, part.scores, 0.5)
        m.update(confusion_metrics(confusion_of(part.labels, part.calls)))
        m["confusion"] = confusion_of(part.labels, part.calls).as_dict()
        m.pop("threshold", None)
        m["n_folds"] = len(set(part.folds.tolist()))  # the site's AUC ranks these fold models' scores together
        per_site[site] = m
    out = {"pooled": pooled, "per_site": per_site}
    if len(per_site) >= 2:
        out["random_effects"] = site_meta(per_site)
    return out


def site_meta(per_site: dict) -> dict:
    """Random-effects summaries (with prediction intervals) of per-site sensitivity, specificity (binomial-normal
    GLMM) and AUC (HKSJ on Paule-Mandel tau^2); see common.metrics.meta_proportions / meta_aucs."""
    sites = list(per_site.values())
    res = {
        "sensitivity": meta_proportions([s["confusion"]["tp"] for s in sites], [s["n_pos"] for s in sites]),
        "specificity": meta_proportions([s["confusion"]["tn"] for s in sites], [s["n_neg"] for s in sites]),
    }
    with_auc = [s for s in sites if np.isfinite(s["auc"]["value"])]
    if len(with_auc) >= 2:
        res["auc"] = meta_aucs(
            [s["auc"]["value"] for s in with_auc],
            [s["auc"]["var"] for s in with_auc],
            [s["n_pos"] for s in with_auc],
            [s["n_neg"] for s in with_auc],
        )
    return res


def fmt_prop(m: dict) -> str:
    """'0.92 (0.87–0.95), 174/190' for a proportion dict."""
    if not np.isfinite(m["value"]):
        return f"n/a (0/{m['n']})"
    return f"{m['value']:.2f} ({m['lo']:.2f}–{m['hi']:.2f}), {m['k']:g}/{m['n']:g}"


def fmt_auc(auc: dict | None) -> str:
    """'0.912 (0.853–0.950)' for an AUC dict, or n/a."""
    if not auc or not np.isfinite(float(auc.get("value", np.nan))):
        return "n/a"
    return f"{auc['value']:.3f} ({auc['lo']:.3f}–{auc['hi']:.3f})"


def paper_rows(
    entries: list[tuple[str, dict, str | None]], synthetic: bool, paper: dict | None = None
) -> tuple[list[str], list[list[str]]]:
    """The paper's table (one home for it): its published row (`paper`, default PAPER), then one row per (label,
    pooled metrics, AUC estimand or None). The estimand column appears when any entry names one (the report's)."""
    paper = paper or PAPER
    estimand = any(e[2] is not None for e in entries)
    head = ["protocol", "accuracy", "sensitivity", "specificity", "AUC (headline)" if estimand else "AUC"]
    head += [*(["AUC estimand"] if estimand else []), "n"]
    published = [f"{paper[k]:.2f}" for k in ("accuracy", "sensitivity", "specificity")]
    rows = [
        ["Yeh et al. (published, real MRI, tenfold)", *published, "–", *(["–"] if estimand else []), str(paper["n"])]
    ]
    for label, m, est in entries:
        props = [fmt_prop(m[k]) if m.get(k) else "n/a" for k in ("accuracy", "sensitivity", "specificity")]
        name = label + (" (synthetic data)" if synthetic else "")
        rows.append([name, *props, fmt_auc(m.get("auc")), *([est or "–"] if estimand else []), str(m["n"])])
    return head, rows


def paper_table(rows: dict[str, dict], synthetic: bool = True) -> str:
    """Markdown table in the paper's format (accuracy, sensitivity, specificity) with the paper's row."""
    head, body = paper_rows([(name, m, None) for name, m in rows.items()], synthetic)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]) + "\n"
