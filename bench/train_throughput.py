"""Throughput of `common.training.fit` against a bare PyTorch loop, and the class-imbalance comparison.

    python bench/train_throughput.py                      # CPU: 128 px, batch 8, ResNet50 (goal fit/bare >= 0.95)
    python bench/train_throughput.py --device cuda --size 224 --batch 128 --compile   # GPU: bf16, channels_last
    python bench/train_throughput.py --imbalance          # pos_weight vs balanced sampler: AUC, Brier, ECE

Both loops train the same model (build_model, channels_last, AdamW, BCE-with-logits, bf16 autocast on CUDA) on random
data of the same shape with the same batch and threads. The bare loop feeds one pre-made tensor; fit reads a cache
of .npy stacks written to a temporary folder (loaded into memory once, as in real use). Steady-state images/s come
from the step timestamps after warm-up; fit's whole-call rate (loading included) is printed too. Runs alternate
(bare, fit, bare, fit, ...) so that load from other processes on a shared machine hits both alike; medians printed.
Figures are printed, never asserted. Synthetic data only.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.model import ModelConfig, build_model  # noqa: E402
from common.sitedata import SiteData  # noqa: E402
from common.training import TrainConfig, fit, pick_device, predict  # noqa: E402


def write_cache(root: Path, stacks: np.ndarray, labels: np.ndarray) -> SiteData:
    """A prepared cache (stacks/<key>.npy + index.csv) as `client prepare` writes it."""
    (root / "stacks").mkdir(parents=True, exist_ok=True)
    with (root / "index.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "key", "label", "status", "reason", "file"])
        for i, (x, y) in enumerate(zip(stacks, labels, strict=True)):
            np.save(root / "stacks" / f"k{i:05d}.npy", x.astype(np.float32))
            w.writerow([f"P{i}", f"k{i:05d}", "malignant" if y else "benign", "ok", "", f"stacks/k{i:05d}.npy"])
    return SiteData.open(root)


def bare_loop(model_cfg, size, batch, steps, warmup, device, amp, compile_, lr=1e-3) -> float:
    """Images/s of the plainest training loop over the same model; steady state after `warmup` steps."""
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    crit = torch.nn.BCEWithLogitsLoss()
    fwd = torch.compile(model) if compile_ else model
    x = torch.randn(batch, 6, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.arange(batch, device=device) % 2).float()
    use_amp = amp and device.type == "cuda"
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = fwd(x)
        loss = crit(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def fit_run(model_cfg, data, cfg: TrainConfig, steps: int, warmup: int) -> tuple[float, float]:
    """(steady-state images/s from step timestamps, whole-call images/s) of one fit call."""
    torch.manual_seed(0)
    model = build_model(model_cfg)
    stamps: list[float] = []
    device = pick_device(cfg.device)

    def progress(step, total):
        if device.type == "cuda" and step in (warmup, warmup + steps):
            torch.cuda.synchronize()  # only at the two timed stamps: a sync per step would distort the rate
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    res = fit(model, data, np.arange(len(data)), cfg, progress=progress)
    total = time.perf_counter() - t0
    steady = cfg.batch_size * steps / (stamps[warmup + steps - 1] - stamps[warmup - 1])
    return steady, cfg.batch_size * res.steps / total


def throughput(args) -> None:
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    model_cfg = ModelConfig(arch=args.arch, image_size=args.size)
    n_batches = args.warmup + args.steps
    distinct = min(n_batches, 12)  # enough distinct stacks; epochs repeat them (no disk-sized caches on a GPU box)
    epochs = math.ceil(n_batches / distinct)
    rng = np.random.default_rng(0)
    stacks = rng.standard_normal((distinct * args.batch, 6, args.size, args.size), dtype=np.float32)
    labels = np.arange(len(stacks)) % 2
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}, {args.arch} {args.size} px, batch {args.batch}, "
        f"{args.steps} timed steps after {args.warmup} warm-up, amp {args.amp and device.type == 'cuda'}, "
        f"compile {args.compile}; synthetic random data"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = write_cache(Path(tmp), stacks, labels)
        base = dict(
            epochs=epochs,
            batch_size=args.batch,
            val_fraction=0.0,
            device=str(device),
            amp=args.amp,
            compile=args.compile,
            num_threads=args.threads,
        )
        variants = {
            "fit (augment on, default)": TrainConfig(augment=True, **base),
            "fit (augment off)": TrainConfig(augment=False, **base),
        }
        results: dict[str, list] = {"bare": [], **{k: [] for k in variants}}
        for _ in range(args.repeats):
            results["bare"].append(
                bare_loop(model_cfg, args.size, args.batch, args.steps, args.warmup, device, args.amp, args.compile)
            )
            for name, cfg in variants.items():
                results[name].append(fit_run(model_cfg, data, cfg, args.steps, args.warmup))
    bare = statistics.median(results["bare"])
    print(f"bare loop                  : {bare:8.1f} img/s  (runs: {', '.join(f'{v:.1f}' for v in results['bare'])})")
    for name in variants:
        steady = statistics.median(r[0] for r in results[name])
        whole = statistics.median(r[1] for r in results[name])
        print(
            f"{name:27s}: {steady:8.1f} img/s  ratio {steady / bare:.3f}   (whole call incl. loading and warm-up: "
            f"{whole:.1f} img/s; runs: {', '.join(f'{r[0]:.1f}' for r in results[name])})"
        )


def learnable_cohort(n: int, prevalence: float, size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 6-channel stacks whose classes overlap (an imperfect but learnable task): malignant stacks have a
    darker T1 body and a brighter T2 focus of random strength; some benign ones show a weaker version of both."""
    y = (rng.random(n) < prevalence).astype(np.int64)
    x = rng.standard_normal((n, 6, size, size), dtype=np.float32)
    lo, hi = size // 4, 3 * size // 4
    strength = np.where(y == 1, rng.uniform(0.0, 0.5, n), rng.uniform(0.0, 0.25, n)).astype(np.float32)
    x[:, 0:3, lo:hi, lo:hi] -= strength[:, None, None, None]
    x[:, 3:6, lo + 2 : hi - 2, lo + 2 : hi - 2] += strength[:, None, None, None]
    return x, y


