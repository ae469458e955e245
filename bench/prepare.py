"""Benchmark `client prepare` against a naive single-process reference preparer on the same site, in the same run.

The reference (issue #25): one process that reads every file's header with plain pydicom, picks the series, reads the
three slices of each series (pydicom's pixel_array), resamples and writes each stack (np.save); no QC, no index, no
fingerprint, no cache. `client prepare` is measured cold (empty cache, QC pictures and page included) and warm
(unchanged re-run). Rounds alternate reference and prepare so that load drifting on a shared machine hits both; the
headline is the median ratio. Wall time and CPU time (this process and its children) are both printed: on a loaded
machine wall is noisy, CPU time says how much work each does.

Data: realistic-size patients from the test-data writer (two sagittal series of 15 slices, 320×320 by default), or an
existing site folder written by `simulate data` (--site DIR, which holds site.yaml). Prints figures; asserts nothing.

    python bench/prepare.py --patients 60 --syntax explicit rle --rounds 3
    python bench/prepare.py --site /tmp/sim/site01
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless  # noqa: E402
from scipy import ndimage  # noqa: E402

from common.config import load_site_config  # noqa: E402
from common.dicom import Frame, Series  # noqa: E402
from common.errors import PatientSkipped  # noqa: E402
from common.geometry import Plane, grid_for_box, lr_position, unit  # noqa: E402
from common.manifest import read_manifest  # noqa: E402
from common.prepare import prepare, scan_cache_path  # noqa: E402
from common.pseudonym import load_or_create_secret, pseudonym  # noqa: E402
from common.series import choose_t1, choose_t2  # noqa: E402
from common.stacks import HIGH_PCT, LOW_PCT, find_lesion, nearest_t2, neighbours, ordered  # noqa: E402

SYNTAXES = {"explicit": ExplicitVRLittleEndian, "rle": RLELossless, "jpegls": JPEGLSLossless, "j2k": JPEG2000Lossless}


def make_site(root: Path, patients: int, matrix: int, syntax: str) -> Path:
    from dicomfactory import Variant, write_manifest, write_patient, write_site_yaml

    data = root / "data"
    data.mkdir(parents=True)
    v = Variant(t1_matrix=matrix, t2_matrix=matrix, t1_slices=15, t2_slices=15, transfer_syntax=SYNTAXES[syntax])
    rows = [write_patient(data, f"B{i:05d}", v) for i in range(patients)]
    write_manifest(data, rows)
    return write_site_yaml(root, size=224)


# ---- the naive reference -------------------------------------------------------------------------------------------


def _reference_header(ds, path: str) -> tuple[Series, Frame]:
    """Single-frame images only (a clean site): plain attribute access, the way a first script would do it."""
    plane = Plane(
        np.array([float(v) for v in ds.ImagePositionPatient]),
        unit([float(v) for v in ds.ImageOrientationPatient[:3]]),
        unit([float(v) for v in ds.ImageOrientationPatient[3:]]),
        tuple(float(v) for v in ds.PixelSpacing),
        int(ds.Rows),
        int(ds.Columns),
    )
    series = Series(
        patient_id=str(ds.PatientID).strip(),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        description=str(ds.get("SeriesDescription", "")),
        modality=str(ds.get("Modality", "")),
        image_type=tuple(str(v).upper() for v in ds.get("ImageType", [])),
        repetition_time=float(ds.RepetitionTime) if "RepetitionTime" in ds else None,
        echo_time=float(ds.EchoTime) if "EchoTime" in ds else None,
        scanning_sequence=tuple(str(v).upper() for v in np.atleast_1d(ds.get("ScanningSequence", []))),
    )
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    return series, Frame(path, str(ds.SOPInstanceUID), int(ds.InstanceNumber), None, plane, slope, intercept)


def _reference_resample(image: np.ndarray, plane: Plane, points: np.ndarray, out_spacing: float) -> np.ndarray:
    """The plain way, as common.geometry.resample did it before #25 (and gives the same values): every grid point's
    stored (row, col), then map_coordinates. Kept here so that speeding up prepare's copy does not move the
    reference."""
    img = np.asarray(image, dtype=np.float32)
    sigma = [max(0.0, (out_spacing / s - 1.0) / 2.0) for s in plane.spacing]
    if max(sigma) > 0.05:
        img = ndimage.gaussian_filter(img, sigma=sigma, mode="nearest")
    row, col = plane.to_pixel(points)
    out = ndimage.map_coordinates(img, [row.ravel(), col.ravel()], order=1, mode="constant", cval=0.0)
    return out.reshape(points.shape[:2]).astype(np.float32)


def _reference_channel(frame: Frame, grid) -> np.ndarray:
    pixels = pydicom.dcmread(frame.path).pixel_array.astype(np.float32)
    pixels = pixels * np.float32(frame.slope) + np.float32(frame.intercept)
    lo, hi = (float(v) for v in np.percentile(pixels, [LOW_PCT, HIGH_PCT]))  # as common.stacks.normalise did
    return (_reference_resample(pixels, frame.plane, grid.points(), grid.spacing) - lo) / (hi - lo)


def reference_prepare(config, out: Path) -> int:
    """Headers of every file, series choice, three slices per series, resample, np.save. Returns stacks written."""
    rows = read_manifest(config.manifest)
    secret = load_or_create_secret(config.secret)
    by_patient: dict[str, dict[str, Series]] = {}
    for dirpath, dirnames, filenames in os.walk(config.data_root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue
            series, frame = _reference_header(ds, path)
            known = by_patient.setdefault(series.patient_id, {}).setdefault(series.series_uid, series)
            known.frames.append(frame)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    size, margin = config.preprocess.size, config.preprocess.margin
    for row in rows:
        series_list = list(by_patient.get(row.patient_id, {}).values())
        try:
            t1 = choose_t1(series_list, row.lesion_sop_uid, row.lesion_instance, row.t1_series_uid, row.line)
            lesion = find_lesion(t1, row)
            frames, pos, spacing = ordered(t1, row.line, "T1W")
            t1_frames = neighbours(frames, pos, spacing, lesion, row.line)
            t2 = choose_t2(series_list, t1, lr_position(lesion.plane), row.t2_series_uid, row.line)
            t2_sorted, t2_pos, _ = ordered(t2, row.line, "T2W")
            t2_frames = [nearest_t2(t2_sorted, t2_pos, lr_position(f.plane), spacing, row.line) for f in t1_frames]
        except PatientSkipped:
            continue
        grid = grid_for_box(lesion.plane, row.box, size, margin)
        stack = np.stack([_reference_channel(f, grid) for f in t1_frames + t2_frames]).astype(np.float32)
        np.save(out / f"{pseudonym(secret, row.patient_id)}.npy", stack)
        written += 1
    return written


# ---- measurement -----------------------------------------------------------------------------------------------------


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _drop_page_cache(root: Path) -> None:
    """Ask the kernel to forget the site's files where it lets us (posix_fadvise), so that 'cold' reads the disk
    (or at least not a cache the previous contender warmed); harmless where it is not honoured."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(fn) -> tuple[float, float, object]:
    cpu, t = _cpu(), time.perf_counter()
    result = fn()
    return time.perf_counter() - t, _cpu() - cpu, result


