"""The paper's protocol, centrally: pool the virtual sites' caches and run k-fold cross-validation over exactly the
union of the sites' own folds (each site assigns its patients from the shared seed, as in the federation), so the
centralized baseline and the federated tenfold result are paired on the same patients and folds.

Simulation only: pooling patients is what a federation exists to avoid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.config import SiteConfig, load_site_config
from common.errors import SpineFedError
from common.evaluation import OutOfFold, paper_table, summarize
from common.fileio import atomic_write_json, atomic_write_text
from common.model import ModelConfig, build_model, load_pretrained
from common.prepare import prepare
from common.sitedata import SiteData
from common.splits import assign_folds
from common.training import TrainConfig, fit, predict

log = logging.getLogger(__name__)


def discover_sites(data_dir: Path) -> list[SiteConfig]:
    """Every DIR/<site>/site.yaml, sorted by site name."""
    configs = [load_site_config(p) for p in sorted(Path(data_dir).glob("*/site.yaml"))]
    if not configs:
        raise SpineFedError(f"{data_dir}: no <site>/site.yaml below it; run `simulate data --out {data_dir}` first")
    return configs


def open_sites(configs: list[SiteConfig], workers: int | None = None) -> list[SiteData]:
    """Open each site's cache, preparing it first where it has never been prepared."""
    sites = []
    for cfg in configs:
        if not (cfg.cache / "index.csv").is_file():
            log.info("preparing site %s", cfg.site)
            prepare(cfg, workers=workers)
        sites.append(SiteData.open(cfg.cache, site=cfg.site))
    return sites


def site_folds(sites: list[SiteData], k: int, seed: int) -> np.ndarray:
    """Fold of every pooled patient (−1 for unlabelled), each site assigning its own patients."""
    out = []
    for s in sites:
        folds = assign_folds(list(s.keys), s.labels.tolist(), k=k, seed=seed)
        out.append([folds.get(key, -1) for key in s.keys])
    return np.concatenate([np.asarray(f, dtype=np.int64) for f in out])


def run_centralized(
    data_dir: Path,
    out: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    folds: int = 10,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Tenfold (k-fold) CV on the pooled virtual sites; writes results.json and results.md into `out`.

    Each finished fold is saved under out/folds/, so an interrupted run resumes at the first unfinished fold.
    """
    progress = progress or (lambda msg: None)
    out = Path(out)
    configs = discover_sites(data_dir)
    sites = open_sites(configs)
    data = SiteData.concat(sites)
    site_of = np.concatenate([[s.site] * len(s) for s in sites])
    fold_of = site_folds(sites, folds, seed)
    if model_cfg.pretrained is None:
        log.warning("no pretrained weights given: training starts from scratch")
    settings = {"folds": folds, "seed": seed, "model": model_cfg.to_dict(), "train": train_cfg.to_dict()}
    fold_dir = out / "folds"
    started = time.perf_counter()
    per_fold = []
    for k in range(folds):
        path = fold_dir / f"fold_{k:02d}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("settings") == json.loads(json.dumps(settings, default=str)):
                per_fold.append(saved)
                progress(f"fold {k + 1}/{folds}: done earlier, reused")
                continue
        test = np.flatnonzero(fold_of == k)
        train = np.flatnonzero((fold_of >= 0) & (fold_of != k))
        if test.size == 0:
            continue
        t0 = time.perf_counter()
        model = build_model(model_cfg)
        if model_cfg.pretrained is not None:
            load_pretrained(model, model_cfg.pretrained, model_cfg.input_mode)
        result = fit(model, data, train, dataclasses.replace(train_cfg, seed=seed + k), trainable=model_cfg.trainable)
        scores = predict(model, data, test, train_cfg)
        record = {
            "fold": k,
            "settings": settings,
            "n_train": int(train.size),
            "threshold": result.threshold,
            "best_epoch": result.best_epoch,
            "seconds": time.perf_counter() - t0,
            "oof": OutOfFold(
                site_of[test],
                np.asarray(data.keys)[test],
                np.full(test.size, k),
                data.labels[test],
                scores,
                np.full(test.size, result.threshold),
            ).to_records(),
        }
        atomic_write_json(path, json.loads(json.dumps(record, default=str)))
        per_fold.append(record)
        progress(
            f"fold {k + 1}/{folds}: {test.size} test patients, threshold {result.threshold:.2f}, "
            f"{record['seconds']:.0f} s"
        )

    oof = OutOfFold.from_records([r for f in per_fold for r in f["oof"]])
    summary = summarize(oof)
    results = {
        "protocol": "centralized k-fold (pooled virtual sites, union of the sites' folds)",
        "synthetic_data": True,
        "settings": json.loads(json.dumps(settings, default=str)),
        "sites": {s.site: {"n": len(s), **s.counts()} for s in sites},
        "folds": [{k: v for k, v in f.items() if k != "oof"} for f in per_fold],
        "pooled": summary["pooled"],
        "per_site": summary["per_site"],
        "random_effects": summary.get("random_effects"),
        "out_of_fold": oof.to_records(),
        "wall_seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", render_markdown(results))
    return results


def render_markdown(results: dict) -> str:
    s = results["settings"]
    n_sites = len(results["sites"])
    text = [
        "# Centralized baseline: the paper's protocol on pooled virtual sites",
        "",
        "**Synthetic data.** These figures come from the project's DICOM phantom, not from patients; they check that "
        "the method and pipeline reproduce the published behaviour, nothing more.",
        "",
        f"{s['folds']}-fold cross-validation over the union of {n_sites} sites' own folds (seed {s['seed']}); model "
        f"{s['model']['arch']} ({s['model']['input_mode']}, trainable {s['model']['trainable']}, "
        f"{s['train']['image_size'] or 'native'} px); pretrained: {s['model']['pretrained'] or 'none (from scratch)'}; "
        f"{s['train']['epochs']} epoch(s). Each patient is called at the threshold chosen on its model's inner "
        "validation split. 95% CIs: Wilson (proportions), DeLong (AUC).",
        "",
        paper_table({"centralized tenfold": results["pooled"]}),
        "",
        f"AUC 95% CI by bootstrap over sites: {results['pooled']['auc_site_bootstrap']['lo']:.3f}–"
        f"{results['pooled']['auc_site_bootstrap']['hi']:.3f}. Brier {results['pooled']['brier']:.3f}, "
        f"ECE {results['pooled']['ece']:.3f}. Wall time {results['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(text)
