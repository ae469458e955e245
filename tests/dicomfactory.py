"""Small, exactly-known patients for the DICOM pipeline tests, written as real DICOM with the project's writer.

The anatomy is analytic in patient coordinates (LPS mm), so every orientation variant samples the same patient and
the expected stack can be computed directly on the canonical grid. Its features are placed so that orientation
mistakes show: a bright marker anterior-superior of the lesion centre, and a marker that exists only one slice to
the patient's left (+x) of the lesion slice.
"""

from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simulations.dicom_writer import PatientInfo, SeriesSpec, SliceGeometry, sample_volume, write_series

CENTER = np.array([2.0, 10.0, -40.0])  # the lesion's centre, mm
SPACING = 4.0  # slice spacing, mm


def t1_anatomy(p: np.ndarray) -> np.ndarray:
    x, y, z = p[..., 0] - CENTER[0], p[..., 1] - CENTER[1], p[..., 2] - CENTER[2]
    body = 600 + 250 * np.sin(y / 9.0) + 180 * np.cos(z / 13.0) + 40 * np.sin(x / 5.0)
    ant_sup = 900 * np.exp(-(((y + 12) ** 2 + (z - 10) ** 2) / (2 * 2.5**2)))  # anterior (−y), superior (+z)
    left_only = 900 * np.exp(-((x - SPACING) ** 2) / (2 * 0.8**2) - ((y - 6) ** 2 + z**2) / (2 * 2.5**2))
    return body + ant_sup + left_only


def t2_anatomy(p: np.ndarray) -> np.ndarray:
    x, y, z = p[..., 0] - CENTER[0], p[..., 1] - CENTER[1], p[..., 2] - CENTER[2]
    base = 500 + 300 * np.cos(y / 11.0) + 200 * np.sin(z / 8.0) + 30 * np.cos(x / 6.0)
    post_inf = 1200 * np.exp(-(((y - 10) ** 2 + (z + 8) ** 2) / (2 * 3.0**2)))  # posterior, inferior
    return base + post_inf


T1_SPEC = dict(description="t1_tse_sag", weighting="T1", repetition_time=550.0, echo_time=12.0, series_number=3)
T2_SPEC = dict(description="t2_tse_sag", weighting="T2", repetition_time=3200.0, echo_time=95.0, series_number=4)


@dataclass
class Variant:
    """How one patient's series are stored."""

    mirrored: bool = False
    flipped_normal: bool = False
    transposed: bool = False
    descending: bool = False
    reversed_instances: bool = False
    t1_matrix: int = 128
    t1_fov: float = 160.0
    t1_slices: int = 9
    t1_offset: tuple = (0.0, 0.0, 0.0)  # FOV centre shift (in-plane), mm
    t2_matrix: int = 128
    t2_fov: float = 160.0
    t2_slices: int = 9
    t2_offset: tuple = (0.0, 0.0, 0.0)
    t2_mirrored: bool = False
    transfer_syntax: str | None = None
    multiframe: bool = False
    monochrome1: bool = False
    slope: float = 1.0
    intercept: float = 0.0
    drop_t1_slices: tuple = ()  # indices (in position order) of T1 slices not written
    extra_series: list = field(default_factory=list)  # "localizer", "stir", "t1c", "axial"
    no_t2: bool = False