def run_case(name: str, config_path: Path, workers: int, rounds: int, drop: bool) -> None:
    cfg = load_site_config(config_path)
    ref_out = Path(tempfile.mkdtemp(prefix="ref-", dir=config_path.parent))
    figures: dict[str, list[tuple[float, float]]] = {"reference": [], "cold": [], "warm": []}
    n = 0
    for _ in range(rounds):
        shutil.rmtree(ref_out, ignore_errors=True)
        shutil.rmtree(cfg.cache, ignore_errors=True)
        scan_cache_path(cfg).unlink(missing_ok=True)  # cold: nothing read before
        if drop:
            _drop_page_cache(cfg.data_root)
        wall, cpu, n = measure(lambda: reference_prepare(cfg, ref_out))
        figures["reference"].append((wall, cpu))
        if drop:
            _drop_page_cache(cfg.data_root)
        wall, cpu, summary = measure(lambda: prepare(cfg, workers=workers))
        figures["cold"].append((wall, cpu))
        ok = summary.ok
        wall, cpu, _ = measure(lambda: prepare(cfg, workers=workers))
        figures["warm"].append((wall, cpu))
    same = all(
        np.array_equal(np.load(p), np.load(cfg.cache / "stacks" / p.name)) for p in sorted(ref_out.glob("*.npy"))
    )
    shutil.rmtree(ref_out, ignore_errors=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in figures.items()}
    ref, cold, warm = med["reference"], med["cold"], med["warm"]
    print(f"{name}: {ok} patients ({n} by the reference; stacks identical to prepare's: {'yes' if same else 'NO'})")
    print(
        f"  HEADLINE cold prepare vs reference: {ref[0] / cold[0]:.2f}× wall, {ref[1] / cold[1]:.2f}× CPU;  "
        f"warm vs cold: {cold[0] / warm[0]:.1f}× wall, {cold[1] / warm[1]:.1f}× CPU  (medians of {rounds} rounds)"
    )
    for k, (w, c) in med.items():
        runs = " ".join(f"{x:.2f}" for x, _ in figures[k])
        print(f"  {k:9s} {ok / w:7.1f} patients/s  wall {w:6.2f} s  CPU {c:6.2f} s   (wall per round: {runs})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--matrix", type=int, default=320)
    ap.add_argument("--syntax", nargs="+", default=["explicit"], choices=sorted(SYNTAXES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="reference/cold/warm rounds, alternating; medians shown")
    ap.add_argument("--site", type=Path, help="an existing site folder with site.yaml (e.g. from simulate data)")
    ap.add_argument(
        "--drop-page-cache",
        action="store_true",
        help="before each reference and cold run, ask the kernel to drop the site's files from its page cache (the "
        "disk reads then count too); default: as a site's rerun finds them",
    )
    args = ap.parse_args()
    load = os.getloadavg()
    print(
        f"client prepare vs a naive reference: workers={args.workers}, {os.cpu_count()} CPUs, load {load[0]:.2f}, "
        f"page cache {'dropped before each cold run' if args.drop_page_cache else 'as found'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        if args.site:
            copy = Path(tmp) / "site"
            shutil.copytree(args.site, copy)
            cases.append((f"site {args.site.name}", copy / "site.yaml"))
        else:
            for syntax in args.syntax:
                site = make_site(Path(tmp) / syntax, args.patients, args.matrix, syntax)
                cases.append((f"{syntax} {args.patients}×2×15 @ {args.matrix}²", site))
        for name, config in cases:
            run_case(name, config, args.workers, args.rounds, args.drop_page_cache)
    print(f"load average after: {os.getloadavg()[0]:.2f} (a shared machine: wall figures move with it)")


if __name__ == "__main__":
    main()
