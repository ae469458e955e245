"""Pretrain a stand-in backbone on the synthetic "public" cohort, to be used exactly as ImageNet weights would be.

No ImageNet weights can be downloaded here, so simulations start from a ResNet trained once on a separate synthetic
cohort (never the virtual sites' patients). The result is a torchvision-layout state dict (3-channel `conv1`, `fc`),
loadable by `common.model.load_pretrained` (and by `torchvision.models.resnet50(num_classes=1)`), plus a sidecar JSON
that says what it is: a synthetic stand-in, not ImageNet.

The round trip, and why the adapter is not saved: a torchvision file has no place for the 6→3 adapter, and a trained
adapter cannot be folded into a 3-channel conv1. So pretraining keeps the adapter frozen at its fixed initialisation
(`common.model.ADAPTER_INIT`; it gets gradients but is not in the optimizer), and `load_pretrained` re-creates exactly
that adapter. The loaded backbone therefore computes the same function as at the end of pretraining, in adapter mode
and, through `conv1_from_rgb`, in conv1 mode too. The head (`fc`) is saved for completeness; `load_pretrained` treats
the file like ImageNet weights and starts a fresh head. BatchNorm is always used here (ImageNet-style weights carry BN
statistics); a group-norm model takes only the norms' affine parameters from the file, as it would from ImageNet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from common.errors import SpineFedError
from common.fileio import atomic_write_text
from common.model import ADAPTER_INIT, ModelConfig, build_model
from common.sitedata import SiteData
from common.training import TrainConfig, default_optimizer, fit

log = logging.getLogger(__name__)

PROVENANCE = "synthetic stand-in, not ImageNet"


def sidecar_path(out: Path) -> Path:
    """weights.pt → weights.json beside it."""
    return Path(out).with_suffix(".json")


def completed_weights(out: Path) -> dict | None:
    """The sidecar of a complete `pretrain` output, else None: the weights file and its sidecar both present and the
    sidecar's sha256 matching the weights (a run killed between the two writes, or a replaced file, is incomplete)."""
    out = Path(out)
    try:
        meta = json.loads(sidecar_path(out).read_text(encoding="utf-8"))
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("weights_sha256") == digest else None


def pretrain(
    public_cache_dirs: list[Path],
    out: Path,
    model_cfg: ModelConfig = ModelConfig(),
    train_cfg: TrainConfig = TrainConfig(epochs=10),
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Train all layers (adapter mode, BatchNorm, adapter frozen) on the public caches; save weights + sidecar JSON.

    model_cfg supplies arch, image size and optional starting weights; its input_mode, norm and trainable are
    overridden (adapter, batch, all) because the file must be a torchvision-layout backbone. Returns `out`.
    """
    if not public_cache_dirs:
        raise SpineFedError("pretrain: no public cache folders given")
    caches = [SiteData.open(d, site=Path(d).name) for d in public_cache_dirs]
    data = SiteData.concat(caches, site="public")
    indices = data.labelled()
    if indices.size < 4 or len(np.unique(data.labels[indices])) < 2:
        raise SpineFedError("pretrain: the public caches need labelled patients of both classes")

    cfg = dataclasses.replace(model_cfg, input_mode="adapter", norm="batch", trainable="all")
    if (model_cfg.input_mode, model_cfg.norm, model_cfg.trainable) != ("adapter", "batch", "all"):
        log.info("pretrain: using input_mode=adapter, norm=batch, trainable=all (a torchvision-layout backbone)")
    if train_cfg.image_size is None:
        train_cfg = dataclasses.replace(train_cfg, image_size=cfg.image_size)
    model = build_model(cfg)
    adapter_params = {id(p) for p in model.adapter.parameters()}

    def optimizer_without_adapter(params, tcfg):
        return default_optimizer([p for p in params if id(p) not in adapter_params], tcfg)

    log.info(
        "pretrain: %d public patients %s, %s at %d px", indices.size, data.counts(), cfg.arch, train_cfg.image_size
    )
    result = fit(
        model, data, indices, train_cfg, trainable="all", progress=progress, optimizer_factory=optimizer_without_adapter
    )
    if not torch.equal(model.adapter.weight.detach().cpu()[:, :, 0, 0], ADAPTER_INIT):
        raise RuntimeError("pretrain: the adapter moved; the saved backbone would not match a reloaded adapter")

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("adapter.")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)  # never a half-written weights file under the final name

    val_auc = None
    if len(np.unique(result.val_labels)) == 2:
        from sklearn.metrics import roc_auc_score

        val_auc = float(roc_auc_score(result.val_labels, result.val_scores))
    meta = {
        "provenance": PROVENANCE,
        "description": (
            "ResNet backbone trained on a separate synthetic 'public' spine-MRI phantom cohort (never the sites' "
            "patients), standing in for ImageNet weights, which cannot be downloaded here. Synthetic data: no "
            "clinical meaning."
        ),
        "layout": "torchvision ResNet state dict: 3-channel conv1, fc with 1 output (re-initialised on load)",
        "adapter": (
            "not saved: frozen at common.model.ADAPTER_INIT during pretraining, so load_pretrained's fresh adapter "
            "(adapter mode) or conv1_from_rgb (conv1 mode) reproduces the pretrained function exactly"
        ),
        "arch": cfg.arch,
        "norm": "batch",
        "image_size": train_cfg.image_size,
        "caches": [{"name": Path(c.cache).name, "patients": len(c), "counts": c.counts()} for c in caches],
        "model_config": cfg.to_dict(),
        "train_config": train_cfg.to_dict(),
        "result": {
            "train_patients": result.n_examples,
            "steps": result.steps,
            "train_loss": result.train_loss,
            "best_epoch": result.best_epoch,
            "inner_val_patients": int(result.val_indices.size),
            "inner_val_auc": val_auc,
        },
        "weights_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(sidecar_path(out), json.dumps(meta, indent=2) + "\n")  # last: it marks the output complete
    log.info("pretrain: wrote %s (%s) and %s", out, PROVENANCE, sidecar_path(out).name)
    return out
