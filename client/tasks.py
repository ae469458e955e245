"""What a site does for each federated message — census, train, evaluate — as plain functions over its cache.

The ClientApp (client/app.py) only decodes messages and encodes replies around these. Everything here runs at the
site. What these functions return leaves the site, so it is counts, tensors and aggregates only; per-key scores only
when the site's config says `share_predictions: true`. Exceptions that reach a reply must be `SiteRefusal`, whose
message is written here and names no patient, file or path (`refusal()` turns anything else into a generic one).

Which site a node is: node config `site-config` = path of the site's site.yaml (real SuperNodes:
`flower-supernode --node-config 'site-config="/etc/spinefed/site.yaml"'`). In simulation a virtual node has only
`partition-id`; the run config key `sim-sites` then names a JSON list of site.yaml paths indexed by partition-id
(written by `simulate run`). A node-config `site-config` always wins, so a run config cannot re-point a real site.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from client.evalstore import EvalStore, default_folder
from common import metrics as M
from common.config import SiteConfig, load_site_config
from common.model import ModelConfig, build_model, get_exchange_arrays, set_exchange_arrays
from common.sitedata import SiteData
from common.splits import assign_folds

log = logging.getLogger("spinefed.site")  # stays at the site


class SiteRefusal(Exception):
    """A refusal whose message is safe to send to the coordinator."""


def refusal(exc: BaseException, what: str) -> SiteRefusal:
    """The exception as it may leave the site: SiteRefusal as is, anything else as a generic line."""
    if isinstance(exc, SiteRefusal):
        return exc
    log.error("%s failed at this site", what, exc_info=exc)  # full details stay in the site's log
    return SiteRefusal(f"{what} failed at the site ({exc.__class__.__name__}); details are in the site's log")


@dataclass(frozen=True)
class Site:
    config: SiteConfig
    data: SiteData

    @property
    def name(self) -> str:
        return self.config.site


def site_config_path(node_config: dict, run_config: dict) -> Path:
    if node_config.get("site-config"):
        return Path(str(node_config["site-config"]))
    if "partition-id" in node_config and run_config.get("sim-sites"):
        paths = json.loads(Path(str(run_config["sim-sites"])).read_text())
        return Path(paths[int(node_config["partition-id"])])
    raise SiteRefusal("this node has no site configuration (node config key 'site-config')")


@lru_cache(maxsize=8)
def _open(path: str, stamp: float) -> Site:
    cfg = load_site_config(path)
    return Site(cfg, SiteData.open(cfg.cache, cfg.site))


def open_site(node_config: dict, run_config: dict) -> Site:
    """The node's site and its cache (cached per process while index.csv is unchanged)."""
    try:
        path = site_config_path(node_config, run_config)
        cfg = load_site_config(path)
        index = cfg.cache / "index.csv"
        site = _open(str(path), index.stat().st_mtime if index.is_file() else 0.0)
    except SiteRefusal:
        raise
    except Exception as exc:
        log.error("site configuration or cache unusable", exc_info=exc)
        raise SiteRefusal("the site's configuration or prepared cache is not usable; see the site's log") from None
    if len(site.data) == 0:
        raise SiteRefusal("the site has no usable patients (nothing prepared)")
    return site


def census(site: Site) -> dict:
    counts = site.data.counts()
    return {
        "num-examples": len(site.data),
        "n-benign": counts["benign"],
        "n-malignant": counts["malignant"],
        "n-unlabelled": int((site.data.labels < 0).sum()),
    }


def fold_of(site: Site, k: int, seed: int) -> np.ndarray:
    """Fold of every patient (−1: unlabelled, or no fold plan)."""
    if k < 2:
        return np.full(len(site.data), -1, dtype=np.int64)
    folds = assign_folds(list(site.data.keys), site.data.labels.tolist(), k=k, seed=seed)
    return np.array([folds.get(key, -1) for key in site.data.keys], dtype=np.int64)


def select(site: Site, subset: str, k: int, seed: int, held_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, folds) of the labelled patients in `subset`: train (all but the held-out fold), held-out, all."""
    folds = fold_of(site, k, seed)
    labelled = site.data.labels >= 0
    if subset == "all" or held_out < 0:
        mask = labelled
    elif subset == "held-out":
        mask = labelled & (folds == held_out)
    elif subset == "train":
        mask = labelled & (folds != held_out)
    else:
        raise SiteRefusal(f"unknown subset {subset!r}")
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        raise SiteRefusal(f"no labelled patients in the requested subset ({subset})")
    return idx, folds[idx]


def _model(model_cfg: dict, seed: int) -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig.from_dict(model_cfg)
    torch.manual_seed(seed)  # frozen parts without pretrained weights must be the same at every site and the server
    return build_model(cfg), cfg


def norm_keys(model: torch.nn.Module, keys) -> list[str]:
    """Keys of normalisation layers (weights and statistics) among `keys`: what FedBN keeps at the site."""
    norm = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)
    prefixes = [name + "." for name, mod in model.named_modules() if isinstance(mod, norm)]
    return [k for k in keys if any(k.startswith(p) for p in prefixes)]


def load_global(model, arrays: dict, trainable: str, local_norm: dict | None) -> None:
    """Global tensors; with FedBN the site's own norm tensors on top (a site that never trained keeps the global)."""
    if local_norm:
        arrays = {**arrays, **{k: v for k, v in local_norm.items() if k in arrays}}
    # A 0-d tensor (BN batch counter) may arrive as shape (1,) (np.ascontiguousarray does that): restore the shapes.
    state = model.state_dict()
    arrays = {
        k: np.reshape(v, tuple(state[k].shape)) if k in state and np.size(v) == 1 else v for k, v in arrays.items()
    }
    set_exchange_arrays(model, arrays, trainable)


