"""Acquisition attributes (#24): read from the headers of the series a stack is built from, kept in index.csv and the
stack's .json (a reused patient keeps them), shown on the QC page, counted in the census with small cells suppressed."""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from common import acquisition as A
from common import dicom
from common.config import load_site_config
from common.prepare import Outcome, prepare, write_index
from common.series import fat_saturated, weighting
from common.sitedata import INDEX_COLUMNS, SiteData
from simulations.datagen import PatientJob, make_patient
from simulations.sites import SITES, small

DATA = Path(__file__).parent / "data"
SITE = {p.name: p for p in SITES}

# What the small phantom sites' headers must say (their profiles in simulations/sites.py; small matrices make the
# in-plane spacing coarse): manufacturer, field strength, fat-suppressed T2, slice thickness, lossy
EXPECTED = {
    "site01": ("Siemens", "1.5 T", "no", "3.5-4.5 mm", "no"),
    "site02": ("GE", "1.5 T", "no", "3.5-4.5 mm", "no"),  # RLE lossless
    "site03": ("Philips", "3 T", "no", "<3.5 mm", "no"),  # JPEG-LS lossless
    "site04": ("Canon/Toshiba", "1.5 T", "yes", "3.5-4.5 mm", "no"),  # fat-sat T2, JPEG 2000 lossless
    "site05": ("Siemens", "3 T", "no", "<3.5 mm", "no"),  # Enhanced MR multi-frame
    "site06": ("GE", "1.5 T", "no", "3.5-4.5 mm", "no"),  # MONOCHROME1, 12 bits
    "site07": ("Philips", "3 T", "yes", "<3.5 mm", "no"),  # SPAIR T2
    "site08": ("Siemens", "1.5 T", "no", "3.5-4.5 mm", "no"),
    "site09": ("Canon/Toshiba", "1.5 T", "no", "3.5-4.5 mm", "no"),
    "site10": ("GE", "1.5 T", "no", "3.5-4.5 mm", "yes"),  # JPEG extended 12-bit
}
NAMES = ("manufacturer", "field-strength", "t2-fat-suppression", "slice-thickness", "lossy-compression")


