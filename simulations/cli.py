"""`simulate` console script: each subcommand is one `Command` in COMMANDS (common/cli.py).

A new subcommand plugs in by adding an entry; user errors (SpineFedError) print one line
and exit with their code, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from common.cli import Command, CommandLine
from common.errors import run_command
from simulations import run as sim_run
from simulations import train_cli


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write the virtual sites into")
    p.add_argument("--sites", type=int, default=None, help="number of sites (default 10; 3 with --public)")
    p.add_argument("--patients", type=int, default=None, help="total patients (default 190; 400 with --public)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="few patients, small matrices: for tests")
    p.add_argument("--public", action="store_true", help="the separate public cohort for pretraining a backbone")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--difficulty", type=float, default=1.0, help="> 1 weakens every sign (calibration knob)")


def _data_run(args: argparse.Namespace) -> int:
    # One BLAS thread per worker: the workers are the parallelism; threaded BLAS on top only oversubscribes.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from common.progress import progress_bar
    from simulations.datagen import generate

    bar = progress_bar(total=None, unit="patient", desc="simulate data")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    try:
        summaries = generate(
            args.out, n_sites=args.sites, n_patients=args.patients, seed=args.seed, small_=args.small,
            public=args.public, workers=args.workers, difficulty=args.difficulty, progress=progress,
        )  # fmt: skip
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    n = sum(s.patients for s in summaries)
    m = sum(s.malignant for s in summaries)
    files = sum(s.files for s in summaries)
    kind = "public cohort" if args.public else "virtual sites"
    print(
        f"{len(summaries)} {kind} (synthetic DICOM), {n} patients ({m} malignant), {files} files in {dt:.1f} s → {args.out}"
    )
    for s in summaries:
        print(f"  {s.site:<8} {s.patients:>4} patients {s.malignant:>3} malignant {s.files:>6} files")
    return 0


COMMANDS = [
    Command("data", "generate synthetic virtual hospitals (or the public cohort)", _data_args, _data_run),
    Command(
        "pretrain",
        "pretrain a stand-in backbone on the synthetic public cohort (no ImageNet download)",
        train_cli.pretrain_args,
        train_cli.pretrain_run,
    ),
    Command(
        "run",
        "the main job: virtual sites federated under Flower's simulation engine, with a report",
        sim_run.add_arguments,
        sim_run.run,
    ),
    Command(
        "centralized",
        "the paper's tenfold protocol on the pooled virtual sites (the centralized reference)",
        train_cli.centralized_args,
        train_cli.centralized_run,
    ),
]


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO)")


def command_line() -> CommandLine:
    return CommandLine(
        "simulate", COMMANDS, _shared, required=True, description="spinefed simulations on synthetic spine MRI"
    )


def main(argv: list[str] | None = None) -> int:
    cli = command_line()
    args = cli.parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run_command(cli.run_of(args), args, prefix=f"simulate {args.command}")


if __name__ == "__main__":
    sys.exit(main())
