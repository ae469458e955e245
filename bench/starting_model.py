"""How well the starting model ranks the sites' patients before any site trains: the baseline that says how much of a
federated (or DP) result the sites' training adds. Prints; asserts nothing.

The starting model is what every protocol unit starts from: the experiment's architecture, the pretrained backbone
(torchvision layout: fresh head), seeded like the ServerApp (`torch.manual_seed(seed)`). It scores every labelled
patient of every virtual site; the figure is the AUC pooled over patients (no threshold involved).

    python bench/starting_model.py --data D --pretrained data/standin_r50_64.pt --size 64

Recorded (2026-12-05, default cohort `simulate data`, stand-in from `simulate pretrain --size 64 --epochs 12` on the
`--public` cohort): pooled AUC 0.909 over 190 patients. The DP sweep on the same data and backbone (README) ends at
0.90-0.92 whatever ε: on this synthetic cohort the backbone carries nearly all of the signal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from common.config import load_site_config
from common.model import ModelConfig, build_model
from common.sitedata import SiteData
from common.training import TrainConfig, predict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of prepared virtual sites (<site>/site.yaml)")
    parser.add_argument("--pretrained", type=Path, help="backbone weights (none: random initialisation)")
    parser.add_argument("--size", type=int, default=64, help="image size the network sees")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--seed", type=int, default=0, help="the experiment's seed (the fresh head's initialisation)")
    args = parser.parse_args(argv)
    cfg = {"arch": args.arch, "trainable": "layer4+head", "image_size": args.size}
    if args.pretrained:
        cfg["pretrained"] = str(args.pretrained)
    torch.manual_seed(args.seed)
    model = build_model(ModelConfig.from_dict(cfg))
    labels, scores, per_site = [], [], []
    for path in sorted(args.data.glob("*/site.yaml")):
        site = load_site_config(path)
        data = SiteData.open(site.cache, site.site)
        idx = np.flatnonzero(data.labels >= 0)
        s = predict(model, data, idx, TrainConfig(image_size=args.size, device="cpu"))
        y = data.labels[idx]
        labels.append(y)
        scores.append(s)
        auc = roc_auc_score(y, s) if len(set(y.tolist())) == 2 else float("nan")
        per_site.append(f"{site.site} {auc:.3f} (n {y.size})")
    y, s = np.concatenate(labels), np.concatenate(scores)
    print(f"starting model ({args.arch}, {args.pretrained or 'random init'}, {args.size} px, seed {args.seed})")
    print(f"pooled AUC {roc_auc_score(y, s):.3f} over {y.size} patients ({int(y.sum())} malignant)")
    print("per site: " + ", ".join(per_site))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