def test_phantom_sites_read_as_their_profiles(prepared_small_sites):
    """Every vendor's headers (single-frame, Enhanced MR multi-frame, RLE, JPEG-LS, JPEG 2000, 12-bit JPEG) give the
    levels of the site profile that wrote them; index.csv holds them for ok rows and SiteData reads them back."""
    _, configs, _ = prepared_small_sites
    assert [c.site for c in configs] == list(EXPECTED)
    for config in configs:
        data = SiteData.open(config.cache)
        assert len(data) == 3
        for name, want in zip(NAMES, EXPECTED[config.site]):
            assert data.attributes[name] == (want,) * 3, (config.site, name)
        profile = small(SITE[config.site])
        spacing = max(  # the coarser of T1W and T2W
            profile.fov / profile.matrix, profile.fov / (profile.t2_matrix or profile.matrix)
        )
        assert data.attributes["pixel-spacing"] == (A.binned(spacing, A.PIXEL_SPACING),) * 3
        with (config.cache / "index.csv").open(encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            assert tuple(reader.fieldnames) == INDEX_COLUMNS + A.COLUMNS
            for row in reader:
                assert all(A.is_level(row[c]) and row[c] != A.UNKNOWN for c in A.COLUMNS)


def test_fat_suppression_is_carried_by_two_sites_that_differ_otherwise():
    """The phantom's design for #24: fat-suppressed T2 at a second site that differs from site07 in vendor, field
    strength and slice thickness, with the cohort's totals unchanged."""
    fs = [p for p in SITES if p.t2_fat_sat]
    assert [p.name for p in fs] == ["site04", "site07"]
    a, b = fs
    assert a.manufacturer != b.manufacturer and a.field_strength != b.field_strength and a.thickness != b.thickness
    assert sum(p.n_patients for p in SITES) == 190 and sum(p.n_malignant for p in SITES) == 50


def _one_patient(tmp_path: Path, profile) -> dict[str, dicom.Series]:
    make_patient(PatientJob(small(profile), 0, 0, "benign", 3, 0, tmp_path))
    scan = dicom.scan_tree(tmp_path)
    (series,) = scan.series.values()
    return {weighting(s): s for s in series if s.description in (profile.t1_desc, profile.t2_desc)}


def test_enhanced_mr_fat_suppression_comes_from_its_functional_groups(tmp_path):
    """Enhanced MR multi-frame has no ScanOptions: fat suppression is SpectrallySelectedSuppression, slice thickness
    is in the pixel measures group; both read, and a plain T2 of the same scanner is not fat-suppressed."""
    fs = replace(SITE["site05"], t2_fat_sat=True)
    got = _one_patient(tmp_path / "fs", fs)
    t1, t2 = got["T1"], got["T2"]
    assert len(t2.frames) > 1 and t2.frames[0].frame == 1  # multi-frame
    assert t2.scan_options == () and t2.fat_suppression == "FAT" and fat_saturated(t2)
    assert (t2.slice_thickness, t2.field_strength, t2.manufacturer) == (3.0, 3.0, "SIEMENS")
    levels = A.attributes_of(t1, t2)
    assert levels["t2-fat-suppression"] == "yes" and levels["slice-thickness"] == "<3.5 mm"
    plain = _one_patient(tmp_path / "plain", SITE["site05"])
    assert (
        plain["T2"].fat_suppression == "NONE"
        and A.attributes_of(plain["T1"], plain["T2"])["t2-fat-suppression"] == "no"
    )


def test_single_frame_fat_sat_and_lossy_jpeg_from_the_phantom(tmp_path):
    """Single-frame: fat-sat from ScanOptions FS (site04's Canon), lossy from 12-bit JPEG (site10), through both
    header paths (the fast walk and pydicom) with the same answer."""
    got = _one_patient(tmp_path / "c", SITE["site04"])
    assert got["T2"].scan_options == ("FS",) and A.attributes_of(got["T1"], got["T2"])["t2-fat-suppression"] == "yes"
    jpeg = _one_patient(tmp_path / "j", SITE["site10"])
    assert jpeg["T1"].lossy and A.attributes_of(jpeg["T1"], jpeg["T2"])["lossy-compression"] == "yes"
    for series in (got["T2"], jpeg["T1"]):
        path = series.frames[0].path
        with open(path, "rb") as fh:
            fast = dicom.fast_header(fh, path, os.stat(path))
        slow = dicom.header_of(pydicom.dcmread(path, stop_before_pixels=True), path, os.stat(path))
        if fast is not None:
            assert fast[0] == slow[0]
        assert slow[0].lossy == series.lossy and slow[0].manufacturer == series.manufacturer


def _header(path) -> dicom.Series:
    kind, header, reason = dicom.read_file(str(path))
    assert kind == "dicom", reason
    series, frames = header
    return replace(series, frames=frames)


def test_real_dicom_files_from_other_tools():
    """Files this project did not write: dcmtk's 12-bit JPEG (LossyImageCompression 01) and deflated copies, and
    pydicom's own MR files (a Toshiba 1.5 T that names its field only by its imaging frequency, a Siemens one)."""
    # legacy multi-frame MR (no functional groups: never a stack's series), so their series-level tags only
    jpeg, deflated = (
        dicom._series(ds.get, ds.file_meta.TransferSyntaxUID)
        for ds in (
            pydicom.dcmread(DATA / f"mr12_{n}_dcmtk.dcm", stop_before_pixels=True)
            for n in ("jpeg_extended", "deflated")
        )
    )
    assert jpeg.lossy and A.manufacturer_level(jpeg.manufacturer) == A.UNKNOWN
    assert A.field_strength_level(jpeg.field_strength) == A.UNKNOWN
    assert not deflated.lossy
    mr = _header(get_testdata_file("MR_small.dcm"))
    levels = A.attributes_of(mr, mr)
    assert levels == {
        "manufacturer": "Canon/Toshiba",  # TOSHIBA_MEC
        "field-strength": "1.5 T",  # no MagneticFieldStrength; ImagingFrequency 63.92 MHz
        "t2-fat-suppression": "no",
        "slice-thickness": "<3.5 mm",  # 0.8 mm
        "pixel-spacing": "<0.6 mm",  # 0.3125 mm
        "lossy-compression": "no",
    }
    siemens = _header(Path(pydicom.data.__file__).parent / "test_files" / "examples_overlay.dcm")
    assert (A.manufacturer_level(siemens.manufacturer), A.field_strength_level(siemens.field_strength)) == (
        "Siemens",
        "1.5 T",
    )  # 1.4939999580383 T


@pytest.mark.parametrize(
    ("name", "lossy"),
    [
        ("JPEG-lossy.dcm", True),  # JPEG extended, tag 01
        ("JPEG2000.dcm", True),  # JPEG 2000 (lossy allowed), tag 01
        ("JPEGLSNearLossless_16.dcm", True),  # near-lossless syntax, no tag
        ("SC_rgb_jpeg_dcmtk.dcm", True),  # JPEG baseline
        ("examples_jpeg2k.dcm", False),  # JPEG 2000 lossless only, tag 00
        ("MR_small_RLE.dcm", False),
        ("MR_small_jpeg_ls_lossless.dcm", False),
    ],
)
def test_lossy_from_tag_or_transfer_syntax(name, lossy):
    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
    assert dicom.is_lossy(ds.get("LossyImageCompression"), ds.file_meta.TransferSyntaxUID) is lossy


def test_bins():
    assert [A.manufacturer_level(t) for t in ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips Healthcare", "TOSHIBA_MEC",
                                              "FUJIFILM Healthcare", "ACME MR", "")] == [
        "Siemens", "GE", "Philips", "Canon/Toshiba", "Hitachi/Fujifilm", "other", A.UNKNOWN]  # fmt: skip
    assert [A.field_strength_level(t) for t in (1.5, 1.494, 3.0, 15000.0, 0.35, 7.0, None)] == [
        "1.5 T", "1.5 T", "3 T", "1.5 T", "other", "other", A.UNKNOWN]  # fmt: skip
    assert [A.binned(v, A.SLICE_THICKNESS) for v in (3.0, 3.5, 4.5, 4.5000001, 5.0, None)] == [
        "<3.5 mm", "3.5-4.5 mm", "3.5-4.5 mm", "3.5-4.5 mm", ">4.5 mm", A.UNKNOWN]  # fmt: skip
    assert all(A.is_level(level) for levels in A.LEVELS.values() for level in levels)