def train(site: Site, arrays: dict, cfg: dict, local_norm: dict | None = None) -> tuple[dict, dict, dict]:
    """One round of local training. Returns (exchanged tensors, metrics, norm tensors for FedBN)."""
    from common import training  # lazy: the census needs neither the optimizer code nor its imports

    t0 = time.monotonic()
    if site.config.privacy.dp:
        # The site's privacy setting binds whatever the coordinator asks; without the DP trainer it must refuse.
        raise SiteRefusal("this site requires differential privacy, which this app version does not provide")
    model, mcfg = _model(cfg["model"], cfg["seed"])
    load_global(model, arrays, mcfg.trainable, local_norm)
    idx, _ = select(site, "train", cfg["k"], cfg["fold-seed"], cfg["held-out"])
    if cfg.get("noop"):  # bench/federation_overhead.py: the fixed cost of a round (load and return the tensors)
        metrics = {k: 0 for k in ("train-loss", "steps", "val-examples", "dp")} | {"threshold": -1.0, "epsilon": -1.0}
        out = get_exchange_arrays(model, mcfg.trainable)
        return out, {**metrics, "num-examples": int(idx.size), "seconds": time.monotonic() - t0}, {}
    tcfg = training.TrainConfig.from_dict(cfg["train"])
    tcfg = replace(
        tcfg,
        epochs=cfg["epochs"],
        lr=cfg["lr"],
        fedprox_mu=cfg["proximal-mu"],
        seed=cfg["seed"] * 1000 + cfg["server-round"],
        device=site.config.train_device,  # the site decides its hardware
        image_size=mcfg.image_size,
    )
    # FedProx pulls towards the weights at entry, which are the round's global tensors (fit's default).
    res = training.fit(model, site.data, idx, tcfg, trainable=mcfg.trainable)
    out = get_exchange_arrays(model, mcfg.trainable)
    metrics = {
        "num-examples": int(res.n_examples),
        "train-loss": float(res.train_loss),
        "steps": int(res.steps),
        "val-examples": len(res.val_indices),
        "threshold": float(res.threshold) if res.threshold is not None else -1.0,
        "dp": 0,
        "epsilon": -1.0,
        "seconds": time.monotonic() - t0,
    }
    return out, metrics, {k: out[k] for k in norm_keys(model, out)}


def evaluate(site: Site, arrays: dict, cfg: dict, local_norm: dict | None = None) -> tuple[dict, dict | None]:
    """Score the requested subset, keep the scores in the site's store, reply aggregates (see common/replies.py).

    The aggregate fields describe everything stored under the tag and are only filled when `report` is 1: sending
    them after every fold would let the coordinator difference two cumulative histograms into one fold's (a few
    patients' scores). Until then they are placeholders (zeros, −1).
    """
    from common import training

    t0 = time.monotonic()
    model, mcfg = _model(cfg["model"], cfg["seed"])
    load_global(model, arrays, mcfg.trainable, local_norm)
    idx, folds = select(site, cfg["subset"], cfg["k"], cfg["fold-seed"], cfg["held-out"])
    tcfg = replace(
        training.TrainConfig.from_dict(cfg["train"]), device=site.config.train_device, image_size=mcfg.image_size
    )
    scores = np.asarray(training.predict(model, site.data, idx, tcfg), dtype=np.float64)
    store = EvalStore(default_folder(site.config.cache))
    keys = [site.data.keys[i] for i in idx]
    stored = store.record(cfg["tag"], keys, site.data.labels[idx], scores, folds)
    nbins = len(M.DEFAULT_EDGES) - 1
    out = {"num-examples": int(idx.size), "stored": stored, "reported": int(cfg["report"]), "seconds": 0.0}
    out.update({"n-pos": 0, "n-neg": 0, "auc": -1.0, "auc-var": -1.0, "tp": 0, "fp": 0, "tn": 0, "fn": 0})
    out.update({"hist-pos": [0.0] * nbins, "hist-neg": [0.0] * nbins, "shared": 0})
    predictions = None
    if cfg["report"]:
        all_keys, y, s, f = store.arrays(cfg["tag"])
        auc, var = M.delong_auc(y, s)
        c = M.confusion(y, s, cfg["threshold"] if cfg["threshold"] >= 0 else 0.5)
        hp, hn = M.score_histogram(y, s)
        out.update({"n-pos": int((y == 1).sum()), "n-neg": int((y == 0).sum())})
        out.update({"auc": auc if np.isfinite(auc) else -1.0, "auc-var": var if np.isfinite(var) else -1.0})
        out.update({"tp": int(c.tp), "fp": int(c.fp), "tn": int(c.tn), "fn": int(c.fn)})
        out["hist-pos"] = [float(v) for v in M.suppress_small_cells(hp, cfg["min-cell"])]
        out["hist-neg"] = [float(v) for v in M.suppress_small_cells(hn, cfg["min-cell"])]
        if site.config.share_predictions:
            out["shared"] = 1
            predictions = {"keys": all_keys, "scores": s.tolist(), "labels": y.tolist(), "folds": f.tolist()}
    out["seconds"] = time.monotonic() - t0
    return out, predictions
