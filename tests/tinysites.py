"""Tiny prepared sites for federation tests: site.yaml + cache (stacks/<key>.npy, index.csv) written directly.

Until `client prepare` output is used here, this mirrors its contract (common/sitedata.py). Malignant stacks carry a
darker lesion-slice T1 channel (diffuse low T1), so a small network can learn something in one round.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

TINY_MODEL = {"arch": "resnet18", "input_mode": "adapter", "norm": "batch", "trainable": "all", "image_size": 32}
TINY_TRAIN = {"batch_size": 4, "augment": False, "num_threads": 1, "val_fraction": 0.25}


def make_site(root: Path, name: str, n: int = 12, n_malignant: int = 4, size: int = 32, seed: int = 0, **extra) -> Path:
    """Write one site; returns its site.yaml. `extra` adds top-level site.yaml lines (e.g. share_predictions, or
    privacy={"dp": True, "epsilon_budget": 3, "ledger": path} for a DP site)."""
    site = Path(root) / name
    stacks = site / "cache" / "stacks"
    stacks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "malignant" if i < n_malignant else "benign"
        key = f"{name}-k{i:03d}"
        x = rng.normal(0.0, 1.0, (6, size, size)).astype(np.float32)
        if label == "malignant":
            x[1] -= 1.5
        np.save(stacks / f"{key}.npy", x)
        rows.append({"patient_id": f"PATIENT-{name}-{i}", "key": key, "label": label, "status": "ok", "reason": ""})
        rows[-1]["file"] = f"stacks/{key}.npy"
    rows.append({"patient_id": f"PATIENT-{name}-skip", "key": "", "label": "benign", "status": "skipped"})
    rows[-1].update({"reason": "line 99: slice not found", "file": ""})
    with (site / "cache" / "index.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["patient_id", "key", "label", "status", "reason", "file"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"site: {name}",
        "data:",
        "  root: data",
        "  cache: cache",
        "  secret: secret.key",
        "train:",
        "  device: cpu",
    ]
    for k, v in extra.items():  # a mapping (e.g. privacy={"dp": True, ...}) becomes a nested block
        items = v.items() if isinstance(v, dict) else None
        lines += [f"{k}:", *(f"  {kk}: {_yaml(vv)}" for kk, vv in items)] if items is not None else [f"{k}: {_yaml(v)}"]
    (site / "site.yaml").write_text("\n".join(lines) + "\n")
    return site / "site.yaml"


def _yaml(v) -> str:
    return str(v).lower() if isinstance(v, bool) else (f'"{v}"' if isinstance(v, Path) else str(v))