def test_index_csv_round_trip_and_skipped_rows_empty(tmp_path):
    from common.manifest import ManifestRow

    rows = [ManifestRow(line=2, patient_id="A", label=1), ManifestRow(line=3, patient_id="B", label=0)]
    levels = dict(zip(A.ATTRIBUTES, ("GE", "3 T", "yes", "<3.5 mm", ">0.9 mm", "no")))
    write_index(tmp_path, [Outcome(rows[0], "ka", "ok", attributes=levels), Outcome(rows[1], "kb", "skipped", "x")])
    with (tmp_path / "index.csv").open(encoding="utf-8") as fh:
        got = list(csv.DictReader(fh))
    assert [got[1][c] for c in A.COLUMNS] == [""] * len(A.COLUMNS)
    data = SiteData.open(tmp_path)
    assert data.keys == ("ka",) and {n: v[0] for n, v in data.attributes.items()} == levels


def test_census_counts_suppress_small_cells_and_their_complement():
    floor = 5
    # one small level: the smallest other one is hidden too, else it would be the total minus the others
    assert A.suppress({"GE": 2, "Siemens": 10, "Philips": 30}, floor) == {"GE": -1, "Siemens": -1, "Philips": 30}
    # two small levels hiding fewer than the floor together: a third one goes too
    assert A.suppress({"a": 1, "b": 2, "c": 30, "d": 40}, floor) == {"a": -1, "b": -1, "c": -1, "d": 40}
    # two small levels that hold the floor together: nothing more to hide
    assert A.suppress({"a": 2, "b": 3, "c": 30}, floor) == {"a": -1, "b": -1, "c": 30}
    assert A.suppress({"a": 7, "b": 10}, floor) == {"a": 7, "b": 10}
    assert A.suppress({"a": 2, "b": 10}, 1) == {"a": 2, "b": 10}
    attributes = {
        "manufacturer": ("Siemens",) * 20 + ("GE",) * 2,
        "field-strength": ("1.5 T",) * 22,
        "t2-fat-suppression": ("yes",) * 3 + ("no",) * 19,
        "lossy-compression": ("no",) * 21 + ("JPEG by hand\\x",),  # not a level's shape: leaves as "other"
    }
    census = A.census_counts(attributes, floor)
    assert census["acq-min-cell"] == 5 and census["acq/field-strength/1.5 T"] == 22
    assert census["acq/manufacturer/GE"] == census["acq/manufacturer/Siemens"] == -1
    assert census["acq/t2-fat-suppression/yes"] == census["acq/t2-fat-suppression/no"] == -1
    assert census["acq/lossy-compression/other"] == -1 and not any("JPEG" in k for k in census)
    assert all(isinstance(v, int) for v in census.values())  # a Flower MetricRecord's numbers
    for name, levels in A.mix_of(census).items():  # no hidden level can be recovered from the total
        hidden = [lv for lv, n in levels.items() if n == A.SUPPRESSED]
        assert len(hidden) != 1, name
    assert A.describe_mix(census) == (
        "GE <5, Siemens <5 | 1.5 T 22 | fat-sat T2: no <5, yes <5 | lossy: no <5, other <5"
    )


