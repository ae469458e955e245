"""`client review`: what an experiment will run at this site and what will leave it, before the site approves it.

Sources, all local to the site:
- a run the site's launcher has already seen (client/launcher.py records the bundle and the run config of every run,
  approved or refused, under `<cache>-review/`): `client review RUN_ID`;
- or a bundle file the coordinator sent (`flwr build` output, or `server run --dry-run`'s `app.fab`) and the
  experiment.yaml: `client review --fab FILE [--experiment FILE]`.

The review never imports or runs the bundle. It compares every bundle file with the site's installed release (same
path under the installed package): identical files mean the bundle runs the code the site installed and can read; a
differing file is code the site has not seen, and is listed. What leaves the site is stated from the installed
release's fixed reply schema (common/replies.py) and the site's own privacy settings; it holds for the bundle only
when its files are identical to the installed ones, and the review says so. It ends with the site's privacy settings,
the threat model (DP protects patients against readers of the released weights, not against the coordinator's
evaluation queries) and what DP does not cover, as deploy/DATA_FLOW.md states them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from client.approval import (
    Bundle,
    NotApproved,
    check_bundle,
    installed_version,
    invalid_entries,
    normalise,
    read_bundle,
)
from client.launcher import review_dir
from common.backbones import DEFAULT_ARCH
from common.config import SiteConfig, read_yaml
from common.errors import SpineFedError
from common.replies import EVALUATE_KEYS, QUERY_KEYS, TRAIN_KEYS

INSTALLED = Path(__file__).resolve().parent.parent  # the installed release's source root (client/, common/, ...)


@dataclass
class Review:
    bundle: Bundle
    verdict: str  # "approved" or "not approved: <why and how to approve>"
    same: list[str] = field(default_factory=list)
    differ: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    run: dict = field(default_factory=dict)
    experiment: dict = field(default_factory=dict)


def load_run(cfg: SiteConfig, run_id: int) -> tuple[bytes, dict]:
    """A run the launcher recorded: (bundle bytes, run record)."""
    folder = review_dir(cfg.cache)
    record = folder / "runs" / f"{run_id}.json"
    if not record.is_file():
        seen = sorted(int(p.stem) for p in (folder / "runs").glob("*.json")) if (folder / "runs").is_dir() else []
        raise SpineFedError(f"run {run_id} has not reached this site yet (runs seen: {seen or 'none'}); ask the "
                            "coordinator for the bundle and use --fab FILE")  # fmt: skip
    info = json.loads(record.read_text())
    return (folder / "bundles" / f"{info['fab_hash']}.fab").read_bytes(), info


def compare(bundle: Bundle, fab: bytes) -> tuple[list[str], list[str], list[str]]:
    """Bundle files identical to / differing from / absent in the installed release (pyproject.toml is rewritten by
    Flower's builder, so it is compared by its app table in read_bundle instead)."""
    same, differ, new = [], [], []
    for f in bundle.files:
        if f.path == "pyproject.toml":
            continue
        local = INSTALLED / f.path
        if not local.is_file():
            new.append(f.path)
        elif hashlib.sha256(local.read_bytes()).hexdigest() == f.sha256:
            same.append(f.path)
        else:
            differ.append(f.path)
    return same, differ, new


def review(cfg: SiteConfig, fab: bytes, run: dict | None = None, experiment: Path | None = None) -> Review:
    """Everything `client review` shows, as data."""
    bundle = read_bundle(fab)
    try:
        check_bundle(fab, cfg.federation.approved_apps, run_id=(run or {}).get("run_id"))
        verdict = "approved"
    except NotApproved as exc:
        verdict = f"not approved: {exc}"
    same, differ, new = compare(bundle, fab)
    exp = read_yaml(experiment) if experiment else {}
    return Review(bundle, verdict, same, differ, new, run or {}, exp)


def render(r: Review, cfg: SiteConfig) -> list[str]:
    """The review as lines for the terminal (and for the site's approval record)."""
    b = r.bundle
    lines = [f"app bundle sha256 {b.sha256}", f"  {b.publisher}/{b.name} {b.version} (installed here: "
             f"{b.name} {installed_version() or 'none'}); entry points: {b.components}"]  # fmt: skip
    lines.append(f"  at this site: {r.verdict}")
    lines.append(f"  code: {len(r.same)} file(s) identical to the installed release")
    if r.differ or r.new:
        lines.append(f"  code NOT in the installed release ({len(r.differ)} changed, {len(r.new)} new) — read "
                     "before approving:")  # fmt: skip
        lines += [f"    changed: {p}" for p in r.differ] + [f"    new:     {p}" for p in r.new]
    if r.run:
        lines.append(
            f"run {r.run.get('run_id')}: seen {r.run.get('seen_at')}, launcher verdict: {r.run.get('verdict')}"
        )
        lines += [f"  run config {k} = {v}" for k, v in sorted(r.run.get("run_config", {}).items())]
    if r.experiment:
        e, model, quorum = r.experiment, r.experiment.get("model") or {}, r.experiment.get("quorum") or {}
        lines.append(f"experiment: protocol {e.get('protocol', 'train')}, {e.get('rounds', '?')} round(s), strategy "
                     f"{(e.get('strategy') or {}).get('name', 'fedavg') if isinstance(e.get('strategy'), dict) else e.get('strategy', 'fedavg')}, "
                     f"model {model.get('arch', DEFAULT_ARCH)} trainable {model.get('trainable', 'all')}, "
                     f"quorum {quorum.get('min_sites', '?')}")  # fmt: skip
    p, unseen = cfg.privacy, r.differ or r.new
    dp_line = (
        f"DP on: tensors trained with DP-SGD within this site's budget ε={p.epsilon_budget:g}, δ={p.delta:g}"
        if p.dp
        else "DP off: the coordinator sees this site's exact update (no secure aggregation)"
    )
    shared = "YES, share_predictions is true" if cfg.share_predictions else "no (share_predictions: false)"
    lines += [
        "what leaves this site (installed release's reply schema"
        + ("; NOT guaranteed: the bundle's code differs" if unseen else "")
        + "):",
        "  training rounds: the updated model tensors (the experiment's trainable subset) + metrics "
        + ", ".join(sorted(TRAIN_KEYS)),
        "    " + dp_line,
        "  evaluation: counts, AUC + variance, score histograms with a minimum cell count: "
        + ", ".join(sorted(EVALUATE_KEYS))
        + " (not DP-protected), in an evaluation reply, or beside a training reply's metrics when the coordinator asks"
        " to score the received model first",
        "  end of a protocol run (report query): per tag the same aggregates and the Brier sum, paired comparisons"
        " between protocols, the model-vs-reader McNemar counts (not DP-protected); for the tenfold and"
        " site-held-out tags the counts, TP/FP/TN/FN and AUC + variance per acquisition level (levels under the"
        " minimum cell count suppressed, with their complement)",
        "  per-patient scores with label and fold (by pseudonym key only): " + shared,
        "  census: "
        + ", ".join(sorted(QUERY_KEYS))
        + ", patients per acquisition level (acq/<attribute>/<level>: scanner vendor, field strength, fat-suppressed"
        " T2, slice thickness, pixel spacing, lossy compression; counts under the minimum cell count sent as -1), the"
        " site's name, a hash of its cache and its spinefed version",
        "  membership query: malignant / benign counts of every fold and of each unit's inner-train and validation"
        " patients (no keys); a unit the site sits out (a class missing) is answered with that reason",
        "  error replies: a short reason (no patient identifiers, paths or file names)",
        "never: DICOM, images, patient ids, index.csv, the pseudonym secret, the privacy ledger and its record, the"
        " evaluation store, logs",
    ]
    lines += privacy_lines(cfg)
    bad = invalid_entries(cfg.federation.approved_apps)
    if bad:
        lines.append(f"warning: federation.approved_apps has entries that are not sha256 hashes: {', '.join(bad)}")
    if b.sha256 not in normalise(cfg.federation.approved_apps):
        lines += [f"to approve: add this line under `federation: approved_apps:` in {cfg.file}", f"    - {b.sha256}",
                  "  (it takes effect for the next message; no restart needed)"]  # fmt: skip
    return lines


def privacy_lines(cfg: SiteConfig) -> list[str]:
    """This site's privacy settings, the threat model and what differential privacy does not cover
    (deploy/DATA_FLOW.md, "Threat model" and "What DP does not cover"), for a hospital's IT and privacy officer."""
    p = cfg.privacy
    lines = ["this site's privacy settings (site.yaml `privacy:`; nothing the coordinator sends changes them):"]
    if p.dp:
        lines += [
            f"  dp: true; epsilon_budget {p.epsilon_budget:g} over the site's lifetime, at most ε {p.experiment_epsilon:g}"
            f" per experiment (max_epsilon_per_experiment), delta {p.delta:g}",
            "    (δ must be below 1 / the number of patients, else DP training is refused; ε and δ go with every"
            " training reply)",
            f"  max_noise_multiplier {p.max_noise_multiplier:g}: a task that needs more noise is refused, not trained on"
            " noise",
            f"  class_weight {p.class_weight:g}: the malignant-class loss weight under DP, a public constant (1 = none)",
            f"  ledger {p.ledger}",
            f"  ledger_record {p.ledger_record}",
            "    back up both with the pseudonym secret after every experiment (SITE_IT.md); a missing, emptied,",
            "    replaced or rolled-back ledger stops DP training until both are restored together",
        ]
    else:
        lines.append("  dp: false: no differential privacy at this site")
    lines += [
        f"  min_cell {p.min_cell}: every histogram cell sent in the clear, or published from a secure sum this site",
        f"    joined, describes at least {p.min_cell} patients or none; an experiment may ask for more, never less (a lower",
        "    request is answered at this value and logged here)",
        f"  secure_pooling {str(p.secure_pooling).lower()}: "
        + ("score histograms go into secure sums over >= 3 sites" if p.secure_pooling else "histograms in the clear"),
        "threat model:",
        "  DP protects each patient against anyone who reads the released model weights: the coordinator, the other",
        "  sites, whoever receives the final model.",
        "  It does NOT protect against the coordinator's evaluation queries: their answers are computed from this",
        "  site's data without noise, limited only by min_cell and the fixed reply schema.",
    ]
    if not p.dp:
        lines.append("  DP is off here, so the model updates are not protected either: the coordinator sees each one.")
    if p.dp:
        weight = f"privacy.class_weight {p.class_weight:g} (declared public)"
    else:
        weight = "without DP, the experiment's `imbalance` setting (may be benign/malignant counts)"
    shared = "YES (share_predictions: true)" if cfg.share_predictions else "no (share_predictions: false)"
    pooling = (
        f"into secure sums over >= 3 sites, else cells of at least {p.min_cell}"
        if p.secure_pooling
        else f"secure pooling off: per site, cells of at least {p.min_cell}"
    )
    lines += [
        "outside DP (sent as exact values, with or without DP):",
        "  - evaluation outputs: per-tag counts, TP/FP/TN/FN, this site's AUC and DeLong variance, Brier sum, score",
        f"    histograms ({pooling}), paired-comparison summaries, reader McNemar counts",
        "  - counts: census n-benign / n-malignant / n-unlabelled, num-examples and val-examples of every unit,",
        "    per-fold class counts",
        "  - the inner-validation score histograms from which the coordinator sets the decision threshold (likewise)",
        f"  - the malignant-class loss weight: {weight}",
        "  - the site's patient count (it sets DP's sampling rate)",
        f"  - per-patient scores by pseudonym key: {shared}",
    ]
    return lines
