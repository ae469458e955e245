"""Cost of differential privacy: DP-SGD step time and peak memory against the plain step, and the ledger's ε time.

    python bench/dp_overhead.py                                  # CPU: ResNet50, 64 px, batch 8, every subset
    python bench/dp_overhead.py --device cuda --size 224 --batch 32
    python bench/dp_overhead.py --only-ledger                    # ε on 150 distinct ledger entries vs one merged

Per trainable subset (head, layer4+head, all) and norm (group; batch norm frozen where DP allows it), each in its own
process so that peak memory is that configuration's own: ru_maxrss growth over the process's resident size before
the loop (CPU), torch.cuda.max_memory_allocated (CUDA). Step times come from a third process that interleaves plain
and DP steps (load from other processes on a shared machine then hits both alike); the ratio is the median of the
per-pair ratios. The DP step is the one the site runs: common.dp_training's
make_private (Opacus hooks, Poisson sampling at the site's q, BatchMemoryManager at the batch size, noise) in the same
loop fit runs (AdamW, BCE-with-logits, channels_last). A DP "step" is one noisy optimizer step over a Poisson batch of
the same expected size as the plain batch; both are also given as images/s. Synthetic data; figures printed, never
asserted. Goal (issue 9): the default DP mode (layer4+head) ≤ 1.5× the plain step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = [  # (norm, trainable)
    ("group", "head"),
    ("group", "layer4+head"),
    ("group", "all"),
    ("batch", "head"),
    ("batch", "layer4+head"),
]


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _setup(args, dp: bool):
    """(model, optimizer, loader iterator factory) for one configuration, as fit would build them."""
    import torch
    from torch.utils.data import DataLoader

    from common.config import PrivacyConfig
    from common.dp_training import DPRound, site_sample_rate
    from common.model import ModelConfig, apply_trainable, build_model
    from common.training import StackDataset, default_optimizer
    from common.training import TrainConfig as TC

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = ModelConfig(arch=args.arch, norm=args.norm, trainable=args.trainable, image_size=args.size)
    model = build_model(cfg).to(device, memory_format=torch.channels_last)
    n = args.batch * (args.steps + args.warmup)  # one epoch covers the steps
    x = torch.randn(n, 6, args.size, args.size)
    y = (torch.rand(n) < 0.3).float()
    ds = StackDataset(x.to(device), y.to(device))
    loader = DataLoader(ds, batch_size=args.batch, shuffle=True)
    model.train()
    apply_trainable(model, args.trainable)
    opt = default_optimizer([p for p in model.parameters() if p.requires_grad], TC(lr=1e-4))
    if dp:
        q, k = site_sample_rate(n, args.batch)
        ledger = Path(tempfile.mkdtemp()) / "ledger.json"
        priv = PrivacyConfig(
            dp=True,
            epsilon_budget=1e9,
            delta=1e-5,
            max_grad_norm=1.0,
            ledger=ledger,
            ledger_record=ledger.with_name("record.json"),
            max_epsilon_per_experiment=1e9,
            max_noise_multiplier=1e4,
        )
        # Many epochs reserved: the interleaved timing may run past one epoch.
        dp_round = DPRound(priv, sigma=1.0, q=q, steps_per_epoch=k, epochs=1000, purpose="bench", seed=0)
        model, opt, loader = dp_round.make_private(model, opt, loader)
    return model, opt, loader


def _steps(model, opt, loader, dp: bool, device):
    """Yield (seconds, images) per optimizer step, forever (a DP step may span two physical batches)."""
    import torch
    from torch import nn

    crit = nn.BCEWithLogitsLoss()
    while True:
        seen, t0 = 0, time.perf_counter()
        for xb, yb in loader:
            xb = xb.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            crit(model(xb).float(), yb).backward()
            opt.step()
            seen += xb.shape[0]
            if dp and opt._is_last_step_skipped:  # a split Poisson batch: one step, two passes
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            yield t - t0, seen
            seen, t0 = 0, t


def one(args) -> dict:
    """Peak memory of one (norm, trainable, dp) configuration, measured in this process alone."""
    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, opt, loader = _setup(args, bool(args.dp))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_kib()
    it = _steps(model, opt, loader, bool(args.dp), device)
    for _ in range(args.warmup + 2):
        next(it)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {"peak_mib": peak}


def timing(args) -> dict:
    """Plain and DP steps interleaved in one process (step, step, step, ...), so that load from other processes on
    a shared machine hits both alike: medians and the median of the per-pair ratios."""
    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plain = _steps(*_setup(args, False), False, device)
    private = _steps(*_setup(args, True), True, device)
    pairs = [(next(plain), next(private)) for _ in range(args.warmup + args.steps)][args.warmup :]
    p = [a[0] for a, _ in pairs]
    d = [b[0] for _, b in pairs]
    return {
        "plain_s": statistics.median(p),
        "dp_s": statistics.median(d),
        "ratio": statistics.median(b / a for a, b in zip(p, d, strict=True)),
        "plain_img_s": sum(a[1] for a, _ in pairs) / sum(p),
        "dp_img_s": sum(b[1] for _, b in pairs) / sum(d),
    }


def ledger_timing() -> list[dict]:
    """ε over 150 distinct (σ, q) entries vs the same 150 steps merged into one (RDP and PRV)."""
    from common.privacy import epsilon_of

    distinct = [(1.0 + i * 1e-3, 0.05, 1) for i in range(150)]
    merged = [(1.0, 0.05, 150)]
    rows = []
    for acc in ("rdp", "prv"):
        for name, hist in (("150 distinct", distinct), ("1 merged", merged)):
            t = time.perf_counter()
            eps = epsilon_of(hist, 1e-5, acc)
            rows.append({"accountant": acc, "history": name, "seconds": time.perf_counter() - t, "epsilon": eps})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only-ledger", action="store_true")
    ap.add_argument("--no-ledger", action="store_true")
    ap.add_argument("--configs", default="all", help="comma list of norm:trainable, or 'all'")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--norm", default="group", help=argparse.SUPPRESS)
    ap.add_argument("--trainable", default="head", help=argparse.SUPPRESS)
    ap.add_argument("--dp", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--time", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(timing(args) if args.time else one(args)))
        return 0

    print(f"# DP overhead, synthetic data: {args.arch}, {args.size} px, batch {args.batch}, {args.device}")
    if not args.only_ledger:
        configs = CONFIGS if args.configs == "all" else [tuple(c.split(":")) for c in args.configs.split(",")]
        print(
            f"{'norm':6} {'trainable':12} {'plain s/step':>12} {'DP s/step':>10} {'ratio':>6} "
            f"{'plain img/s':>11} {'DP img/s':>9} {'plain MiB':>9} {'DP MiB':>8}"
        )
        for norm, trainable in configs:
            res = {}
            for mode in ("time", 0, 1):
                cmd = [sys.executable, __file__, "--one", "--norm", norm, "--trainable", trainable]
                cmd += ["--time"] if mode == "time" else ["--dp", str(mode)]
                for key in ("device", "arch", "size", "batch", "steps", "warmup", "threads"):
                    cmd += [f"--{key}", str(getattr(args, key))]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                res[mode] = json.loads(out.strip().splitlines()[-1])
            t = res["time"]
            print(
                f"{norm:6} {trainable:12} {t['plain_s']:12.3f} {t['dp_s']:10.3f} {t['ratio']:6.2f} "
                f"{t['plain_img_s']:11.1f} {t['dp_img_s']:9.1f} {res[0]['peak_mib']:9.0f} {res[1]['peak_mib']:8.0f}",
                flush=True,
            )
    if not args.no_ledger:
        print("\n# epsilon() on the ledger's history (delta 1e-5)")
        for r in ledger_timing():
            print(f"{r['accountant']:4} {r['history']:13} {r['seconds']:8.3f} s   ε = {r['epsilon']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