def test_dry_run_shows_each_sites_mix():
    from server import readiness

    census = {"num-examples": 22, "n-malignant": 5, "site": "hospA", "version": "1"}
    census |= A.census_counts({"manufacturer": ("Canon/Toshiba",) * 22, "t2-fat-suppression": ("yes",) * 22}, 5)
    result = {"asked": [1], "answers": {"1": census}, "refused": {}}
    row = readiness.site_row("hospA", "online", 1, result, "1")
    text = "\n".join(readiness.render([row]))
    assert row["ready"] and "scanners: Canon/Toshiba 22 | fat-sat T2: yes 22" in text


def _copy_site(src_root: Path, name: str, dst: Path) -> Path:
    for sub in (name, f"_cache/{name}"):
        shutil.copytree(src_root / sub, dst / sub, copy_function=shutil.copy2)
    (dst / "_secrets").mkdir()
    shutil.copy2(src_root / "_secrets" / f"{name}.key", dst / "_secrets" / f"{name}.key")
    return dst / name / "site.yaml"


def test_warm_rerun_keeps_attributes_and_an_old_cache_is_rebuilt_once(prepared_small_sites, tmp_path):
    root, _, _ = prepared_small_sites
    config = load_site_config(_copy_site(root, "site07", tmp_path))
    before = (config.cache / "index.csv").read_text(encoding="utf-8")
    warm = prepare(config, workers=1)
    assert warm.reused == 3  # nothing rebuilt
    assert (config.cache / "index.csv").read_text(encoding="utf-8") == before
    assert SiteData.open(config.cache).attributes["t2-fat-suppression"] == ("yes",) * 3
    page = (config.cache / "qc" / "index.html").read_text(encoding="utf-8")
    assert page.count("Fat-suppressed T2: yes") == 3 and "Scanner manufacturer: Philips" in page
    # a stack prepared before the levels existed: rebuilt once, its levels then read
    meta = sorted((config.cache / "stacks").glob("*.json"))[0]
    info = json.loads(meta.read_text())
    del info["attributes"], info["attributes-version"]
    meta.write_text(json.dumps(info))
    again = prepare(config, workers=1)
    assert again.reused == 2 and (config.cache / "index.csv").read_text(encoding="utf-8") == before


def test_the_client_app_census_carries_the_sites_mix(prepared_small_sites, tmp_path, task_identity):
    """The ClientApp's census reply (a prepared phantom site, its own floor applied) as the coordinator's
    census_replies reads it for federation.json: the acquisition keys arrive as sent, numbers only, no header text."""
    from client.app import app
    from server.federation import census_replies
    from tests.fakes import context, message

    root, _, _ = prepared_small_sites
    site_yaml = _copy_site(root, "site04", tmp_path)
    with site_yaml.open("a", encoding="utf-8") as fh:
        fh.write("privacy:\n  min_cell: 2\n")

    class Grid:  # the SuperNode's part: the site's ClientApp answers each query
        def send_and_receive(self, messages, *, timeout=None):
            return [app(message("query"), context(site_yaml)) for _ in messages]

    answers, refused = census_replies(Grid(), [42], 5.0)
    assert not refused
    (info,) = answers.values()
    assert info["site"] == "site04" and info["acq-min-cell"] == 2 and info["num-examples"] == 3
    assert info["acq/manufacturer/Canon/Toshiba"] == info["acq/t2-fat-suppression/yes"] == 3
    assert "CANON_MEC" not in json.dumps(info) and "Vantage" not in json.dumps(info)