def write_patient(
    root: Path, pid: str, v: Variant = Variant(), label: str = "benign", use_instance: bool = False
) -> dict:
    """Write one patient below root; returns its manifest row (box = a 30×25 mm region around the lesion)."""
    pat = PatientInfo(patient_id=pid, name=f"DOE^{pid}", birth_date="19500101", sex="F", age=70)
    tag = zlib.crc32(pid.encode())
    study = f"1.2.826.0.1.3680043.8.498.{tag}"
    folder = Path(root) / f"exp_{tag % 10**6:06d}"

    def geom(matrix, fov, n, offset, mirrored):
        return SliceGeometry.sagittal(
            CENTER + np.asarray(offset),
            fov,
            matrix,
            n,
            SPACING,
            mirrored=mirrored,
            flipped_normal=v.flipped_normal,
            transposed=v.transposed,
            descending=v.descending,
        )

    kw = {}
    if v.transfer_syntax:
        kw["transfer_syntax"] = v.transfer_syntax
    g1 = geom(v.t1_matrix, v.t1_fov, v.t1_slices, v.t1_offset, v.mirrored)
    keep = [k for k in range(g1.n) if k not in v.drop_t1_slices]
    numbers = list(range(1, g1.n + 1))
    if v.reversed_instances:
        numbers = numbers[::-1]
    pix1 = sample_volume(t1_anatomy, g1)
    g1k = SliceGeometry(
        g1.row_cosine, g1.col_cosine, g1.pixel_spacing, g1.rows, g1.cols, g1.positions[keep], g1.slice_thickness
    )
    written = write_series(
        folder / "t1",
        pix1[keep],
        g1k,
        SeriesSpec(**T1_SPEC),
        pat,
        study,
        instance_numbers=None if v.multiframe else [numbers[k] for k in keep],
        multiframe=v.multiframe,
        monochrome1=v.monochrome1,
        rescale_slope=v.slope,
        rescale_intercept=v.intercept,
        file_names="opaque",
        **kw,
    )
    if not v.no_t2:
        g2 = geom(v.t2_matrix, v.t2_fov, v.t2_slices, v.t2_offset, v.t2_mirrored)
        write_series(
            folder / "t2",
            sample_volume(t2_anatomy, g2),
            g2,
            SeriesSpec(**T2_SPEC),
            pat,
            study,
            monochrome1=v.monochrome1,
            rescale_slope=v.slope,
            rescale_intercept=v.intercept,
            file_names="opaque",
            **kw,
        )
    for extra in v.extra_series:
        _write_extra(folder, extra, pat, study)

    # the lesion slice is the middle one (position order); find what was written for it
    mid = g1.n // 2
    k = keep.index(mid) if mid in keep else None
    lesion = written[k]
    # corners on pixel edges (FOV centre is a pixel edge; 15 and 12.5 mm are whole pixels at 1.25 mm), so every
    # stored variant's box covers exactly the same patient region
    corners = np.array([CENTER + [0, dy, dz] for dy in (-15, 15) for dz in (-12.5, 12.5)])
    rc = g1.to_pixel(corners, mid)
    x0, y0 = int(np.floor(rc[:, 1].min() + 0.5)), int(np.floor(rc[:, 0].min() + 0.5))
    x1, y1 = int(np.floor(rc[:, 1].max() + 0.5)), int(np.floor(rc[:, 0].max() + 0.5))
    row = {"patient_id": pid, "label": label, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "level": "L2"}
    if v.multiframe:
        row.update(lesion_sop_uid=lesion.sop_instance_uid, lesion_instance=lesion.frame)
    elif use_instance:
        row.update(lesion_instance=lesion.instance_number)
    else:
        row.update(lesion_sop_uid=lesion.sop_instance_uid)
    return row


def _write_extra(folder: Path, kind: str, pat: PatientInfo, study: str) -> None:
    if kind == "axial":
        g = SliceGeometry.axial(CENTER, 160, 64, 5, 4.0)
        spec = SeriesSpec("t2_tse_tra", "AX_T2", 3500.0, 100.0, series_number=5)
        fn = t2_anatomy
    else:
        g = SliceGeometry.sagittal(CENTER, 160, 128, 9, SPACING)
        spec, fn = {
            "stir": (
                SeriesSpec(
                    "stir_sag", "STIR", 3500.0, 60.0, inversion_time=160.0, scanning_sequence="IR", series_number=6
                ),
                t2_anatomy,
            ),
            "t1c": (
                SeriesSpec(
                    "t1_tse_sag_fs+c", "T1C", 600.0, 11.0, contrast_agent="Gadovist", scan_options="FS", series_number=7
                ),
                t1_anatomy,
            ),
            "localizer": (
                SeriesSpec(
                    "localizer",
                    "LOC",
                    8.0,
                    4.0,
                    scanning_sequence="GR",
                    image_type=["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"],
                    series_number=1,
                ),
                lambda p: 3 * t1_anatomy(p),
            ),
            "t1_other": (SeriesSpec("t1_tse_sag_2", "T1", 500.0, 10.0, series_number=8), t1_anatomy),
        }[kind]
    write_series(folder / kind, sample_volume(fn, g), g, spec, pat, study, file_names="opaque")


