"""What real PACS exports put in front of `client prepare` (#19): a study exported twice, a lesion reference into the
wrong series, non-image objects and data sets without the Part-10 preamble, and reasons that must survive index.csv
whole. One small site (64² matrices, five slices) prepared once through the CLI; each test reads its outcome."""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomfactory import (
    NON_IMAGE_CLASSES,
    Variant,
    strip_preamble,
    write_manifest,
    write_non_image,
    write_patient,
    write_site_yaml,
)
from pydicom.uid import RLELossless

from client.cli import main as client_main
from common import acquisition
from common.sitedata import INDEX_COLUMNS

SMALL = dict(t1_matrix=64, t1_fov=80.0, t2_matrix=64, t2_fov=80.0, t1_slices=5, t2_slices=5)
ODD_UID = 'a,"b"\n=c\rd\te'  # a manifest cell with a comma, quotes, a line break, a formula start and a tab


def _files(folder: Path, series: str) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.parent.name == series)


def _uids(folder: Path, series: str) -> tuple[str, str]:
    """(series UID, SOP UID of its middle slice by position) of one series written by dicomfactory."""
    ds = [pydicom.dcmread(p, stop_before_pixels=True) for p in _files(folder, series)]
    ds.sort(key=lambda d: float(d.ImagePositionPatient[0]))
    return str(ds[0].SeriesInstanceUID), str(ds[len(ds) // 2].SOPInstanceUID)


def _change_pixels(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.PixelData = (ds.pixel_array[::-1].copy()).tobytes()  # the same UID, another image
    ds.save_as(path)


def _site(root: Path) -> tuple[Path, list[dict]]:
    data = root / "data"
    small = Variant(**SMALL)
    rows = [write_patient(data / "ok", "OK1", small)]

    # the same study exported twice into the tree (identical files), and once more recompressed (same pixels)
    rows.append(write_patient(data / "first_export", "TWICE", small))
    shutil.copytree(data / "first_export", data / "second_export")
    rows.append(write_patient(data / "explicit", "RECOMP", small))
    write_patient(data / "rle", "RECOMP", Variant(**SMALL, transfer_syntax=RLELossless))

    # one UID, two images: a T2W slice re-exported with other pixels (used) and a localizer likewise (never used)
    rows.append(write_patient(data / "c", "CHANGED", small))
    changed = data / "c2" / "IM_CHANGED"
    changed.parent.mkdir(parents=True)
    shutil.copy(_files(data / "c", "t2")[2], changed)
    _change_pixels(changed)
    rows.append(write_patient(data / "l", "LOCCHANGED", Variant(**SMALL, extra_series=["localizer"])))
    shutil.copy(_files(data / "l", "localizer")[0], data / "l" / "LOC_COPY")
    _change_pixels(data / "l" / "LOC_COPY")

    # lesion references into the wrong series
    row = write_patient(data / "t2ref", "T2REF", small)
    row["lesion_sop_uid"] = _uids(data / "t2ref", "t2")[1]
    rows.append(row)
    row = write_patient(data / "axref", "AXREF", Variant(**SMALL, extra_series=["axial"]))
    row["lesion_sop_uid"] = _uids(data / "axref", "axial")[1]
    rows.append(row)
    row = write_patient(data / "stirref", "STIRREF", Variant(**SMALL, extra_series=["stir"]))
    row["lesion_sop_uid"] = _uids(data / "stirref", "stir")[1]
    rows.append(row)
    row = write_patient(data / "stirnamed", "STIRNAMED", Variant(**SMALL, extra_series=["stir"]))
    row["t1_series_uid"], row["lesion_sop_uid"] = _uids(data / "stirnamed", "stir")
    rows.append(row)  # named explicitly: the site's call, weighting waived
    row = write_patient(data / "t1axial", "T1AXIAL", Variant(**SMALL, extra_series=["axial"]))
    row["t1_series_uid"], row["lesion_sop_uid"] = _uids(data / "t1axial", "axial")
    rows.append(row)
    row = write_patient(data / "t2axial", "T2AXIAL", Variant(**SMALL, extra_series=["axial"]))
    row["t2_series_uid"] = _uids(data / "t2axial", "axial")[0]
    rows.append(row)

    # a patient exported without the Part-10 preamble (bare data sets, implicit VR): read, not "non-DICOM"
    rows.append(write_patient(data / "raw", "RAW", small))
    for p in (data / "raw").rglob("*"):
        if p.is_file():
            strip_preamble(p)

    # non-image objects beside the images, one of them without the preamble too; one broken image file
    for kind in NON_IMAGE_CLASSES:
        write_non_image(data / "ok" / "objects" / kind.replace(" ", "_"), kind, "OK1")
    write_non_image(data / "DICOMDIR", "DICOMDIR")
    write_non_image(data / "ok" / "objects" / "bare_sr", "SR", "OK1", preamble=False)
    (data / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")

    # a header value pydicom warns about (an invalid UID) in a file that is otherwise fine
    lesion_file = _files(data / "ok", "t2")[0]
    ds = pydicom.dcmread(lesion_file)
    with pydicom.config.disable_value_validation():
        ds.FrameOfReferenceUID = "1.2.3.bad-uid"
        ds.save_as(lesion_file)

    rows.append({"patient_id": "NODICOM", "label": "benign", "lesion_instance": 3, "x0": 1, "y0": 1, "x1": 9, "y1": 9})
    odd = write_patient(data / "odd", "ODD", small)
    odd["lesion_sop_uid"] = ODD_UID
    rows.append(odd)
    write_manifest(data, rows)
    write_site_yaml(root)
    return root / "site.yaml", rows


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs")
    config, rows = _site(root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = client_main(["prepare", "--config", str(config), "--quiet", "--workers", "2"])
    assert code == 0, err.getvalue()
    return root, rows, out.getvalue(), err.getvalue()


def index(root: Path) -> dict[str, dict]:
    with (root / "cache" / "index.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {r["patient_id"]: r for r in rows}


def test_a_study_exported_twice_counts_once(site):
    root, _, out, _ = site
    rows = index(root)
    assert rows["TWICE"]["status"] == "ok", rows["TWICE"]["reason"]
    assert rows["RECOMP"]["status"] == "ok", rows["RECOMP"]["reason"]  # recompressed re-export: same pixels
    # TWICE's second export (10 files) and RECOMP's RLE copy (10 files)
    assert "20 duplicate files ignored" in out


def test_one_uid_with_two_images_skips_the_patient_naming_both_files(site):
    root, _, _, _ = site
    rows = index(root)
    reason = rows["CHANGED"]["reason"]
    assert rows["CHANGED"]["status"] == "skipped"
    assert "the T2W series holds two different files with one SOP Instance UID" in reason
    first = next(str(p.relative_to(root / "data")) for p in _files(root / "data" / "c", "t2")[2:3])
    assert first in reason and "c2/IM_CHANGED" in reason and str(root) not in reason
    # a clash in a series the stack does not use leaves the patient alone
    assert rows["LOCCHANGED"]["status"] == "ok", rows["LOCCHANGED"]["reason"]
    # the kept log names the two files by pseudonym only (their paths can hold a PatientID)
    log = (root / "cache-prepare.log").read_text()
    assert "hold one SOP Instance UID with different content" in log and "IM_CHANGED" not in log


@pytest.mark.parametrize(
    ("pid", "reason"),
    [
        ("T2REF", "lesion slice is in a sagittal T2W series ('t2_tse_sag'), not a sagittal T1W series"),
        ("AXREF", "lesion slice is in an axial T2W series ('t2_tse_tra'), not a sagittal T1W series"),
        ("STIRREF", "lesion slice is in a sagittal STIR/FLAIR T2W series ('stir_sag')"),
        ("T1AXIAL", "t1_series_uid names an axial T2W series ('t2_tse_tra'); the T1W input must be a sagittal series"),
        ("T2AXIAL", "t2_series_uid names an axial T2W series ('t2_tse_tra'); the T2W input must be a sagittal series"),
    ],
)
def test_a_lesion_reference_must_land_in_a_sagittal_t1w_series(site, pid, reason):
    root, rows, _, _ = site
    row = index(root)[pid]
    assert row["status"] == "skipped" and reason in row["reason"]
    line = 2 + [r["patient_id"] for r in rows].index(pid)
    assert row["reason"].startswith(f"manifest line {line}: ")


def test_a_series_the_manifest_names_waives_the_weighting_check(site):
    root, _, _, _ = site
    row = index(root)["STIRNAMED"]
    assert row["status"] == "ok", row["reason"]


def test_non_image_dicom_is_its_own_class(site):
    root, _, out, _ = site
    n = len(NON_IMAGE_CLASSES) + 2  # and the DICOMDIR and the SR without preamble
    line = next(x for x in out.splitlines() if "non-image DICOM" in x)
    assert line.strip().endswith(f"ignored: {n}")
    for kind in ("SR", "RT", "KOS", "presentation state", "waveform", "DICOMDIR", "encapsulated document", "raw data"):
        assert kind in line
    assert "1 unreadable image file(s)" in out  # junk.dcm only
    reason = index(root)["NODICOM"]["reason"]
    assert "no DICOM found" in reason and "(1 unreadable image file below data.root" in reason


def test_dicom_without_the_preamble_is_read(site):
    root, _, _, _ = site
    row = index(root)["RAW"]
    assert row["status"] == "ok", row["reason"]


def test_reasons_are_whole_and_index_csv_round_trips(site):
    root, rows, _, _ = site
    text = (root / "cache" / "index.csv").read_text(encoding="utf-8")
    records = list(csv.reader(io.StringIO(text, newline="")))
    assert records[0] == list(INDEX_COLUMNS + acquisition.COLUMNS)
    assert len(text.splitlines()) == len(records) == len(rows) + 1  # one physical line per record
    reason = index(root)["ODD"]["reason"]
    assert 'lesion_sop_uid a,"b"' in reason and reason.endswith("was exported)")  # whole, its comma and quotes
    assert not any(ch in reason for ch in "\r\n\t")


def test_header_warnings_go_to_the_prepare_log_not_the_console(site):
    root, _, out, err = site
    log = (root / "cache-prepare.log").read_text()
    (line,) = [x for x in log.splitlines() if "1.2.3.bad-uid" in x]  # once, with the file's pseudonym
    assert "pydicom warning while reading a header: Invalid value for VR UI: '1.2.3.bad-uid'" in line
    assert line.endswith(f"; in <data.root>/{_pseudonym(root, _files(root / 'data' / 'ok', 't2')[0])}")
    assert str(root / "data") not in log
    assert "bad-uid" not in out + err and "Warning" not in err


def _pseudonym(root: Path, path: Path) -> str:
    from common.prepare import file_pseudonym
    from common.pseudonym import load_or_create_secret

    secret = load_or_create_secret(root / "private" / "pseudonym.key")
    return file_pseudonym(secret, str(path.relative_to(root / "data")))


def test_write_index_neutralises_formulas_and_control_characters(tmp_path):
    from common.manifest import ManifestRow
    from common.prepare import Outcome, write_index

    row = ManifestRow(line=2, patient_id="=PID,1", label=0)  # patient_id is read back by people and scripts: kept as is
    write_index(tmp_path, [Outcome(row, "k1", "skipped", '=HYPERLINK("x")\nsecond, line')])
    with (tmp_path / "index.csv").open(newline="", encoding="utf-8") as fh:
        (record,) = list(csv.DictReader(fh))
    assert record["patient_id"] == "=PID,1"
    assert record["reason"] == '\'=HYPERLINK("x") second, line'


def test_a_long_decoder_message_reaches_the_reason_whole(tmp_path, monkeypatch):
    from common import stacks
    from common.dicom import scan_tree
    from common.errors import PatientSkipped
    from common.manifest import read_manifest

    write_manifest(tmp_path, [write_patient(tmp_path, "LONG", Variant(**SMALL))])
    (row,) = read_manifest(tmp_path / "manifest.csv")
    message = "decoder says: " + "x" * 150 + " THE CAUSE"

    def fail(*a, **k):
        raise ValueError(message)

    monkeypatch.setattr(stacks, "read_pixels", fail)
    with pytest.raises(PatientSkipped) as err:
        stacks.build_stack(row, scan_tree(tmp_path).series["LONG"], 32, 0.5)
    assert message in str(err.value)


def test_pixel_digest_is_the_stored_pixel_data(tmp_path):
    from common.dicom import pixel_digest

    a = tmp_path / "a"
    write_patient(a, "DIG", Variant(**SMALL))
    files = _files(a, "t1")
    assert pixel_digest(str(files[0])) != pixel_digest(str(files[1]))
    copy = tmp_path / "copy"
    shutil.copy(files[0], copy)
    ds = pydicom.dcmread(copy)
    ds.SeriesDescription = "renamed on re-export"  # header edits do not change the image
    ds.save_as(copy)
    assert pixel_digest(str(copy)) == pixel_digest(str(files[0]))
    assert np.array_equal(pydicom.dcmread(copy).pixel_array, pydicom.dcmread(files[0]).pixel_array)


def _warn_in_worker(_):
    import logging
    import os
    import warnings

    warnings.warn("decoder says: odd pixel data", stacklevel=1)  # as a decoder plugin warns
    logging.getLogger("common.decode").warning("decoder warning: from a worker")
    return os.getpid()


def test_warnings_in_pool_workers_reach_the_parents_log_not_stderr(capfd):
    import logging
    import os
    from concurrent.futures import ProcessPoolExecutor

    from common.prepare import _worker_logs

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root, keep = logging.getLogger(), Keep()
    level = root.level
    root.addHandler(keep)
    root.setLevel(logging.INFO)
    try:
        with _worker_logs() as (init, args), ProcessPoolExecutor(2, initializer=init, initargs=args) as pool:
            pids = set(pool.map(_warn_in_worker, range(4)))
    finally:
        root.removeHandler(keep)
        root.setLevel(level)
    assert os.getpid() not in pids
    assert any("decoder says: odd pixel data" in m for m in seen)
    assert any("decoder warning: from a worker" in m for m in seen)
    assert "decoder" not in capfd.readouterr().err


def test_a_decoder_warning_names_the_file_by_pseudonym_in_the_prepare_log(tmp_path, caplog):
    import logging

    from common.config import load_site_config
    from common.decode import decode_frame
    from common.prepare import LogScrubber

    config = load_site_config(write_site_yaml(tmp_path))
    path = tmp_path / "data" / "DOE_JOHN" / "IM1"
    path.parent.mkdir(parents=True)
    shutil.copy(pydicom.data.get_testdata_file("SC_rgb_jpeg.dcm"), path)  # pydicom warns while reading it
    with caplog.at_level(logging.WARNING, logger="common.decode"), contextlib.suppress(ValueError):
        decode_frame(path)  # refused (colour), after the warning
    (record,) = [r for r in caplog.records if r.name == "common.decode"]
    line = LogScrubber(config, "%(message)s").format(record)
    assert line.startswith("decoder warning: Expected explicit VR") and "DOE_JOHN" not in line
    assert line.endswith(f"; in <data.root>/{_pseudonym(tmp_path, path)}")


def test_a_lesion_in_a_series_of_unknown_weighting_says_so_and_how_to_use_it(tmp_path):
    import dataclasses

    from common.dicom import scan_tree
    from common.errors import PatientSkipped
    from common.series import choose_t1

    row = write_patient(tmp_path, "PD", Variant(**SMALL))
    t1 = next(s for s in scan_tree(tmp_path).series["PD"] if s.description == "t1_tse_sag")
    pd = dataclasses.replace(t1, repetition_time=2000.0, echo_time=20.0)  # proton density: neither T1W nor T2W
    with pytest.raises(PatientSkipped) as err:
        choose_t1([pd], row["lesion_sop_uid"], None, "", 2)
    assert str(err.value) == (
        "manifest line 2: lesion slice is in a sagittal series of unknown weighting, TR 2000 ms, TE 20 ms "
        "('t1_tse_sag'), not a sagittal T1W series; check lesion_sop_uid (set t1_series_uid to this series to use "
        "it anyway)"
    )
    assert choose_t1([pd], row["lesion_sop_uid"], None, pd.series_uid, 2) is pd  # named: the site's call
