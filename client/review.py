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
when its files are identical to the installed ones, and the review says so.
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
        lines.append(f"run {r.run.get('run_id')}: seen {r.run.get('seen_at')}, launcher verdict: {r.run.get('verdict')}")
        lines += [f"  run config {k} = {v}" for k, v in sorted(r.run.get("run_config", {}).items())]
    if r.experiment:
        e, model, quorum = r.experiment, r.experiment.get("model") or {}, r.experiment.get("quorum") or {}
        lines.append(f"experiment: protocol {e.get('protocol', 'train')}, {e.get('rounds', '?')} round(s), strategy "
                     f"{(e.get('strategy') or {}).get('name', 'fedavg') if isinstance(e.get('strategy'), dict) else e.get('strategy', 'fedavg')}, "
                     f"model {model.get('arch', 'resnet50')} trainable {model.get('trainable', 'all')}, "
                     f"quorum {quorum.get('min_sites', '?')}")  # fmt: skip
    dp = cfg.privacy
    lines += [
        "what leaves this site (installed release's reply schema" + ("" if not (r.differ or r.new) else
                                                                     "; NOT guaranteed: the bundle's code differs") + "):",  # fmt: skip
        "  training rounds: the updated model tensors (the experiment's trainable subset) + metrics "
        + ", ".join(sorted(TRAIN_KEYS)),
        "    " + (f"DP on: tensors trained with DP-SGD within this site's budget ε={dp.epsilon_budget:g}, δ={dp.delta:g}"
                  if dp.dp else "DP off: the coordinator sees this site's exact update (no secure aggregation)"),  # fmt: skip
        "  evaluation: counts, AUC + variance, score histograms with a minimum cell count: "
        + ", ".join(sorted(EVALUATE_KEYS)) + " (not DP-protected), in an evaluation reply, or beside a training"
        " reply's metrics when the coordinator asks to score the received model first",
        "  per-patient scores (by pseudonym key only): " + ("YES, share_predictions is true" if cfg.share_predictions
                                                            else "no (share_predictions: false)"),  # fmt: skip
        "  census: " + ", ".join(sorted(QUERY_KEYS)) + ", the site's name, a hash of its cache and its spinefed version",
        "  error replies: a short reason (no patient identifiers, paths or file names)",
        "never: DICOM, images, patient ids, index.csv, the pseudonym secret, the privacy ledger",
    ]
    bad = invalid_entries(cfg.federation.approved_apps)
    if bad:
        lines.append(f"warning: federation.approved_apps has entries that are not sha256 hashes: {', '.join(bad)}")
    if b.sha256 not in normalise(cfg.federation.approved_apps):
        lines += [f"to approve: add this line under `federation: approved_apps:` in {cfg.file}", f"    - {b.sha256}",
                  "  (it takes effect for the next message; no restart needed)"]  # fmt: skip
    return lines