MANIFEST_COLUMNS = [
    "patient_id",
    "label",
    "lesion_sop_uid",
    "lesion_instance",
    "x0",
    "y0",
    "x1",
    "y1",
    "study_uid",
    "t1_series_uid",
    "t2_series_uid",
    "level",
]


def write_manifest(root: Path, rows: list[dict]) -> Path:
    path = Path(root) / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, MANIFEST_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def write_site_yaml(site_dir: Path, name: str = "testsite", size: int = 48, margin: float = 0.5) -> Path:
    path = Path(site_dir) / "site.yaml"
    path.write_text(
        f"site: {name}\n"
        "data:\n  root: data\n  cache: cache\n  secret: private/pseudonym.key\n"
        f"preprocess:\n  size: {size}\n  margin: {margin}\n"
    )
    return path


def expected_channel(fn, grid, offset_mm: float = 0.0) -> np.ndarray:
    """The analytic anatomy on the canonical grid, shifted along patient x."""
    return fn(grid.points(np.array([offset_mm, 0.0, 0.0])))


# Non-image objects a PACS export holds beside the images: (SOP Class UID, Modality). The SOP class decides.
NON_IMAGE_CLASSES = {
    "SR": ("1.2.840.10008.5.1.4.1.1.88.11", "SR"),  # Basic Text SR
    "RT plan": ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN"),
    "RT struct": ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT"),
    "RT dose": ("1.2.840.10008.5.1.4.1.1.481.2", "RTDOSE"),  # without a dose grid
    "presentation state": ("1.2.840.10008.5.1.4.1.1.11.1", "PR"),  # Grayscale Softcopy PS
    "KOS": ("1.2.840.10008.5.1.4.1.1.88.59", "KO"),
    "PDF": ("1.2.840.10008.5.1.4.1.1.104.1", "DOC"),
    "ECG": ("1.2.840.10008.5.1.4.1.1.9.1.1", "ECG"),
    "raw data": ("1.2.840.10008.5.1.4.1.1.66", "MR"),
    "private": ("1.3.12.2.1107.5.9.1", "MR"),  # Siemens CSA Non-Image: unknown to pydicom, no pixel data
}


def write_non_image(path: Path, kind: str, patient_id: str = "NONIMG", preamble: bool = True) -> Path:
    """One non-image DICOM object of `kind` (a NON_IMAGE_CLASSES key, or "DICOMDIR") written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class, modality = NON_IMAGE_CLASSES.get(kind, ("1.2.840.10008.1.3.10", ""))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if kind == "DICOMDIR":  # a directory: no SOP Instance, no patient, only records
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
        ds.FileSetID = "EXPORT"
        ds.DirectoryRecordSequence = []
    else:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
        ds.SOPClassUID = sop_class
        ds.PatientID, ds.PatientName, ds.Modality = patient_id, f"DOE^{patient_id}", modality
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[patient_id, kind])
        if kind == "SR":
            ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
            ds.ContentSequence = []
        elif kind == "PDF":
            ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
            ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
        elif kind == "ECG":
            wave = Dataset()
            wave.NumberOfWaveformChannels, wave.NumberOfWaveformSamples = 1, 4
            wave.WaveformBitsAllocated, wave.WaveformSampleInterpretation = 16, "SS"
            wave.WaveformData = np.zeros(4, np.int16).tobytes()
            ds.WaveformSequence = [wave]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble, implicit_vr=False, little_endian=True)
    return path


def strip_preamble(path: Path, implicit_vr: bool = True) -> Path:
    """Rewrite a DICOM file as a bare data set, as some archives and old tools write it: no 128-byte preamble, no
    b"DICM", no file meta group (implicit VR little endian by default)."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.preamble = None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.save_as(path, enforce_file_format=False, implicit_vr=implicit_vr, little_endian=True)
    return path
