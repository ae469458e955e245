"""Discovery by content: any tree, any file names, broken files counted and never fatal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
from dicomfactory import Variant, write_patient

from common.dicom import is_dicom_file, read_pixels, scan_tree
from common.series import distractor_reason, weighting


def test_discovery_ignores_names_and_counts_non_dicom(tmp_path):
    write_patient(tmp_path, "P1", Variant(extra_series=["localizer", "axial"]))
    (tmp_path / "DICOMDIR.txt").write_text("not dicom")
    (tmp_path / "notes.dcm").write_bytes(b"plain text with a .dcm name")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x").write_bytes(b"ignored folder")
    truncated = tmp_path / "IM_TRUNC"
    first = next(p for p in sorted(tmp_path.rglob("*")) if p.is_file() and is_dicom_file(p))
    truncated.write_bytes(first.read_bytes()[:300])
    scan = scan_tree(tmp_path)
    assert scan.non_dicom_files == 2
    assert len(scan.unreadable) == 1 and scan.unreadable[0][0].endswith("IM_TRUNC")
    series = scan.series["P1"]
    assert {s.description for s in series} == {"t1_tse_sag", "t2_tse_sag", "localizer", "t2_tse_tra"}
    roles = {s.description: (distractor_reason(s), weighting(s)) for s in series}
    assert roles["t1_tse_sag"] == ("", "T1") and roles["t2_tse_sag"] == ("", "T2")
    assert roles["localizer"][0] == "localizer" and roles["t2_tse_tra"][0] == "not sagittal"


def test_multiframe_file_becomes_one_frame_per_slice(tmp_path):
    write_patient(tmp_path, "MF", Variant(multiframe=True, t1_slices=7))
    t1 = next(s for s in scan_tree(tmp_path).series["MF"] if s.description == "t1_tse_sag")
    assert len(t1.frames) == 7 and len({f.path for f in t1.frames}) == 1
    assert sorted(f.frame for f in t1.frames) == list(range(1, 8))
    assert (t1.repetition_time, t1.echo_time) == (550.0, 12.0)
    assert read_pixels(t1.frames[3]).shape == (128, 128)


PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"  # shipped with pydicom: no download


def test_pydicoms_own_test_files_pass_discovery_without_a_crash(tmp_path):
    files = [f for f in PYDICOM_FILES.rglob("*") if f.is_file()]
    assert len(files) > 50
    for i, f in enumerate(files):
        shutil.copy(f, tmp_path / f"f{i:04d}")
    scan = scan_tree(tmp_path)
    assert scan.dicom_files + scan.non_dicom_files == len(files)
    assert scan.dicom_files > 30
    found = [s for ss in scan.series.values() for s in ss]
    # MR_small.dcm (a real vendor MR image) is found with its geometry and decodes
    mr = [s for s in found if s.modality == "MR" and any(f.plane.rows == 64 for f in s.frames)]
    assert mr
    assert read_pixels(mr[0].frames[0]).shape == (64, 64)


def test_file_classes_of_pydicoms_foreign_files():
    """Files written by other tools (pydicom's test set: GE/Siemens MR, dcmtk, RT objects, SR, ECG, DICOMDIRs):
    non-image objects are their own class by SOP class, image files without pixel data are unreadable, data sets
    without the preamble are read, and damaged or foreign bytes stay non-DICOM."""
    from common.dicom import read_file

    expect = {
        "rtplan.dcm": ("non-image", "RT"),
        "rtstruct.dcm": ("non-image", "RT"),  # written without the preamble
        "rtdose.dcm": ("non-image", "RT"),  # a dose grid is pixel data, but not an image to train on
        "ExplVR_LitEndNoMeta.dcm": ("non-image", "RT"),  # no preamble, no meta: read anyway
        "ExplVR_BigEndNoMeta.dcm": ("non-image", "RT"),
        "test-SR.dcm": ("non-image", "SR"),
        "reportsi.dcm": ("non-image", "SR"),
        "waveform_ecg.dcm": ("non-image", "waveform"),
        "dicomdirtests/DICOMDIR": ("non-image", "DICOMDIR"),
        "dicomdirtests/DICOMDIR-implicit": ("non-image", "DICOMDIR"),
        "liver_1frame.dcm": ("non-image", "segmentation"),
        "MR_small.dcm": ("dicom", None),
        "MR_small_bigendian.dcm": ("dicom", None),
        "no_meta.dcm": ("non-dicom", None),  # deliberately damaged first byte: not parseable
        "README.txt": ("non-dicom", None),
        "zipMR.gz": ("non-dicom", None),
    }
    for name, (kind, label) in expect.items():
        got, payload, reason = read_file(str(PYDICOM_FILES / name))
        assert got == kind, (name, got, reason)
        if label:
            assert payload == label, (name, payload)
    # CT headers without pixel data (a DICOMDIR test tree): image files that cannot be used, not "non-image"
    header_only = PYDICOM_FILES / "dicomdirtests" / "TINY_ALPHA" / "PT000000" / "ST000000" / "SE000000" / "IM00001D"
    got, _, reason = read_file(str(header_only))
    assert got == "unreadable" and "without pixel data" in reason


def test_a_data_set_without_the_preamble_is_read_and_decodes(tmp_path):
    from dicomfactory import strip_preamble

    original = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm").pixel_array.astype(np.float32)  # slope 1, intercept 0
    for implicit in (True, False):
        folder = tmp_path / f"implicit{implicit}"
        folder.mkdir()
        path = strip_preamble(Path(shutil.copy(PYDICOM_FILES / "MR_small.dcm", folder / "IM1")), implicit_vr=implicit)
        assert path.read_bytes()[128:132] != b"DICM"
        scan = scan_tree(folder)
        assert scan.non_dicom_files == 0 and not scan.unreadable
        (frame,) = [f for ss in scan.series.values() for s in ss for f in s.frames]
        assert np.array_equal(read_pixels(frame), original)


def test_one_image_in_several_encodings_counts_once(tmp_path):
    """A vendor MR image stored as Part-10 and as bare data sets (implicit and explicit VR; and, where dcmtk is
    installed, written by dcmconv in big endian too): one SOP Instance UID, the same pixels, one frame."""
    import subprocess

    from dicomfactory import strip_preamble

    source = PYDICOM_FILES / "MR_small.dcm"
    shutil.copy(source, tmp_path / "a")
    strip_preamble(Path(shutil.copy(source, tmp_path / "b")), implicit_vr=True)
    strip_preamble(Path(shutil.copy(source, tmp_path / "c")), implicit_vr=False)
    n = 3
    if shutil.which("dcmconv"):
        subprocess.run(["dcmconv", "-F", "+tb", str(source), str(tmp_path / "d")], check=True)  # bare, big endian
        n += 1
    scan = scan_tree(tmp_path)
    assert scan.dicom_files == n and scan.duplicates == n - 1 and not scan.conflicts and not scan.unreadable
    (series,) = [s for ss in scan.series.values() for s in ss]
    assert len(series.frames) == 1


def _header_facts(header) -> str:
    """Everything a header gives discovery, in a comparable form (Plane holds arrays)."""
    series, frames = header
    tags = {k: v for k, v in vars(series).items() if k != "frames"}
    geometry = [
        (vars(f) | {"plane": None}, f.plane.position.tolist(), f.plane.row_cosine.tolist(), f.plane.col_cosine.tolist())
        + (f.plane.spacing, f.plane.rows, f.plane.cols)
        for f in frames
    ]
    return repr((tags, geometry))


def test_fast_header_path_gives_pydicoms_answers(tmp_path, monkeypatch):
    """The fast header reader (no pydicom for plain single-frame images) gives exactly what pydicom's path gives, on
    the test-data writer's encodings and on pydicom's own files from other tools; what it declines, pydicom reads."""
    import os

    from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless, RLELossless

    import common.dicom as dicom

    for i, v in enumerate(
        [
            Variant(extra_series=["localizer", "stir", "t1c", "axial"]),
            Variant(transfer_syntax=ImplicitVRLittleEndian, monochrome1=True),
            Variant(transfer_syntax=RLELossless, slope=2.0, intercept=-100.0),
            Variant(transfer_syntax=JPEGLSLossless, transposed=True),
            Variant(multiframe=True),
        ]
    ):
        write_patient(tmp_path / "site", f"F{i}", v)
    # values the fast path must hand to pydicom: a sequence before the geometry, padding, non-ASCII text, odd DS
    src = next(
        p
        for p in sorted((tmp_path / "site").rglob("*"))
        if p.is_file() and "NumberOfFrames" not in pydicom.dcmread(p, stop_before_pixels=True)
    )
    for name, change in {
        "sequence": lambda ds: setattr(ds, "ReferencedImageSequence", [pydicom.Dataset(), pydicom.Dataset()]),
        "latin1": lambda ds: setattr(ds, "SeriesDescription", "t1 séquence"),
        "long_ds": lambda ds: setattr(ds, "RepetitionTime", "550.0000000000001"),
        "empty_ds": lambda ds: setattr(ds, "EchoTime", None),
        "multi_modality": lambda ds: setattr(ds, "Modality", ["MR", "OT"]),
    }.items():
        ds = pydicom.dcmread(src)
        change(ds)
        ds.save_as(tmp_path / "site" / name)
    files = sorted(p for p in (tmp_path / "site").rglob("*") if p.is_file())
    files += sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file())
    fast = 0
    for path in files:
        if dicom.sniff(path) != "part10":
            continue
        with open(path, "rb") as fh:
            got = dicom.fast_header(fh, str(path), os.stat(path))
        if got is None:
            continue
        fast += 1
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert _header_facts(got) == _header_facts(dicom.header_of(ds, str(path), os.stat(path))), path
    assert fast > 100
    with open(tmp_path / "site" / "sequence", "rb") as fh:  # sequences are walked over, not declined
        assert dicom.fast_header(fh, "x", os.stat(tmp_path / "site" / "sequence")) is not None
    # and whole scans agree, file classes, duplicates, unreadable reasons and all
    fast_scan = scan_tree(tmp_path / "site")
    monkeypatch.setattr(dicom, "fast_header", lambda *a: None)
    slow_scan = scan_tree(tmp_path / "site")
    assert repr(fast_scan.unreadable) == repr(slow_scan.unreadable)
    assert (fast_scan.dicom_files, fast_scan.non_dicom_files, fast_scan.duplicates) == (
        slow_scan.dicom_files,
        slow_scan.non_dicom_files,
        slow_scan.duplicates,
    )
    for pid, series in slow_scan.series.items():
        assert [_header_facts((s, s.frames)) for s in series] == [
            _header_facts((s, s.frames)) for s in fast_scan.series[pid]
        ]


def test_native_pixels_are_pydicoms_stored_values(tmp_path):
    """Uncompressed single-frame files are read straight from their bytes, with exactly the values pydicom's decoder
    gives (unused high bits of unsigned samples cleared); what the reader declines, pydicom decodes."""
    from pydicom.uid import ImplicitVRLittleEndian

    from common.decode import decode_frame
    from common.dicom import native_pixels

    write_patient(tmp_path, "N1", Variant(monochrome1=True, slope=2.0, intercept=-100.0))
    write_patient(tmp_path, "N2", Variant(transfer_syntax=ImplicitVRLittleEndian))
    src = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")  # signed 16-bit
    for name, bits, stored, signed in (("u12", 16, 12, 0), ("s12", 16, 12, 1), ("u8", 8, 8, 0), ("u16", 16, 16, 0)):
        ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, signed
        values = np.random.default_rng(0).integers(0, 2**bits, size=(64, 64))
        ds.PixelData = values.astype(f"<u{bits // 8}").tobytes()  # high bits set: they must be cleared
        ds.save_as(tmp_path / name)
    assert src.PixelRepresentation == 1
    files = [p for p in sorted(tmp_path.rglob("*")) if p.is_file()]
    files += [PYDICOM_FILES / n for n in ("MR_small.dcm", "CT_small.dcm", "MR_small_bigendian.dcm")]
    fast = 0
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            continue
        got = native_pixels(str(path))
        if got is None:
            continue
        fast += 1
        want = decode_frame(path)
        assert got.dtype == want.dtype and np.array_equal(got, want), path
    assert fast >= 40
    assert native_pixels(str(tmp_path / "s12")) is None  # signed with unused bits: pydicom sign-extends
    assert native_pixels(str(PYDICOM_FILES / "MR_small_bigendian.dcm")) is None
