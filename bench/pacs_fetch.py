"""Benchmark the DICOMweb source (#23): fetch from a real Orthanc on loopback, then prepare, against preparing the same
files from a folder.

A virtual site from `simulate data` (realistic-size by default: 320² site01 profile, a localizer and an axial T2W
beside the sagittal T1W/T2W, so the fetch reads four series' metadata and retrieves two) is uploaded to a throwaway
Orthanc (tests/orthancserver.py: Debian's orthanc + orthanc-dicomweb, basic auth). Then, each timed on its own:
  folder   `client prepare`'s pipeline from the site folder (cold cache)
  fetch    the PACS fetch into an empty store (QIDO-RS, WADO-RS metadata, WADO-RS retrieval of the chosen series),
           with each --parallel (patients in flight; default client.pacs.PARALLEL); the last one's store is kept
  prepare  the same pipeline from the filled store (cold cache)
  refetch  the fetch again with nothing new (QIDO + metadata only)
Fetch+prepare is reported with the last --parallel.
Orthanc and the client share this machine's cores: loopback hides the network, not the server's work.
Prints figures; asserts nothing.

    python bench/pacs_fetch.py --patients 30 --parallel 1 4
    python bench/pacs_fetch.py --site /tmp/sim/site01
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import orthancserver  # noqa: E402

from client.pacs import PARALLEL, connect, fetch  # noqa: E402
from common.config import load_site_config  # noqa: E402
from common.dicom import is_dicom_file  # noqa: E402
from common.prepare import prepare  # noqa: E402

USER, PASSWORD = "bench", "bench-secret"


def cpu() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def timed(label: str, fn, patients: int, nbytes: int | None = None):
    w0, c0 = time.perf_counter(), cpu()
    result = fn()
    wall, used = time.perf_counter() - w0, cpu() - c0
    rate = f"{patients / wall:6.2f} patients/s"
    mb = f", {nbytes / 1e6 / wall:6.1f} MB/s" if nbytes else ""
    print(f"  {label:8s} {wall:7.2f} s wall ({rate}{mb}); client CPU {used:6.2f} s", flush=True)
    return result, wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--site", type=Path, help="a site folder from `simulate data` (holds site.yaml, manifest.csv)")
    ap.add_argument("--patients", type=int, default=30, help="patients of the generated site (without --site)")
    ap.add_argument("--small", action="store_true", help="generate --small patients (about 100² matrices)")
    ap.add_argument("--workers", type=int, default=None, help="prepare's processes (default: CPU cores)")
    ap.add_argument("--parallel", type=int, nargs="+", default=[PARALLEL], help="patients fetched at a time (each)")
    args = ap.parse_args(argv)
    if orthancserver.ORTHANC is None or orthancserver.PLUGIN is None:
        sys.exit(orthancserver.MISSING)
    work = Path(tempfile.mkdtemp(prefix="pacs-bench-"))
    try:
        site = args.site
        if site is None:
            from simulations.datagen import generate

            t0 = time.perf_counter()
            generate(work / "sim", n_sites=1, n_patients=args.patients, small_=args.small, seed=3, workers=2)
            site = work / "sim" / "site01"
            print(f"generated {args.patients} patients in {time.perf_counter() - t0:.0f} s: {site}")
        folder = load_site_config(site / "site.yaml")
        n = sum(1 for _ in folder.manifest.open()) - 1
        files = [p for p in sorted(site.rglob("*")) if "_truth" not in p.parts and is_dicom_file(p)]
        size = sum(p.stat().st_size for p in files)
        print(
            f"site {folder.site}: {n} patients, {len(files)} DICOM files ({size / 1e6:.1f} MB); {os.cpu_count()} CPUs"
        )
        with orthancserver.running(work / "orthanc", USER, PASSWORD) as base:
            t0 = time.perf_counter()
            orthancserver.upload(base, USER, PASSWORD, files)
            print(f"uploaded to Orthanc in {time.perf_counter() - t0:.1f} s (not counted)")
            auth = work / "pacs.auth"
            auth.write_text(f"{USER}:{PASSWORD}\n")
            auth.chmod(0o600)
            (work / "web.yaml").write_text(
                f"site: {folder.site}\ndata:\n  root: {site}\n  cache: web-cache\n  secret: web.key\n"
                f"  source: dicomweb\n  url: {base}/dicom-web\n  auth_file: pacs.auth\n  store: store\n"
                f"preprocess:\n  size: {folder.preprocess.size}\n  margin: {folder.preprocess.margin}\n"
            )
            (work / "folder.yaml").write_text(
                f"site: {folder.site}\ndata:\n  root: {site}\n  cache: folder-cache\n  secret: folder.key\n"
                f"preprocess:\n  size: {folder.preprocess.size}\n  margin: {folder.preprocess.margin}\n"
            )
            web, ref = load_site_config(work / "web.yaml"), load_site_config(work / "folder.yaml")
            print("timings (each cold unless said):")
            summary, t_folder = timed("folder", lambda: prepare(ref, workers=args.workers), n)
            pacs, rows = connect(web)
            for k in args.parallel:  # each into an empty store
                shutil.rmtree(web.dicomweb.store, ignore_errors=True)
                got, t_fetch = timed(f"fetch x{k}", lambda k=k: fetch(web, pacs, rows, parallel=k), n)
                print(f"           {got.fetched}/{got.rows} patients, {got.new_instances} instances, "
                      f"{got.new_bytes / 1e6:.1f} MB ({got.new_bytes / 1e6 / t_fetch:.1f} MB/s)")  # fmt: skip
            _, t_prep = timed("prepare", lambda: prepare(web.for_prepare(), workers=args.workers), n)
            again, t_re = timed("refetch", lambda: fetch(web, pacs, rows, parallel=args.parallel[-1]), n)
            print(f"           {again.new_instances} new, {again.unchanged} unchanged")
        total = t_fetch + t_prep
        print(f"fetch+prepare {total:.2f} s = {n / total:.2f} patients/s vs folder prepare {t_folder:.2f} s = "
              f"{n / t_folder:.2f} patients/s (x{total / t_folder:.2f}); fetch alone {n / t_fetch:.2f} patients/s; "
              f"unchanged re-fetch {n / t_re:.2f} patients/s")  # fmt: skip
        print(f"folder prepare: {summary.ok} ok")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
