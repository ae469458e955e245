"""Federated vs centralized cost of the same study: the federated tenfold and the centralized tenfold, same folds, same
total epochs per patient, same stand-in backbone and input size, in one run; prints the wall-time ratio (goal <= 1.3)
with the AUCs side by side (issue 25, item 3).

Federated: `simulate run` with protocol `tenfold` (no local-only models, no final model: the work the centralized
tenfold also does), R rounds of E local epochs, every site training under Flower's simulation engine; its wall time
counts everything a coordinator waits for (SuperLink and ClientApp starts, census, membership, evaluation, secure
sums, the report). Centralized: simulations/centralized.run_centralized on the pooled sites, R × E epochs per fold,
the configuration `simulate run` itself uses for its centralized baseline. Data are synthetic; the sites must be
prepared already (`simulate data` + a first `simulate run`, or `client prepare` per site).

    python bench/study_cost.py --data results/quick/data --pretrained results/quick/standin_r50_64.pt \
        --k 3 --rounds 2 --local-epochs 3 --out /tmp/study_cost        # the quick cohort (minutes)
    python bench/study_cost.py --data DATA --pretrained standin_r50_64.pt --k 10 --rounds 5   # the README's study
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def experiment(args) -> dict:
    return {
        "protocol": "tenfold",
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "lr": 1e-3,
        "evaluate": "none",
        "folds": {"k": args.k, "seed": 0},
        "plan": {"local_only": False, "final_model": False},
        "min_cell": 5,
        "model": {
            "arch": "resnet50",
            "trainable": args.trainable,
            "image_size": args.image_size,
            "pretrained": str(args.pretrained.resolve()),
        },
        "train": {"batch_size": args.batch_size, "augment": True},
    }


def federated(args, exp_path: Path, out: Path) -> tuple[float, dict]:
    cmd = [str(Path(sys.executable).parent / "simulate"), "run", "--experiment", str(exp_path)]
    cmd += ["--data", str(args.data), "--out", str(out), "--no-centralized", "--timeout", str(args.timeout)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"simulate run failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return wall, json.loads((out / "results.json").read_text())["protocols"]["tenfold"]


def centralized(args, exp: dict, out: Path) -> tuple[float, dict]:
    from common.model import ModelConfig
    from common.training import TrainConfig
    from simulations.centralized import run_centralized

    model_cfg = ModelConfig.from_dict(exp["model"])
    epochs = exp["rounds"] * exp["local_epochs"]  # the epochs each patient gets in the federation
    train_cfg = TrainConfig.from_dict(
        {**exp["train"], "epochs": epochs, "lr": exp["lr"], "image_size": model_cfg.image_size}
    )
    t0 = time.perf_counter()
    results = run_centralized(args.data, out, model_cfg, train_cfg, folds=exp["folds"]["k"], seed=exp["folds"]["seed"])
    return time.perf_counter() - t0, results


def _auc(a: dict | None) -> str:
    if not a or a.get("value") is None:
        return "n/a"
    return f"{a['value']:.3f} ({a['lo']:.3f}-{a['hi']:.3f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="prepared virtual sites (simulate data)")
    p.add_argument("--pretrained", type=Path, required=True, help="the stand-in backbone (simulate pretrain)")
    p.add_argument("--out", type=Path, default=Path("/tmp/study_cost"))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--trainable", default="layer4+head")
    p.add_argument("--timeout", type=int, default=6 * 3600)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    exp = experiment(args)
    exp_path = args.out / "experiment.yaml"
    exp_path.write_text(yaml.safe_dump(exp, sort_keys=False))
    load = os.getloadavg()[0]
    fed_wall, fed = federated(args, exp_path, args.out / "federated")
    cen_wall, cen = centralized(args, exp, args.out / "centralized")
    ratio = fed_wall / cen_wall
    rows = {
        "federated": {"wall_s": fed_wall, "auc_random_effects": (fed.get("random_effects") or {}).get("auc"),
                      "auc_pooled_histogram": fed["pooled"].get("auc_histogram"), "n": fed["pooled"]["n"]},
        "centralized": {"wall_s": cen_wall, "auc_pooled_delong": cen["pooled"]["auc"], "n": cen["pooled"]["n"]},
        "ratio": ratio,
        "settings": {**vars(args), "load_at_start": load, "epochs_per_patient": args.rounds * args.local_epochs},
    }  # fmt: skip
    (args.out / "study_cost.json").write_text(json.dumps(rows, indent=1, default=str))
    epochs = args.rounds * args.local_epochs
    print(f"# study cost: tenfold k={args.k}, {epochs} epochs per patient ({args.rounds} rounds x {args.local_epochs}),"
          f" {args.image_size} px, {args.trainable}; load average at start {load:.1f}")  # fmt: skip
    print(f"{'':12} {'wall':>9}  AUC")
    re = rows["federated"]["auc_random_effects"] or {}
    re_text = (
        f"{re.get('estimate', float('nan')):.3f} ({re.get('lo', float('nan')):.3f}-{re.get('hi', float('nan')):.3f})"
    )
    print(f"{'federated':12} {fed_wall:8.0f}s  random effects over sites {re_text}; pooled histogram "
          f"{rows['federated']['auc_pooled_histogram']:.3f} (n = {fed['pooled']['n']})")  # fmt: skip
    print(f"{'centralized':12} {cen_wall:8.0f}s  pooled DeLong {_auc(cen['pooled']['auc'])} (n = {cen['pooled']['n']})")
    print(f"ratio federated / centralized wall time: {ratio:.2f} (goal <= 1.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
