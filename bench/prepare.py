"""Benchmark `client prepare`: patients/s, cold (empty cache) and warm (unchanged re-run), per transfer syntax.

Data: realistic-size patients from the test-data writer (two sagittal series of 15 slices, 320×320 by default), or an
existing site folder written by `simulate data` (--site DIR, which holds site.yaml). Prints figures; asserts nothing.

    python bench/prepare.py --patients 60 --syntax explicit rle jpegls
    python bench/prepare.py --site /tmp/sim/site01
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless  # noqa: E402

from common.config import load_site_config  # noqa: E402
from common.prepare import prepare  # noqa: E402

SYNTAXES = {"explicit": ExplicitVRLittleEndian, "rle": RLELossless, "jpegls": JPEGLSLossless, "j2k": JPEG2000Lossless}


def make_site(root: Path, patients: int, matrix: int, syntax: str) -> Path:
    from dicomfactory import Variant, write_manifest, write_patient, write_site_yaml

    data = root / "data"
    data.mkdir(parents=True)
    v = Variant(t1_matrix=matrix, t2_matrix=matrix, t1_slices=15, t2_slices=15, transfer_syntax=SYNTAXES[syntax])
    rows = [write_patient(data, f"B{i:05d}", v) for i in range(patients)]
    write_manifest(data, rows)
    return write_site_yaml(root, size=224)


def timed(config: Path, workers: int) -> tuple[float, int]:
    cfg = load_site_config(config)
    t = time.perf_counter()
    summary = prepare(cfg, workers=workers)
    return time.perf_counter() - t, summary.ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--matrix", type=int, default=320)
    ap.add_argument("--syntax", nargs="+", default=["explicit", "rle"], choices=sorted(SYNTAXES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--site", type=Path, help="an existing site folder with site.yaml (e.g. from simulate data)")
    args = ap.parse_args()
    print(f"client prepare benchmark: workers={args.workers}")
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        if args.site:
            copy = Path(tmp) / "site"
            shutil.copytree(args.site, copy)
            cfg = load_site_config(copy / "site.yaml")
            shutil.rmtree(cfg.cache, ignore_errors=True)
            cases.append((f"site {args.site.name}", copy / "site.yaml"))
        else:
            for syntax in args.syntax:
                cases.append(
                    (
                        f"{syntax} {args.patients}×2×15 @ {args.matrix}²",
                        make_site(Path(tmp) / syntax, args.patients, args.matrix, syntax),
                    )
                )
        for name, config in cases:
            cold, ok = timed(config, args.workers)
            warm, _ = timed(config, args.workers)
            print(
                f"{name:40s} ok={ok:4d}  cold {ok / cold:6.1f} patients/s ({cold:5.2f} s)  warm {ok / warm:7.1f} patients/s ({warm:5.2f} s)"
            )


if __name__ == "__main__":
    main()
