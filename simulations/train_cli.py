"""`simulate pretrain` and `simulate centralized`: the model-training subcommands (glue over common/ and the
simulation modules; registered in simulations/cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from common.backbones import ARCHS, DEFAULT_ARCH, INPUT_MODES, TRAINABLE  # names only: no torch at import


def add_model_arguments(p: argparse.ArgumentParser, epochs: int) -> None:
    g = p.add_argument_group("model and training")
    g.add_argument("--size", type=int, default=64, help="image size the network sees (stacks are resized; default 64)")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--arch", default=DEFAULT_ARCH, choices=ARCHS)
    g.add_argument("--input-mode", default="adapter", choices=INPUT_MODES)
    g.add_argument("--trainable", default="all", choices=TRAINABLE)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (CUDA → MPS → CPU), cpu, cuda, mps")


def configs(args: argparse.Namespace, pretrained: Path | None):
    """(ModelConfig, TrainConfig) from the arguments; torch is imported only when a training command runs."""
    from common.model import ModelConfig
    from common.training import TrainConfig

    model = ModelConfig(
        arch=args.arch, input_mode=args.input_mode, trainable=args.trainable, pretrained=pretrained,
        image_size=args.size,
    )  # fmt: skip
    train = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
        image_size=args.size,
    )  # fmt: skip
    return model, train


@contextlib.contextmanager
def step_bar(desc: str):
    """A `progress(step, total)` callback for training functions, rendered as a bar (lines when not a terminal)."""
    from common.progress import progress_bar

    bar = None

    def progress(step: int, total: int) -> None:
        nonlocal bar
        bar = bar or progress_bar(total=total, desc=desc, unit="step")
        bar.update(step - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="the public cohort (from `simulate data --public`)")
    p.add_argument("--out", type=Path, required=True, help="weights file to write (torchvision ResNet layout)")
    add_model_arguments(p, epochs=10)


def pretrain_run(args: argparse.Namespace) -> int:
    from simulations.centralized import discover_sites, open_sites
    from simulations.pretrain import pretrain

    sites = open_sites(discover_sites(args.data))
    model_cfg, train_cfg = configs(args, None)
    with step_bar("pretraining") as progress:
        out = pretrain([s.cache for s in sites], args.out, model_cfg, train_cfg, progress=progress)
    print(f"stand-in backbone (synthetic public cohort, not ImageNet) → {out}")
    return 0


def centralized_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="the virtual sites (from `simulate data`)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default DATA/_centralized)")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--pretrained", type=Path, default=None, help="backbone weights file (e.g. from simulate pretrain)")
    add_model_arguments(p, epochs=8)


def centralized_run(args: argparse.Namespace) -> int:
    from simulations.centralized import run_centralized

    model_cfg, train_cfg = configs(args, args.pretrained)
    out = args.out or args.data / "_centralized"
    results = run_centralized(args.data, out, model_cfg, train_cfg, folds=args.folds, seed=args.seed,
                              progress=lambda m: print(m, file=sys.stderr))  # fmt: skip
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'} ({len(results['out_of_fold'])} out-of-fold patients)")
    return 0
