"""Generate virtual hospitals: per site a DICOM tree, `manifest.csv`, `site.yaml` and the sign truth beside them.

Everything is deterministic for a seed: each patient draws from its own stream `(seed, cohort, site, patient)`, so
the result does not depend on worker scheduling. Sites use cohort stream 0, the public cohort stream 1, and public
patient ids carry their own prefixes, so the two never share a patient.

Output per site (DESIGN.md site data contract): `DIR/<site>/manifest.csv`, the DICOM files in a vendor-like layout,
`DIR/<site>/site.yaml`; `DIR/<site>/_truth/<patient_id>.npz` + `truth.csv` hold where each sign was drawn (never read
by training; non-DICOM files in the tree are ignored by the reader). Cache and secret live outside the site root.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml
from pydicom.uid import generate_uid
from scipy.ndimage import gaussian_filter

from common.errors import SpineFedError
from common.fileio import atomic_write_text
from simulations.dicom_writer import PatientInfo, SeriesSpec, SliceGeometry, WrittenSlice, write_series
from simulations.phantom import LEVELS, Case, Sequence, make_case, mr_signal, tissue_maps, tissue_signal
from simulations.signs import CONFOUNDER_RATES, SIGNS
from simulations.sites import PUBLIC_SITES, SITES, SiteProfile, scaled, small

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "patient_id", "label", "lesion_sop_uid", "lesion_instance", "x0", "y0", "x1", "y1",
    "study_uid", "t1_series_uid", "t2_series_uid", "level",
)  # fmt: skip
SITE_STREAM, PUBLIC_STREAM = 0, 1

DISTRACTOR_NAMES = {
    "SIEMENS": {"loc": "localizer", "stir": "t2_tirm_sag", "t1c": "t1_tse_sag_fs_post", "ax_t2": "t2_tse_tra"},
    "GE MEDICAL SYSTEMS": {"loc": "3-PL LOC", "stir": "SAG STIR", "t1c": "SAG T1 FS +C", "ax_t2": "AX T2 FRFSE"},
    "Philips": {"loc": "SURVEY", "stir": "STIR_TSE SAG", "t1c": "T1W_TSE_GD SAG", "ax_t2": "T2W_TSE TRA"},
    "CANON_MEC": {"loc": "Locator", "stir": "Sag STIR", "t1c": "Sag T1 FS C+", "ax_t2": "Ax T2 FSE"},
}


@dataclass
class SiteSummary:
    site: str
    patients: int
    malignant: int
    files: int
    seconds: float


@dataclass
class PatientJob:
    profile: SiteProfile
    site_index: int
    index: int
    label: str
    seed: int
    stream: int
    site_root: Path
    difficulty: float = 1.0


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def patient_id(profile: SiteProfile, index: int) -> str:
    """Hospital-style id, unique within the site (7919 is prime, so j → j·7919 mod 900000 does not repeat)."""
    return f"{profile.patient_prefix}{100000 + (index * 7919 + 4241) % 900000:06d}"


def _series_dir(profile: SiteProfile, root: Path, pid: str, index: int, study_uid: str, series_uid: str, number: int):
    if profile.layout == "pacs":
        return root / "DICOM" / pid / study_uid[-8:] / f"{number:03d}"
    if profile.layout == "cd":
        return root / "DICOM" / f"PA{index:05d}" / "ST00001" / f"SE{number:05d}"
    if profile.layout == "by_uid":
        return root / pid / study_uid / series_uid
    return root / "export"


def _acquire(signal, points, case: Case, profile: SiteProfile, ref: float, rng, gain: float) -> np.ndarray:
    """Scanner effects: in-plane blur (PSF), posterior-coil bias field, Rician noise, intensity scale."""
    img = gaussian_filter(signal, sigma=(0, 0.6, 0.6))
    y, z = points[..., 1], points[..., 2]
    back = case.y0 + np.median(case.body_d) / 2 + 1.5 + case.canal_d + case.muscle_t + case.subcut_t
    depth = back - y  # distance in front of the back's skin, where the spine coil sits
    spine_depth = case.muscle_t + case.subcut_t + case.canal_d
    bias = np.exp(-np.clip(depth - spine_depth, -spine_depth, 250) / profile.bias)
    # A per-site phase of the coil ripple. crc32, not hash(): str hashes change with every process (PYTHONHASHSEED),
    # which made the same seed write different pixels in every run.
    bias *= 1 + 0.08 * np.cos(2 * np.pi * (z - case.zc) / 160.0 + zlib.crc32(profile.name.encode()) % 7)
    img = img * np.clip(bias, 0.15, 2.0).astype(np.float32)
    sigma = profile.noise * ref
    n1 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2**2)
    return img * (profile.scale * gain / ref)


def _spec(profile: SiteProfile, kind: str, number: int) -> SeriesSpec:
    v, m, t = profile.manufacturer, profile.model, profile.field_strength
    names = DISTRACTOR_NAMES.get(v, DISTRACTOR_NAMES["SIEMENS"])
    base = dict(manufacturer=v, model_name=m, field_strength=t, series_number=number)
    if kind == "T1":
        return SeriesSpec(profile.t1_desc, "T1", *profile.t1, sequence_variant="SK\\SP", scan_options="",
                          echo_train_length=3, **base)  # fmt: skip
    if kind == "T2":
        opts = "FS" if profile.t2_fat_sat else ""
        return SeriesSpec(profile.t2_desc, "T2", *profile.t2, sequence_variant="SK\\SP", scan_options=opts,
                          echo_train_length=17, **base)  # fmt: skip
    if kind == "stir":
        ti = 150.0 if t < 2 else 220.0
        return SeriesSpec(names["stir"], "STIR", 4000.0, 60.0, inversion_time=ti, scanning_sequence="IR\\SE",
                          sequence_variant="SK\\SP\\MP", echo_train_length=13, **base)  # fmt: skip
    if kind == "t1c":
        return SeriesSpec(names["t1c"], "T1C", *profile.t1, scan_options="FS", contrast_agent=profile.contrast_agent,
                          echo_train_length=3, **base)  # fmt: skip
    if kind == "ax_t2":
        return SeriesSpec(names["ax_t2"], "AX_T2", 4500.0, 100.0, echo_train_length=17, **base)
    if kind == "loc":
        return SeriesSpec(names["loc"], "LOC", 8.6, 4.0, scanning_sequence="GR", sequence_variant="SP",
                          flip_angle=20.0, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"], **base)  # fmt: skip
    raise ValueError(kind)


def _sequence(profile: SiteProfile, kind: str) -> Sequence:
    t = profile.field_strength
    if kind == "T1":
        return Sequence(*profile.t1, field_strength=t)
    if kind == "T2":
        return Sequence(*profile.t2, field_strength=t, fat_sat=profile.t2_fat_sat)
    if kind == "stir":
        return Sequence(4000.0, 60.0, ti=150.0 if t < 2 else 220.0, field_strength=t)
    if kind == "t1c":
        return Sequence(*profile.t1, field_strength=t, fat_sat=True, contrast=True)
    if kind == "ax_t2":
        return Sequence(4500.0, 100.0, field_strength=t)
    if kind == "loc":
        return Sequence(60.0, 4.0, field_strength=t)  # gradient echo stand-in: PD/T1-ish
    raise ValueError(kind)


def _ref(case: Case, seq: Sequence) -> float:
    return max(tissue_signal(n, case, seq) for n in ("fat", "csf", "nucleus", "muscle"))


def _points(g: SliceGeometry) -> np.ndarray:
    return np.stack([g.pixel_points(k) for k in range(g.n)]).astype(np.float32)


def _box(mask: np.ndarray, rng) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise SpineFedError("internal: lesion body not on its slice")
    h, w = mask.shape
    pad = rng.integers(0, 3, 4)  # annotators draw slightly loose boxes
    x0, y0 = max(int(cols.min()) - pad[0], 0), max(int(rows.min()) - pad[1], 0)
    x1, y1 = min(int(cols.max()) + 1 + pad[2], w), min(int(rows.max()) + 1 + pad[3], h)
    return x0, y0, x1, y1


def make_patient(job: PatientJob) -> dict:
    """Generate and write one patient; returns its manifest row and truth row (worker entry point)."""
    pr = job.profile
    rng = _rng(job.seed, job.stream, job.site_index, job.index)
    case = make_case(job.label, rng, difficulty=job.difficulty)
    pid = patient_id(pr, job.index)
    sex = "F" if rng.random() < (0.72 if job.label == "benign" else 0.5) else "M"
    age = int(np.clip(rng.normal(74 if job.label == "benign" else 64, 9), 35, 95))
    patient = PatientInfo(pid, f"SIM^{pid}", f"{2024 - age}0{rng.integers(1, 10)}1{rng.integers(0, 10)}", sex, age)
    ent = (job.seed, job.stream, pr.name, job.index)
    study_uid = generate_uid(entropy_srcs=[str(e) for e in (*ent, "study")])
    study_date = f"2024{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"

    # Slab placement: lateral offset up to ±1.5 slices, so the lesion slice is not always the middle one.
    sp = pr.spacing
    lateral = rng.uniform(-1.5, 1.5) * sp
    center = np.array(
        [
            case.x0 + lateral,
            case.y0 + 18 + rng.normal(0, pr.fov_jitter / 3),
            case.zc + rng.uniform(-1, 1) * pr.fov_jitter,
        ]
    )
    g1 = SliceGeometry.sagittal(center, pr.fov, pr.matrix, pr.n_slices, sp, thickness_mm=pr.thickness, **pr.orientation)
    body_c = np.array([case.x0, case.y0, case.zc])
    lesion_k = int(np.argmin(np.abs((body_c - g1.positions) @ g1.normal)))
    if not 1 <= lesion_k <= g1.n - 2:
        raise SpineFedError("internal: lesion slice on the slab edge")
    pts1 = _points(g1)
    maps1 = tissue_maps(case, pts1)

    same_t2 = pr.t2_offset == 0 and pr.t2_extra_slices == 0 and (pr.t2_matrix or pr.matrix) == pr.matrix
    if same_t2:
        g2, pts2, maps2 = g1, pts1, maps1
    else:
        c2 = center + g1.normal * pr.t2_offset * sp
        g2 = SliceGeometry.sagittal(c2, pr.fov, pr.t2_matrix or pr.matrix, pr.n_slices + pr.t2_extra_slices, sp,
                                    thickness_mm=pr.thickness, **pr.orientation)  # fmt: skip
        pts2 = _points(g2)
        maps2 = tissue_maps(case, pts2)

    gain = rng.uniform(0.9, 1.1)
    dirs: set[Path] = set()
    files = 0

    def write(kind, number, pixels, geom, series_uid=None, instance_numbers=None, **extra):
        nonlocal files
        spec = _spec(pr, kind if kind in ("T1", "T2") else kind, number)
        s_uid = series_uid or generate_uid(entropy_srcs=[str(e) for e in (*ent, "series", kind)])
        out = _series_dir(pr, job.site_root, pid, job.index, study_uid, s_uid, number)
        dirs.add(out)
        if instance_numbers is None and pr.reverse_instances and geom.n > 1:
            instance_numbers = list(range(geom.n, 0, -1))
        w = write_series(
            out, pixels, geom, spec, patient, study_uid, series_uid=s_uid, instance_numbers=instance_numbers,
            transfer_syntax=pr.transfer_syntax, multiframe=pr.multiframe and geom.n > 1 and kind != "loc",
            monochrome1=pr.monochrome1, rescale_slope=pr.slope, rescale_intercept=pr.intercept, bits=pr.bits,
            file_names=pr.file_names, study_date=study_date, **extra,
        )  # fmt: skip
        files += len({x.path for x in w})
        return s_uid, w

    def render(kind, maps, pts):
        seq = _sequence(pr, kind)
        return _acquire(mr_signal(maps, case, seq), pts, case, pr, _ref(case, seq), rng, gain)

    numbers = {"loc": 1, "T2": 2, "T1": 3, "stir": 4, "ax_t2": 5, "t1c": 6}
    t1_uid, t1_written = write("T1", numbers["T1"], render("T1", maps1, pts1), g1)
    t2_uid, _ = write("T2", numbers["T2"], render("T2", maps2, pts2), g2)
    for kind in pr.distractors:
        if kind == "stir":
            write(kind, numbers[kind], render(kind, maps2, pts2), g2)
        elif kind == "t1c":
            write(kind, numbers[kind], render(kind, maps1, pts1), g1)
        elif kind == "ax_t2":
            m = 96 if pr.matrix < 200 else 192
            ga = SliceGeometry.axial(body_c + [0, 15, 0], 200, m, 6, 5.0, tilt_deg=rng.uniform(-8, 8), thickness_mm=4.0)
            pa = _points(ga)
            write(kind, numbers[kind], render(kind, tissue_maps(case, pa), pa), ga)
        elif kind == "loc":
            m = 64 if pr.matrix < 200 else 128
            uid = generate_uid(entropy_srcs=[str(e) for e in (*ent, "series", "loc")])
            planes = (
                SliceGeometry.sagittal(body_c, 400, m, 1, 1.0, thickness_mm=8.0),
                SliceGeometry.coronal(body_c + [0, 10, 0], 400, m, 1, 1.0, thickness_mm=8.0),
                SliceGeometry.axial(body_c, 400, m, 1, 1.0, thickness_mm=8.0),
            )
            for i, gl in enumerate(planes, start=1):
                pl = _points(gl)
                write(kind, numbers[kind], render(kind, tissue_maps(case, pl), pl), gl, series_uid=uid,
                      instance_numbers=[i], rng=np.random.default_rng([job.seed, job.index, i]))  # fmt: skip
    if pr.junk_files:
        for d in sorted(dirs)[:1]:
            (d / "export.log").write_text(f"exported {files} images\n", encoding="utf-8")
            files += 0

    lesion: WrittenSlice = t1_written[lesion_k]
    box = _box(maps1.masks["_lesion_body"][lesion_k], rng)
    if pr.multiframe:
        sop, inst = lesion.sop_instance_uid, str(lesion.frame)
    else:
        sop = lesion.sop_instance_uid if pr.manifest_ref in ("sop", "both") else ""
        inst = str(lesion.instance_number) if pr.manifest_ref in ("instance", "both") else ""
    row = dict(
        patient_id=pid, label=job.label, lesion_sop_uid=sop, lesion_instance=inst,
        x0=box[0], y0=box[1], x1=box[2], y1=box[3], study_uid=study_uid,
        t1_series_uid=t1_uid if pr.name == "site03" else "", t2_series_uid=t2_uid if pr.name == "site03" else "",
        level=LEVELS[case.lesion],
    )  # fmt: skip
    truth = _write_truth(job, case, pid, maps1, lesion_k, box, t1_written)
    return {"row": row, "truth": truth, "files": files}


def _write_truth(job, case: Case, pid, maps, lesion_k, box, written) -> dict:
    tdir = job.site_root / "_truth"
    tdir.mkdir(parents=True, exist_ok=True)
    arrays = {
        "lesion_slice": np.int16(lesion_k),
        "box": np.asarray(box, np.int32),
        "shape": np.asarray(maps.label.shape),
    }
    arrays["sop_uids"] = np.asarray([w.sop_instance_uid for w in written])
    arrays["frames"] = np.asarray([w.frame or 0 for w in written], np.int16)
    for name, m in maps.masks.items():
        if m.any():
            arrays[f"mask_{name.lstrip('_')}"] = np.packbits(m.reshape(-1))
    np.savez_compressed(tdir / f"{pid}.npz", **arrays)
    truth = {"patient_id": pid, "label": job.label, "level": LEVELS[case.lesion], "lesion_slice": lesion_k,
             "typicality": round(case.typicality, 3)}  # fmt: skip
    for s in SIGNS:
        truth[s] = int(case.signs[s])
        truth[f"{s}_strength"] = round(case.strength[s], 3)
    for c in CONFOUNDER_RATES:
        truth[f"conf_{c}"] = int(case.confounders[c])
    return truth


def _write_site_yaml(root: Path, name: str, small_: bool) -> None:
    cfg = {
        "site": name,
        "data": {"root": ".", "cache": f"../_cache/{name}", "secret": f"../_secrets/{name}.key"},
        "preprocess": {"size": 64 if small_ else 224, "margin": 0.5},
    }
    (root / "site.yaml").write_text(
        "# Synthetic virtual hospital written by `simulate data` (no real patient data).\n"
        + yaml.safe_dump(cfg, sort_keys=False),
        encoding="utf-8",
    )


def _write_csv(path: Path, columns, rows) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


def plan_sites(n_sites: int, n_patients: int | None, small_: bool, public: bool) -> list[SiteProfile]:
    base = PUBLIC_SITES if public else SITES
    if small_:
        profiles = [
            small(p, 4 if public else 3) for p in scaled(base, n_sites, sum(p.n_patients for p in base[:n_sites]))
        ]
        if n_patients is not None:
            profiles = scaled(tuple(profiles), n_sites, n_patients)
        return profiles
    total = n_patients if n_patients is not None else sum(p.n_patients for p in base)
    return scaled(base, n_sites, total)


def cohort_marker(out: str | Path, public: bool = False) -> Path:
    """The file that says a cohort in `out` is complete: its metadata JSON, the last thing `generate` puts in place."""
    return Path(out) / ("public.json" if public else "simulation.json")


def completed(out: str | Path, public: bool = False) -> dict | None:
    """The cohort's metadata when `out` holds a complete generation, else None (absent, interrupted, unreadable)."""
    try:
        meta = json.loads(cohort_marker(out, public).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not all((Path(out) / s["site"]).is_dir() for s in meta.get("sites", [])):
        return None
    return meta


def _remove_leftovers(out: Path, stage: Path, profiles: list[SiteProfile]) -> None:
    """Remove what an interrupted generation left: the staging folder, and site folders moved in before the marker
    (only folders this generator wrote, recognised by their `_truth` folder; anything else is refused, not deleted)."""
    found = [stage] if stage.exists() else []
    for pr in profiles:
        site = out / pr.name
        if site.exists():
            if not (site / "_truth").is_dir():
                raise SpineFedError(
                    f"{site}: exists and was not written by `simulate data`; choose an empty --out folder"
                )
            found.append(site)
    if found:
        log.warning(
            "%s: an earlier generation was interrupted (%d incomplete folder(s)); removing them and generating again",
            out, len(found),
        )  # fmt: skip
        for path in found:
            shutil.rmtree(path)


def generate(
    out: str | Path,
    *,
    n_sites: int | None = None,
    n_patients: int | None = None,
    seed: int = 0,
    small_: bool = False,
    public: bool = False,
    workers: int = 2,
    difficulty: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[SiteSummary]:
    """Write the virtual sites (or the public cohort) under `out`; returns a summary per site.

    `progress(done, total)` is called after each patient. Nothing half-written is ever left where a reader looks:
    the cohort is built in `out/.partial-<cohort>`, its site folders are moved into `out` when complete, and the
    metadata JSON (`cohort_marker`) goes last, so `completed(out)` is true only for a whole cohort. A run killed
    midway leaves no marker; the next call removes its leftovers (one warning) and starts again. Refuses to write
    where a complete cohort of the same kind already is (so a second run never mixes two cohorts).
    """
    out = Path(out)
    if n_sites is None:
        n_sites = len(PUBLIC_SITES) if public else len(SITES)
    if n_sites < 1 or (n_patients is not None and n_patients < n_sites):
        raise SpineFedError(f"need at least one patient per site (sites {n_sites}, patients {n_patients})")
    if cohort_marker(out, public).exists():
        kind = "public cohort" if public else "set of virtual sites"
        raise SpineFedError(f"{out}: already holds a generated {kind}; choose an empty --out folder")
    profiles = plan_sites(n_sites, n_patients, small_, public)
    stream = PUBLIC_STREAM if public else SITE_STREAM
    stage = out / (".partial-public" if public else ".partial-sites")
    _remove_leftovers(out, stage, profiles)
    jobs: list[PatientJob] = []
    for si, pr in enumerate(profiles):
        root = stage / pr.name
        root.mkdir(parents=True)
        labels = np.array(["malignant"] * pr.n_malignant + ["benign"] * (pr.n_patients - pr.n_malignant))
        _rng(seed, stream, si, 10**6).shuffle(labels)
        jobs += [PatientJob(pr, si, j, str(lab), seed, stream, root, difficulty) for j, lab in enumerate(labels)]

    t0 = time.perf_counter()
    results: list[dict] = []
    if workers > 1 and len(jobs) > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            for i, r in enumerate(pool.imap(make_patient, jobs, chunksize=1), start=1):
                results.append(r)
                if progress:
                    progress(i, len(jobs))
    else:
        for i, job in enumerate(jobs, start=1):
            results.append(make_patient(job))
            if progress:
                progress(i, len(jobs))

    summaries = []
    for pr in profiles:
        root = stage / pr.name
        mine = [(j, r) for j, r in zip(jobs, results) if j.profile.name == pr.name]
        _write_csv(root / "manifest.csv", MANIFEST_COLUMNS, [r["row"] for _, r in mine])
        truth_rows = [r["truth"] for _, r in mine]
        _write_csv(root / "_truth" / "truth.csv", list(truth_rows[0]), truth_rows)
        _write_site_yaml(root, pr.name, small_)
        if pr.junk_files:
            (root / "README.txt").write_text("PACS export. Not for diagnostic use.\n", encoding="utf-8")
        summaries.append(SiteSummary(pr.name, pr.n_patients, pr.n_malignant, sum(r["files"] for _, r in mine), 0.0))
    elapsed = time.perf_counter() - t0
    for s in summaries:
        s.seconds = round(elapsed, 2)
    meta = {
        "generator": "spinefed simulations (synthetic DICOM; no real patients)",
        "cohort": "public" if public else "sites",
        "seed": seed,
        "small": small_,
        "difficulty": difficulty,
        "requested": {"n_sites": n_sites, "n_patients": n_patients},
        "sites": [asdict(s) for s in summaries],
    }
    for pr in profiles:  # complete site folders into place, then the marker: a crash in between leaves no marker
        os.replace(stage / pr.name, out / pr.name)
    atomic_write_text(cohort_marker(out, public), json.dumps(meta, indent=1))
    shutil.rmtree(stage)
    log.info("generated %d patients at %d sites in %.1f s", len(jobs), len(profiles), elapsed)
    return summaries
