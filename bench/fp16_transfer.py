"""fp16 transfer (experiment key `transfer_dtype`): what it saves on the wire and what it does to AUC.

Two measurements, printed and written to OUT/fp16_transfer.json (never asserted in tests):
1. Payload: bytes of the exchanged tensors per site per round (down + up) for each trainable subset, float32 vs
   float16 on the wire; counted from the built model (no training), ResNet50 by default.
2. AUC: the same tiny federation trained twice, float32 vs float16 transfer, evaluated on held-out patients. Three
   synthetic sites (tests/tinysites.py) train in-process through client/tasks.train, the site's own code path (load
   the global tensors, train one local epoch, reply in the wire dtype); the "server" casts the global tensors to the
   wire dtype, turns the replies back into float32 and aggregates them by an example-weighted mean (FedAvg), as
   server/strategy.py does. The final global tensors are evaluated as a site would receive them (through the wire
   dtype). Same seeds in both runs: any difference comes from the transfer, either directly (rounding of the final
   model, also reported alone) or through training (AdamW's normalised steps turn tiny input differences into
   different trajectories, so the two runs drift apart like two seeds would). A tiny-scale check (resnet18, 32 px,
   a few dozen synthetic patients), not a statement about the real cohort.

    python bench/fp16_transfer.py [--out runs/bench-fp16] [--rounds 2] [--arch resnet50]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.backbones import TRAINABLE_GROUPS as SUBSETS  # noqa: E402

TINY_MODEL = {"arch": "resnet18", "input_mode": "adapter", "norm": "batch", "trainable": "all", "image_size": 32}
TINY_TRAIN = {"batch_size": 4, "augment": False, "num_threads": 1, "val_fraction": 0.25}


def payload(arch: str) -> dict[str, dict[str, int]]:
    """trainable subset → {dtype: bytes per site per round, down + up}."""
    import torch

    from common.model import ModelConfig, build_model, get_exchange_arrays
    from common.transfer import TRANSFER_DTYPES, payload_bytes

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch))
    out = {}
    for subset in SUBSETS:
        arrays = get_exchange_arrays(model, subset)
        out[subset] = {dt: 2 * payload_bytes(arrays, dt) for dt in TRANSFER_DTYPES}
    return out


def _mean(replies: list[tuple[dict, int]]) -> dict[str, np.ndarray]:
    """Example-weighted mean in float32 (float64 accumulation); integer tensors rounded back, as the strategy does."""
    total = sum(n for _, n in replies)
    out = {}
    for key, ref in replies[0][0].items():
        acc = sum(np.asarray(a[key], dtype=np.float64) * (n / total) for a, n in replies)
        out[key] = np.rint(acc).astype(ref.dtype) if ref.dtype.kind in "iu" else acc.astype(np.float32)
    return out


def federate(sites, holdout, dtype: str, rounds: int, lr: float) -> dict:
    """Train the tiny federation with `dtype` on the wire; AUC of the final model on the held-out patients."""
    import torch

    from client import tasks
    from common.model import ModelConfig, build_model, get_exchange_arrays
    from common.transfer import decode_arrays, encode_arrays

    torch.manual_seed(0)
    glob = dict(get_exchange_arrays(build_model(ModelConfig.from_dict(TINY_MODEL)), "all"))
    cfg = {"model": TINY_MODEL, "train": TINY_TRAIN, "seed": 0, "k": 0, "fold-seed": 0, "held-out": -1}
    cfg.update({"epochs": 1, "lr": lr, "proximal-mu": 0.0, "transfer-dtype": dtype})
    t0 = time.monotonic()
    for rnd in range(1, rounds + 1):
        down = encode_arrays(glob, dtype)
        replies = []
        for site in sites:
            up, metrics, _ = tasks.train(site, down, {**cfg, "server-round": rnd})
            assert all(v.dtype == np.dtype(dtype) for v in up.values() if v.dtype.kind == "f")
            replies.append((decode_arrays(up), metrics["num-examples"]))
        glob = _mean(replies)
    auc, var = evaluate(holdout, glob, dtype)
    return {"auc": float(auc), "auc_se": float(np.sqrt(var)), "seconds": time.monotonic() - t0, "global": glob}


def evaluate(holdout, glob: dict, dtype: str) -> tuple[float, float]:
    """(AUC, DeLong variance) on the held-out patients of the global tensors received through `dtype`."""
    from client import tasks
    from common import metrics as M
    from common import training
    from common.model import ModelConfig, build_model
    from common.transfer import encode_arrays

    model = build_model(ModelConfig.from_dict(TINY_MODEL))
    tasks.load_global(model, encode_arrays(glob, dtype), "all", None)  # as a site receives the final model
    tcfg = training.TrainConfig.from_dict({**TINY_TRAIN, "image_size": TINY_MODEL["image_size"]})
    idx = np.flatnonzero(holdout.data.labels >= 0)
    scores = np.asarray(training.predict(model, holdout.data, idx, tcfg), dtype=np.float64)
    return M.delong_auc(holdout.data.labels[idx], scores)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-fp16"))
    p.add_argument("--arch", default="resnet50", help="model for the payload count")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patients", type=int, default=24, help="per training site (a third malignant)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from client import tasks
    from tests.tinysites import make_site

    sizes = payload(args.arch)
    print(f"payload per site per round (down+up), {args.arch}:")
    for subset, by in sizes.items():
        print(f"  {subset:<12} float32 {by['float32'] / 1e6:9.3f} MB   float16 {by['float16'] / 1e6:9.3f} MB")

    with tempfile.TemporaryDirectory() as tmp:
        n, m = args.patients, args.patients // 3
        paths = [make_site(Path(tmp), f"site{i}", n=n, n_malignant=m, seed=10 + i) for i in range(3)]
        sites = [tasks.open_site({"site-config": str(p)}, {}) for p in paths]
        hold = tasks.open_site({"site-config": str(make_site(Path(tmp), "holdout", n=40, n_malignant=14, seed=99))}, {})
        runs = {dt: federate(sites, hold, dt, args.rounds, args.lr) for dt in ("float32", "float16")}
        # Rounding alone, without its effect on training: the float32-trained model received through float16.
        rounding_only = float(evaluate(hold, runs["float32"]["global"], "float16")[0])
    diff = max(
        float(np.abs(runs["float16"]["global"][k].astype(np.float64) - v).max())
        for k, v in runs["float32"]["global"].items()
    )
    result = {
        "payload_bytes_per_site_round": sizes,
        "auc_check": {
            "scale": "tiny synthetic check: resnet18, 32 px, 3 sites x "
            f"{args.patients} patients, {args.rounds} rounds, 1 local epoch; 40 held-out patients",
            **{dt: {k: v for k, v in r.items() if k != "global"} for dt, r in runs.items()},
            "max_abs_weight_diff": diff,
            "auc_float32_model_through_float16": rounding_only,
        },
        "synthetic": True,
    }
    (args.out / "fp16_transfer.json").write_text(json.dumps(result, indent=1))
    print(f"AUC on 40 held-out patients ({result['auc_check']['scale']}):")
    for dt, r in runs.items():
        print(f"  {dt}: AUC {r['auc']:.4f} (DeLong SE {r['auc_se']:.4f}), {r['seconds']:.1f} s")
    print(f"  the float32-trained model received through float16 (rounding only): AUC {rounding_only:.4f}")
    print(f"  largest |weight difference| of the two final models: {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
