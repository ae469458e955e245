"""Throughput of `common.training.fit` against a bare PyTorch loop, and the class-imbalance comparison.

    python bench/train_throughput.py                      # CPU: 128 px, batch 8, ResNet50
    python bench/train_throughput.py --device cuda --size 224 --batch 128 --patients 384 --epochs 20  # GPU
    python bench/train_throughput.py --imbalance          # pos_weight vs balanced sampler: AUC, Brier, ECE

Headline: the whole-call ratio, fit's images/s over the bare loop's, each timed from the call to its return over the
same patients, batch, epochs and steps (goal on a GPU: >= 0.9). Both include moving the model to the device, warm-up
and any compile; the bare loop starts from the stacks already in host memory and keeps them on the device (the plainest
loop a user would write: a random permutation per epoch, full batches, no augmentation, no validation), fit reads them
from a cache of .npy files in a temporary folder, as in real use, and augments them by default (augment off is shown
too). Steady-state rates between the warm-up step and the last step are printed beside (synchronised only at those two
steps). Both train the same model (build_model, channels_last, AdamW, BCE-with-logits, bf16 autocast on CUDA) with the
same threads; `--patients` is a multiple of the batch, so every step is a full batch. Runs alternate (bare, fit, ...)
so that load from other processes on a shared machine hits both alike; medians printed. Figures are printed, never
asserted. Synthetic data only.
"""

from __future__ import annotations

import argparse
import csv
import logging
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(model_cfg, stacks, labels, batch, epochs, warmup, device, amp, compile_, lr=1e-3):
    """(whole-call images/s, steady images/s) of the plainest loop over the same stacks, model and steps."""
    torch.manual_seed(0)
    model = build_model(model_cfg)
    _sync(device)
    t0 = time.perf_counter()
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    crit = torch.nn.BCEWithLogitsLoss()
    fwd = torch.compile(model) if compile_ else model
    x = torch.from_numpy(stacks).to(device)
    y = torch.as_tensor(labels, dtype=torch.float32).to(device)
    n = x.shape[0]
    use_amp = amp and device.type == "cuda"
    step, t_warm = 0, None
    for _ in range(epochs):
        perm = torch.randperm(n, device=device)
        for start in range(0, n - batch + 1, batch):
            idx = perm[start : start + batch]
            xb = x.index_select(0, idx).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = fwd(xb)
            loss = crit(logits.float(), y.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == warmup:
                _sync(device)
                t_warm = time.perf_counter()
    _sync(device)
    t1 = time.perf_counter()
    return batch * step / (t1 - t0), batch * (step - warmup) / (t1 - t_warm)


def fit_run(model_cfg, data, cfg: TrainConfig, warmup: int) -> tuple[float, float]:
    """(whole-call images/s, steady images/s from the step timestamps) of one fit call."""
    torch.manual_seed(0)
    model = build_model(model_cfg)
    device = pick_device(cfg.device)
    stamps: dict[int, float] = {}

    def progress(step, total):
        if step in (warmup, total):
            _sync(device)  # only at the two timed steps: a sync per step would distort the rate
            stamps[step] = time.perf_counter()

    _sync(device)
    t0 = time.perf_counter()
    res = fit(model, data, np.arange(len(data)), cfg, progress=progress)
    total = time.perf_counter() - t0
    steady = cfg.batch_size * (res.steps - warmup) / (stamps[res.steps] - stamps[warmup])
    return cfg.batch_size * res.steps / total, steady


def throughput(args) -> None:
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    model_cfg = ModelConfig(arch=args.arch, image_size=args.size)
    patients = args.patients or 4 * args.batch
    if patients % args.batch:
        raise SystemExit("--patients: a multiple of --batch (every step a full batch, in both loops)")
    epochs = args.epochs or 3
    steps = epochs * patients // args.batch
    if not 0 < args.warmup < steps:
        raise SystemExit(f"--warmup: between 1 and the {steps} steps")
    rng = np.random.default_rng(0)
    stacks = rng.standard_normal((patients, 6, args.size, args.size), dtype=np.float32)
    labels = np.arange(patients) % 2
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}, {args.arch} {args.size} px, batch {args.batch}, "
        f"{patients} patients x {epochs} epochs = {steps} steps (steady state after {args.warmup}), amp "
        f"{args.amp and device.type == 'cuda'}, compile {args.compile}; synthetic random data"
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
        results: dict[str, list] = {"bare loop": [], **{k: [] for k in variants}}
        for _ in range(args.repeats):
            results["bare loop"].append(
                bare_loop(model_cfg, stacks, labels, args.batch, epochs, args.warmup, device, args.amp, args.compile)
            )
            for name, cfg in variants.items():
                results[name].append(fit_run(model_cfg, data, cfg, args.warmup))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in results.items()}
    bare_whole, bare_steady = med["bare loop"]
    print(f"{'':27s}  {'whole call':>10s}  {'ratio':>5s}   {'steady':>8s}  {'ratio':>5s}   whole-call runs (img/s)")
    for name, (whole, steady) in med.items():
        runs = ", ".join(f"{r[0]:.1f}" for r in results[name])
        print(
            f"{name:27s}: {whole:10.1f}  {whole / bare_whole:5.3f}   {steady:8.1f}  {steady / bare_steady:5.3f}   {runs}"
        )
    head = med["fit (augment on, default)"][0] / bare_whole
    print(f"HEADLINE whole-call ratio fit/bare = {head:.3f} (goal >= 0.9 on a GPU; medians of {args.repeats} runs)")


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
    ap.add_argument("--patients", type=int, default=None, help="stacks in the cache (default 4 batches)")
    ap.add_argument("--warmup", type=int, default=2, help="steps before the steady-state rate is timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-amp", dest="amp", action="store_false")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--imbalance", action="store_true", help="compare class-imbalance handling instead")
    ap.add_argument("--epochs", type=int, default=None, help="throughput: 3; --imbalance: 8")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    if args.imbalance:
        args.epochs = args.epochs or 8
        imbalance(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