def imbalance(args) -> None:
    from sklearn.metrics import brier_score_loss, roc_auc_score

    from common.metrics import expected_calibration_error

    torch.set_num_threads(args.threads)
    size, n_train, n_test, prevalence = 32, 96, 400, 50 / 190  # the paper's prevalence
    print(
        f"imbalance comparison: resnet18 {size} px, {n_train} training / {n_test} test patients, prevalence "
        f"{prevalence:.2f}, {args.epochs} epochs, seeds {list(range(args.seeds))}; synthetic data"
    )
    rows = {"weighted": [], "sampler": [], "none": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            rng = np.random.default_rng(100 + seed)
            x, y = learnable_cohort(n_train + n_test, prevalence, size, rng)
            data = write_cache(Path(tmp) / f"s{seed}", x, y)
            train, test = np.arange(n_train), np.arange(n_train, n_train + n_test)
            for method in rows:
                torch.manual_seed(seed)
                model = build_model(ModelConfig(arch="resnet18", image_size=size))
                cfg = TrainConfig(
                    epochs=args.epochs,
                    batch_size=8,
                    imbalance=method,
                    seed=seed,
                    device="cpu",
                    num_threads=args.threads,
                )
                res = fit(model, data, train, cfg)
                p = predict(model, data, test, cfg)
                yt = data.labels[test]
                pred = p >= res.threshold
                rows[method].append(
                    {
                        "auc": roc_auc_score(yt, p),
                        "brier": brier_score_loss(yt, p),
                        "ece": expected_calibration_error(yt, p),
                        "mean_p": float(p.mean()),
                        "sens": float(pred[yt == 1].mean()),
                        "spec": float((~pred[yt == 0]).mean()),
                    }
                )
    print(
        f"{'method':9s} {'AUC':>6s} {'Brier':>6s} {'ECE':>6s} {'mean p':>7s} {'sens':>6s} {'spec':>6s}  "
        f"(test prevalence ≈ {prevalence:.2f}; mean over seeds)"
    )
    for method, rs in rows.items():
        m = {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
        print(
            f"{method:9s} {m['auc']:6.3f} {m['brier']:6.3f} {m['ece']:6.3f} {m['mean_p']:7.3f} {m['sens']:6.3f} "
            f"{m['spec']:6.3f}"
        )


def main(argv=None) -> None:
    logging.basicConfig(level=logging.ERROR)  # the "from scratch" warning is expected here
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-amp", dest="amp", action="store_false")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--imbalance", action="store_true", help="compare class-imbalance handling instead")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    imbalance(args) if args.imbalance else throughput(args)


if __name__ == "__main__":
    main()
