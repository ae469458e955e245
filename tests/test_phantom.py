"""The phantom and the virtual sites: sign sampling rates, determinism, DICOM validity, site differences."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from common.decode import decode_frame, jpeg_precision
from simulations.datagen import MANIFEST_COLUMNS, generate
from simulations.dicom_writer import SliceGeometry
from simulations.phantom import CORTEX, CSF, MARROW, Sequence, make_case, mr_signal, tissue_maps, tissue_signal
from simulations.signs import SIGN_RATES, sample_signs
from simulations.sites import SITES, scaled


@pytest.mark.parametrize("label,col", [("benign", 0), ("malignant", 1)])
def test_sign_rates_match_the_published_table(label, col):
    n = 20000
    signs, t = sample_signs(label, np.random.default_rng(3), n=n)
    for name, rates in SIGN_RATES.items():
        p = rates[col]
        se = np.sqrt(max(p * (1 - p), 1e-4) / n)
        assert abs(signs[name].mean() - p) < 4 * se + 1e-9, (name, signs[name].mean(), p)


def test_signs_overlap_between_classes():
    """Correlated signs: some malignant patients show none of the big four malignant signs, some benign show one."""
    mal, _ = sample_signs("malignant", np.random.default_rng(4), n=5000)
    ben, _ = sample_signs("benign", np.random.default_rng(5), n=5000)
    big = ("convex_posterior", "pedicle", "epidural_mass", "diffuse_low_t1")
    n_mal = sum(mal[s].astype(int) for s in big)
    n_ben = sum(ben[s].astype(int) for s in big)
    assert 0.005 < (n_mal == 0).mean() < 0.1
    assert 0.05 < (n_ben >= 1).mean() < 0.4


def test_tissue_contrast_like_real_mri():
    case = make_case("benign", np.random.default_rng(0))
    t1, t2 = Sequence(550, 11), Sequence(3200, 95)
    s1 = {k: tissue_signal(k, case, t1) for k in ("fat", "csf", "oedema", "tumour", "muscle")}
    s2 = {k: tissue_signal(k, case, t2) for k in ("fat", "csf", "oedema", "tumour", "muscle")}
    assert s1["fat"] > s1["muscle"] > s1["csf"]  # fat bright, CSF dark on T1
    assert s2["csf"] > s2["muscle"] and s2["fat"] > s2["muscle"]  # CSF and fat bright on T2
    assert s1["oedema"] < 0.5 * s1["fat"] and s2["oedema"] > s2["muscle"] * 3
    assert s1["tumour"] < 0.6 * s1["fat"] and s2["muscle"] < s2["tumour"] < s2["csf"]


def _slab(case, matrix=96):
    g = SliceGeometry.sagittal((case.x0, case.y0 + 15, case.zc), 200, matrix, 5, 4.0)
    pts = np.stack([g.pixel_points(k) for k in range(g.n)])
    return g, tissue_maps(case, pts)


def test_anatomy_and_lesion_present():
    case = make_case("malignant", np.random.default_rng(11))
    _, m = _slab(case)
    mid = m.label[2]
    for lab in (CORTEX, MARROW, CSF):
        assert (mid == lab).any()
    assert m.masks["_lesion_body"][2].sum() > 50
    drawn = {k for k, v in case.signs.items() if v}
    assert drawn, "a malignant case with no sign at all is possible but not for this seed"


def test_diffuse_low_t1_darkens_the_body_on_t1():
    rng = np.random.default_rng(0)
    for _ in range(200):
        case = make_case("malignant", rng)
        if case.signs["diffuse_low_t1"] and case.strength["diffuse_low_t1"] > 0.6:
            break
    _, m = _slab(case)
    s = mr_signal(m, case, Sequence(550, 11))
    lesion = m.masks["_lesion_body"] & (m.label == MARROW)
    other = m.body & ~m.masks["_lesion_body"] & (m.label == MARROW)
    assert s[lesion].mean() < 0.85 * s[other].mean()


def test_phantom_deterministic():
    a = make_case("benign", np.random.default_rng(9))
    b = make_case("benign", np.random.default_rng(9))
    assert a.signs == b.signs and np.array_equal(a.body_h, b.body_h)
    assert np.array_equal(_slab(a)[1].label, _slab(b)[1].label)


def test_default_plan_is_190_patients_50_malignant():
    plan = scaled(SITES, 10, 190)
    assert sum(p.n_patients for p in plan) == 190 and sum(p.n_malignant for p in plan) == 50
    assert min(p.n_patients for p in plan) < 10
    assert len({p.n_patients for p in plan}) > 5


def _manifest(root: Path):
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_small_sites_layout_manifest_and_yaml(small_sites):
    root, summaries = small_sites
    assert len(summaries) == 10
    for s in summaries:
        site = root / s.site
        rows = _manifest(site)
        assert len(rows) == s.patients and tuple(rows[0]) == MANIFEST_COLUMNS
        assert {r["label"] for r in rows} == {"benign", "malignant"}
        assert all(r["lesion_sop_uid"] or r["lesion_instance"] for r in rows)
        cfg = yaml.safe_load((site / "site.yaml").read_text())
        assert cfg["site"] == s.site and cfg["data"]["root"] == "." and cfg["preprocess"] == {"size": 64, "margin": 0.5}
        cache = (site / cfg["data"]["cache"]).resolve()
        secret = (site / cfg["data"]["secret"]).resolve()
        assert site.resolve() not in cache.parents and cache not in secret.parents
        assert (site / "_truth" / "truth.csv").exists()


def _dicoms(site: Path):
    for p in sorted(site.rglob("*")):
        if p.is_file() and "_truth" not in p.parts and p.suffix not in (".csv", ".yaml", ".txt", ".log"):
            yield p


def test_every_file_reads_back_and_lesion_box_is_on_the_body(small_sites):
    root, summaries = small_sites
    for s in summaries:
        site = root / s.site
        by_uid = {}
        for p in _dicoms(site):
            ds = pydicom.dcmread(p)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            # the project's own decoder reads every transfer syntax the sites write (site10's 12-bit JPEG included)
            assert decode_frame(p, frames - 1 if frames > 1 else None).size > 0
            assert ds.BitsAllocated == 16 and 12 <= ds.BitsStored <= 16  # the MR IODs allow 16-bit words only
            assert ds.Modality == "MR" and ds.PatientID and ds.StudyInstanceUID and ds.SeriesInstanceUID
            by_uid[ds.SOPInstanceUID] = ds
        for r in _manifest(site):
            truth = np.load(site / "_truth" / f"{r['patient_id']}.npz")
            k = int(truth["lesion_slice"])
            shape = tuple(truth["shape"])
            body = np.unpackbits(truth["mask_lesion_body"])[: np.prod(shape)].reshape(shape)[k]
            x0, y0, x1, y1 = (int(r[c]) for c in ("x0", "y0", "x1", "y1"))
            inside = body[y0:y1, x0:x1].sum()
            assert inside == body.sum() > 0  # the box holds the whole abnormal body on the stored lesion image
            if r["lesion_sop_uid"]:
                ds = by_uid[r["lesion_sop_uid"]]
                assert ds.PatientID == r["patient_id"]
                assert (ds.Rows, ds.Columns) == body.shape


def test_sites_differ_in_headers_and_pixels(small_sites):
    root, summaries = small_sites
    seen = {}
    for s in summaries:
        p = next(iter(_dicoms(root / s.site)))
        ds = pydicom.dcmread(p)
        seen[s.site] = (ds.Manufacturer, str(ds.file_meta.TransferSyntaxUID), ds.PhotometricInterpretation,
                        float(ds.get("MagneticFieldStrength", 0)), ds.SOPClassUID)  # fmt: skip
    assert len({v[0] for v in seen.values()}) >= 4
    assert len({v[1] for v in seen.values()}) >= 4
    assert "MONOCHROME1" in {v[2] for v in seen.values()}
    assert {1.5, 3.0} <= {v[3] for v in seen.values()}
    assert "1.2.840.10008.5.1.4.1.1.4.1" in {v[4] for v in seen.values()}


def test_generation_is_deterministic(tmp_path):
    a = generate(tmp_path / "a", n_sites=2, n_patients=3, small_=True, seed=5, workers=1)
    b = generate(tmp_path / "b", n_sites=2, n_patients=3, small_=True, seed=5, workers=2)
    assert [s.patients for s in a] == [s.patients for s in b]
    fa = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file() and p.suffix != ".json"
    )
    fb = sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file() and p.suffix != ".json"
    )
    assert fa == fb
    for rel in fa:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_public_cohort_is_separate(tmp_path, small_sites):
    root, _ = small_sites
    summ = generate(tmp_path / "pub", small_=True, public=True, seed=7, workers=1, n_patients=6)
    assert {s.site for s in summ} == {"public1", "public2", "public3"}
    site_ids = {r["patient_id"] for s in root.iterdir() if (s / "manifest.csv").exists() for r in _manifest(s)}
    pub_ids = {r["patient_id"] for s in summ for r in _manifest(tmp_path / "pub" / s.site)}
    assert pub_ids and not pub_ids & site_ids


def test_refuses_to_overwrite(tmp_path):
    from common.errors import SpineFedError

    generate(tmp_path, n_sites=1, n_patients=1, small_=True, workers=1)
    with pytest.raises(SpineFedError):
        generate(tmp_path, n_sites=1, n_patients=1, small_=True, workers=1)


def test_lossy_site_writes_12bit_jpeg_extended_like_a_real_archive(small_sites):
    """site10 stores what a lossy PACS archive holds: JPEG Extended process 4 with a 12-bit SOF, flagged lossy."""
    root, _ = small_sites
    ds = pydicom.dcmread(next(iter(_dicoms(root / "site10"))))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert jpeg_precision(pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)) == 12


def _one_file_per_series_kind(root: Path) -> dict[tuple[str, str, str], Path]:
    """One file of every (site, series description, SOP class): each site profile with its localizers,
    distractors and Enhanced MR files."""
    chosen = {}
    for site in sorted(p for p in root.iterdir() if (p / "manifest.csv").exists()):
        for p in _dicoms(site):
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue  # the junk files some sites carry
            chosen.setdefault((site.name, str(ds.SeriesDescription), str(ds.SOPClassUID)), p)
    return chosen


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dciodvfy not installed (Debian package dicom3tools: apt-get install dicom3tools; .ci/run installs it)",
)
def test_every_site_profile_passes_dciodvfy(small_sites):
    """dicom3tools' IOD verifier finds no error in one file of every series kind of every site (warnings allowed)."""
    root, _ = small_sites
    chosen = _one_file_per_series_kind(root)
    assert {k[0] for k in chosen} == {f"site{i:02d}" for i in range(1, 11)}
    assert "1.2.840.10008.5.1.4.1.1.4.1" in {k[2] for k in chosen}  # Enhanced MR is among them
    errors = {}
    for key, path in chosen.items():
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        found = [line for line in (out.stdout + out.stderr).splitlines() if re.match(r"\s*Error", line)]
        if found:
            errors[key] = found[:5] + ([f"... {len(found) - 5} more"] if len(found) > 5 else [])
    assert not errors, errors
