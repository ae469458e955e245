"""Discovery of DICOM files by content, header extraction, and pixel reading.

Files are recognised by content, never by name or extension: the Part-10 preamble (b"DICM" at byte 128), or a data set
written without it (a first tag in group 0002/0008, read with pydicom's `force` and kept only when it parses to an
object with a SOP UID). Everything else is counted as non-DICOM after reading 132 bytes. DICOM objects that are not
images (SR, RT, waveforms, DICOMDIR, presentation states, ...) are their own class, counted apart from image files that
cannot be read. Headers are read without pixel data; pixels are decoded only for the few slices a stack needs. Plain
single-frame images in little-endian VR (most MR exports) are read by a small element walk of their first bytes
instead of pydicom (same values, a fifth of the time; anything unusual still goes to pydicom), and uncompressed and
RLE Lossless ones are decoded from their bytes the same way (RLE by pylibjpeg-rle, common.decode.rle_frame).
Enhanced MR multi-frame files become one `Frame` per frame with geometry from the functional groups.
A Series also carries how it was acquired and archived (vendor, field strength, slice thickness, spectral fat
suppression, lossy compression), which common/acquisition.py bins into the levels the census and report use.

A tree may hold one study exported twice: files with the same SOP Instance UID and the same content count once;
the same UID with different content marks both series (`Series.conflicts`), and a patient whose stack would use
such a series is skipped (common.series).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from common.decode import GREYSCALE, decode_frame, rle_frame
from common.geometry import Plane, unit

log = logging.getLogger(__name__)

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_ELEMENTS = {0x0010, 0x0008, 0x0009}  # (7FE0,xxxx): Pixel Data, Float and Double Float Pixel Data
# Every VR of PS3.5: the two bytes after the first tag of an explicit-VR data set written without the preamble.
_VRS = set(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
# Short names for the non-image storage classes a PACS export holds, first match wins (pydicom's UID names).
_NON_IMAGE_LABELS = (
    (re.compile(r"Key Object Selection"), "KOS"),
    (re.compile(r"\bSR\b|Structured|Procedure Log"), "SR"),
    (re.compile(r"^RT |Radiation|Treatment"), "RT"),
    (re.compile(r"Presentation State"), "presentation state"),
    (re.compile(r"Waveform"), "waveform"),
    (re.compile(r"Media Storage Directory"), "DICOMDIR"),
    (re.compile(r"Encapsulated"), "encapsulated document"),
    (re.compile(r"Raw Data"), "raw data"),
    (re.compile(r"Spectroscopy"), "spectroscopy"),
    (re.compile(r"Segmentation"), "segmentation"),
    (re.compile(r"Registration|Fiducials"), "registration"),
)


@dataclass(frozen=True)
class Frame:
    """One 2-D image: a single-frame instance, or one frame (1-based) of a multi-frame instance."""

    path: str
    sop_uid: str
    instance_number: int | None
    frame: int | None
    plane: Plane
    slope: float = 1.0
    intercept: float = 0.0
    size: int = 0
    mtime_ns: int = 0


@dataclass
class Series:
    """Frames of one series with the tags that decide its role (T1W, T2W, distractor)."""

    patient_id: str
    study_uid: str
    series_uid: str
    frame_of_reference: str = ""
    description: str = ""
    modality: str = ""
    image_type: tuple[str, ...] = ()
    repetition_time: float | None = None
    echo_time: float | None = None
    inversion_time: float | None = None
    scanning_sequence: tuple[str, ...] = ()
    scan_options: tuple[str, ...] = ()
    contrast_agent: str = ""
    photometric: str = "MONOCHROME2"
    # how the series was acquired and archived (common/acquisition.py bins them; none of them identifies anyone)
    manufacturer: str = ""
    field_strength: float | None = None  # tesla: MagneticFieldStrength, else the imaging frequency / 42.577 MHz/T
    slice_thickness: float | None = None  # mm
    fat_suppression: str = ""  # SpectrallySelectedSuppression (Enhanced MR): FAT, WATER, FAT_AND_WATER, NONE...
    lossy: bool = False  # some file of the series was lossy-compressed (the tag, or a lossy transfer syntax)
    frames: list[Frame] = field(default_factory=list)
    # pairs of files (paths relative to the scanned root) holding one SOP Instance UID with different content
    conflicts: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ScanResult:
    """All series found below a root, grouped by patient."""

    series: dict[str, list[Series]] = field(default_factory=dict)  # PatientID → series
    dicom_files: int = 0  # every file recognised as DICOM: images, non-image objects, duplicates, unreadable
    non_dicom_files: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): image files, stays at the site
    non_image: Counter = field(default_factory=Counter)  # non-image DICOM objects by kind ("SR", "RT", ...)
    duplicates: int = 0  # files whose SOP Instance UID and content were already found (a study exported twice)
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)  # (path, path, patient_id): same UID, differ
    cache: dict[str, list] = field(default_factory=dict)  # the scan cache for this tree (scan_tree's `known`)
    reused_files: int = 0  # files whose header came from the scan cache

    @property
    def non_image_files(self) -> int:
        return sum(self.non_image.values())


def _looks_like_dataset(head: bytes) -> bool:
    """True when the first bytes look like a DICOM data set written without the Part-10 preamble: a first tag in
    group 0002 (file meta) or 0008 (identification), then an explicit VR or a plausible implicit length. Cheap enough
    to run on every file, strict enough that text, images and archives fail it."""
    if len(head) < 8:
        return False
    for order in ("<", ">"):
        group, _ = struct.unpack(order + "HH", head[:4])
        if group not in (0x0002, 0x0008):
            continue
        if head[4:6] in _VRS:
            return True
        if order == "<" and struct.unpack("<I", head[4:8])[0] < 0x10000:  # implicit VR is always little endian
            return True
    return False


def sniff(path: str | os.PathLike) -> str:
    """'part10' (preamble + DICM), 'raw' (a data set without the preamble, to be confirmed by parsing) or ''."""
    with open(path, "rb") as fh:
        return _sniff_head(fh.read(132))


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file carries the DICOM Part-10 preamble or looks like a DICOM data set written without it."""
    try:
        return bool(sniff(path))
    except OSError:
        return False


def non_image_kind(sop_class: str) -> str | None:
    """A short name ('SR', 'RT', 'DICOMDIR', ...) when the SOP class is a standard non-image storage class, '' for an
    image storage class, None when unknown (private or missing: decided by the presence of pixel data)."""
    uid = pydicom.uid.UID(sop_class)
    if uid == MEDIA_DIRECTORY:
        return "DICOMDIR"
    name = uid.name if uid.is_valid else ""
    if not name or name == str(uid):
        return None
    if "Image" in name:
        return ""
    for pattern, label in _NON_IMAGE_LABELS:
        if pattern.search(name):
            return label
    return name.removesuffix(" Storage")


def _pixel_data_follows(fh, ds: Dataset) -> bool | None:
    """After dcmread(stop_before_pixels=True) on an open file: whether the next element is pixel data (pydicom stops
    in front of it). None where the file position says nothing (deflated: pydicom read an inflated copy)."""
    syntax = str((getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID", ""))
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return None
    if any(t in ds for t in PIXEL_TAGS):
        return True
    tag = fh.read(4)
    if len(tag) < 4:
        return False
    order = ">" if syntax == pydicom.uid.ExplicitVRBigEndian or ds.original_encoding[1] is False else "<"
    group, element = struct.unpack(order + "HH", tag)
    return group == 0x7FE0 and element in _PIXEL_ELEMENTS


def iter_files(root: Path) -> Iterator[str]:
    """Every regular file below root, in a stable order; hidden folders (e.g. .git) are skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _float(value, default=None):
    try:
        if value is None or value == "":
            return default
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError):
        return default


def _strs(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return tuple(str(v).upper() for v in value)
    return tuple(p.upper() for p in re.split(r"[\\ ]+", str(value)) if p)


def _first(ds: Dataset, seq: str) -> Dataset | None:
    value = ds.get(seq)
    return value[0] if value else None


# Transfer syntaxes that are lossy whatever the header says (DCT JPEG, video), and those that may be lossy (JPEG-LS
# near-lossless, JPEG 2000, HTJ2K): lossy there unless LossyImageCompression says "00" (the standard requires "01"
# once an image was lossy-compressed, and "00" is a positive statement that it was not).
_ALWAYS_LOSSY = re.compile(r"1\.2\.840\.10008\.1\.2\.4\.(5[0-6]|59|6[0-4]|10[0-9])(\.\d+)?")
_MAYBE_LOSSY = {"1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203"}
LARMOR_MHZ_PER_T = 42.577


def is_lossy(flag, transfer_syntax: str) -> bool:
    """Whether pixel data was lossy-compressed: LossyImageCompression (0028,2110) "01", or a lossy transfer syntax."""
    flag = str(flag or "").strip()
    syntax = str(transfer_syntax or "").strip()
    if flag == "01" or _ALWAYS_LOSSY.fullmatch(syntax):
        return True
    return syntax in _MAYBE_LOSSY and flag != "00"


def _field_strength(get: Callable) -> float | None:
    """MagneticFieldStrength in tesla; where it is missing, the proton imaging frequency says it (63.9 MHz: 1.5 T)."""
    tesla = _float(get("MagneticFieldStrength"))
    if tesla is None:
        mhz = _float(get("ImagingFrequency"))
        tesla = round(mhz / LARMOR_MHZ_PER_T, 2) if mhz else None
    return tesla


def _plane(position, orientation, spacing, rows: int, cols: int) -> Plane:
    if position is None or orientation is None or spacing is None:
        raise ValueError("missing ImagePositionPatient, ImageOrientationPatient or PixelSpacing")
    pos = np.array([float(v) for v in position], dtype=float)
    ori = [float(v) for v in orientation]
    sp = tuple(float(v) for v in spacing)
    if pos.shape != (3,) or len(ori) != 6 or len(sp) != 2 or min(sp) <= 0 or rows <= 0 or cols <= 0:
        raise ValueError("invalid image geometry tags")
    return Plane(pos, unit(ori[:3]), unit(ori[3:]), (sp[0], sp[1]), int(rows), int(cols))


def _rescale(item: Dataset | None) -> tuple[float, float]:
    if item is None:
        return 1.0, 0.0
    return _float(item.get("RescaleSlope"), 1.0), _float(item.get("RescaleIntercept"), 0.0)


def _enhanced_frames(ds: Dataset, path: str, stat: os.stat_result) -> tuple[list[Frame], dict]:
    shared = _first(ds, "SharedFunctionalGroupsSequence") or Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n = int(ds.get("NumberOfFrames", len(per_frame)) or 0)
    if len(per_frame) != n or n == 0:
        raise ValueError("per-frame functional groups do not match NumberOfFrames")

    def group(item: Dataset, name: str) -> Dataset | None:
        return _first(item, name) or _first(shared, name)

    frames = []
    for i, item in enumerate(per_frame):
        pos = group(item, "PlanePositionSequence")
        ori = group(item, "PlaneOrientationSequence")
        meas = group(item, "PixelMeasuresSequence")
        plane = _plane(
            pos.get("ImagePositionPatient") if pos else None,
            ori.get("ImageOrientationPatient") if ori else None,
            meas.get("PixelSpacing") if meas else None,
            ds.Rows,
            ds.Columns,
        )
        slope, intercept = _rescale(group(item, "PixelValueTransformationSequence"))
        frames.append(
            Frame(
                path,
                str(ds.SOPInstanceUID),
                _int(ds.get("InstanceNumber")),
                i + 1,
                plane,
                slope,
                intercept,
                stat.st_size,
                stat.st_mtime_ns,
            )
        )
    timing = _first(shared, "MRTimingAndRelatedParametersSequence") or _first(
        per_frame[0], "MRTimingAndRelatedParametersSequence"
    )
    echo = _first(shared, "MREchoSequence") or _first(per_frame[0], "MREchoSequence")
    modifier = _first(shared, "MRModifierSequence") or _first(per_frame[0], "MRModifierSequence")
    measures = _first(shared, "PixelMeasuresSequence") or _first(per_frame[0], "PixelMeasuresSequence")
    imaging = _first(shared, "MRImagingModifierSequence") or _first(per_frame[0], "MRImagingModifierSequence")
    mhz = _float(imaging.get("TransmitterFrequency")) if imaging else None
    tags = {
        "slice_thickness": _float(measures.get("SliceThickness")) if measures else None,
        "field_strength": round(mhz / LARMOR_MHZ_PER_T, 2)
        if mhz and _float(ds.get("MagneticFieldStrength")) is None
        else None,
        "repetition_time": _float(timing.get("RepetitionTime")) if timing else None,
        "echo_time": _float(echo.get("EffectiveEchoTime")) if echo else None,
        "inversion_time": _float(modifier.get("InversionTimes")) if modifier else None,
    }
    if modifier is not None and str(modifier.get("InversionRecovery", "")).upper() == "YES":
        tags["scanning_sequence"] = ("IR",)
    return frames, tags


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_header(path: str) -> tuple[Series, list[Frame]]:
    """Header of one image file → (its series description, its frames). Raises ValueError/InvalidDicomError when the
    file cannot be used as an image (no pixel geometry, truncated header...)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=sniff(path) == "raw")
    return header_of(ds, path, os.stat(path))


def header_of(ds: Dataset, path: str, stat: os.stat_result) -> tuple[Series, list[Frame]]:
    """An image's data set (read without pixels) → (its series description, its frames)."""
    for tag in _REQUIRED:
        if tag not in ds:
            raise ValueError(f"no {tag}")
    series = _series(ds.get, str((getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID", "")))
    if str(ds.get("SOPClassUID", "")) == ENHANCED_MR or "PerFrameFunctionalGroupsSequence" in ds:
        frames, tags = _enhanced_frames(ds, path, stat)
        for key, value in tags.items():
            if value not in (None, ()):
                setattr(series, key, value)
        if not series.contrast_agent:
            usage = _first(ds, "ContrastBolusUsageSequence")
            if usage is not None and str(usage.get("ContrastBolusAgentAdministered", "")).upper() == "YES":
                series.contrast_agent = "administered"
    else:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError("multi-frame file without functional groups")
        frames = [_single_frame(ds.get, path, stat)]
    return series, frames


_REQUIRED = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns")


def _series(get: Callable, transfer_syntax: str = "") -> Series:
    """The series-level tags; `get` is Dataset.get or the fast path's dict.get (same values either way)."""
    return Series(
        patient_id=str(get("PatientID")).strip(),
        study_uid=str(get("StudyInstanceUID")),
        series_uid=str(get("SeriesInstanceUID")),
        frame_of_reference=str(get("FrameOfReferenceUID", "")),
        description=str(get("SeriesDescription", "")),
        modality=str(get("Modality", "")),
        image_type=_strs(get("ImageType")),
        repetition_time=_float(get("RepetitionTime")),
        echo_time=_float(get("EchoTime")),
        inversion_time=_float(get("InversionTime")),
        scanning_sequence=_strs(get("ScanningSequence")),
        scan_options=_strs(get("ScanOptions")),
        contrast_agent=str(get("ContrastBolusAgent", "") or "").strip(),
        photometric=str(get("PhotometricInterpretation", "MONOCHROME2")).strip(),
        manufacturer=str(get("Manufacturer", "") or "").strip(),
        field_strength=_field_strength(get),
        slice_thickness=_float(get("SliceThickness")),
        fat_suppression=str(get("SpectrallySelectedSuppression", "") or "").strip().upper(),
        lossy=is_lossy(get("LossyImageCompression"), transfer_syntax),
    )


def _single_frame(get: Callable, path: str, stat: os.stat_result) -> Frame:
    plane = _plane(
        get("ImagePositionPatient"), get("ImageOrientationPatient"), get("PixelSpacing"), get("Rows"), get("Columns")
    )
    slope, intercept = _float(get("RescaleSlope"), 1.0), _float(get("RescaleIntercept"), 0.0)
    return Frame(
        path,
        str(get("SOPInstanceUID")),
        _int(get("InstanceNumber")),
        None,
        plane,
        slope,
        intercept,
        stat.st_size,
        stat.st_mtime_ns,
    )


# ---- fast header path -------------------------------------------------------------------------------------------------
# pydicom parses and converts a whole header in about 0.6 ms; discovery needs some twenty values of every file, and a
# site holds tens of thousands of files. This reader walks the elements of a Part-10 file in little-endian VR (the
# encoding of nearly every MR export, compressed or not) and converts only those values, with the same results as
# header_of on pydicom's data set. It answers only what it is sure of: anything else (big endian, deflate, Enhanced
# MR, non-image classes, a value outside its VR's strict form, non-ASCII text) returns None and pydicom reads the file
# as before, with its warnings and reasons. tests/test_dicom.py holds the two paths to the same answers.

_FAST_VRS = {  # tag → VR of every value the fast path converts (implicit VR files carry no VR)
    0x00080005: "CS",  # SpecificCharacterSet
    0x00080008: "CS",  # ImageType
    0x00080016: "UI",  # SOPClassUID
    0x00080018: "UI",  # SOPInstanceUID
    0x00080060: "CS",  # Modality
    0x00080070: "LO",  # Manufacturer
    0x0008103E: "LO",  # SeriesDescription
    0x00100020: "LO",  # PatientID
    0x00180010: "LO",  # ContrastBolusAgent
    0x00180020: "CS",  # ScanningSequence
    0x00180022: "CS",  # ScanOptions
    0x00180050: "DS",  # SliceThickness
    0x00180080: "DS",  # RepetitionTime
    0x00180081: "DS",  # EchoTime
    0x00180082: "DS",  # InversionTime
    0x00180084: "DS",  # ImagingFrequency
    0x00180087: "DS",  # MagneticFieldStrength
    0x00189025: "CS",  # SpectrallySelectedSuppression
    0x0020000D: "UI",  # StudyInstanceUID
    0x0020000E: "UI",  # SeriesInstanceUID
    0x00200013: "IS",  # InstanceNumber
    0x00200032: "DS",  # ImagePositionPatient
    0x00200037: "DS",  # ImageOrientationPatient
    0x00200052: "UI",  # FrameOfReferenceUID
    0x00280002: "US",  # SamplesPerPixel
    0x00280004: "CS",  # PhotometricInterpretation
    0x00280010: "US",  # Rows
    0x00280011: "US",  # Columns
    0x00280030: "DS",  # PixelSpacing
    0x00280100: "US",  # BitsAllocated
    0x00280101: "US",  # BitsStored
    0x00280103: "US",  # PixelRepresentation
    0x00281052: "DS",  # RescaleIntercept
    0x00281053: "DS",  # RescaleSlope
    0x00282110: "CS",  # LossyImageCompression
}
_FAST_NAMES = {tag: pydicom.datadict.keyword_for_tag(tag) for tag in _FAST_VRS}
_FAST_TAGS = {name: tag for tag, name in _FAST_NAMES.items()}
# Optional numbers that scanners leave empty (Type 2/3): empty means absent, as pydicom's None does for header_of
_FAST_EMPTY_OK = {0x00180050, 0x00180084, 0x00180087}
_FAST_COUNTS = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}
# Present at all: pydicom's path decides (multi-frame, functional groups: Enhanced MR and its relatives).
_FAST_REFUSE = {0x00280008, 0x52009229, 0x52009230}
_FAST_CHARSETS = {"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 6", "ISO 2022 IR 100"}
_PIXEL_TAG_INTS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_IMPLICIT_LE = "1.2.840.10008.1.2"
_NOT_FAST = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated
# Each VR's strict form, as pydicom validates it (a value pydicom would warn about goes to pydicom)
_FORMS = {
    "UI": re.compile(r"[0-9.]{1,64}"),
    "CS": re.compile(r"[A-Z0-9 _]{0,16}"),
    "DS": re.compile(r" *[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)? *"),
    "IS": re.compile(r" *[+-]?\d{1,10} *"),
}
_TEXT_MAX = {"LO": 64, "SH": 16}
_PRINTABLE = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")  # ASCII without control characters and without backslash


class _NotFast(Exception):
    """The fast path declines this file: pydicom reads it."""


class _Short(Exception):
    """The header runs past the bytes read so far."""


@functools.lru_cache(maxsize=4096)
def _fast_value(vr: str, raw: bytes):
    """A value as header_of sees it through pydicom: str or tuple of str (text), float or tuple (DS), int (IS, US).
    Cached: most values repeat across the files of a series (UIDs, orientation, spacing, timing); hence tuples."""
    if vr == "US":
        if len(raw) != 2:
            raise _NotFast
        return struct.unpack("<H", raw)[0]
    # the padding pydicom strips before splitting: trailing NUL/space of a UID, both ends of a DS string
    text = raw.rstrip(b"\x00 ") if vr == "UI" else raw.strip(b" ") if vr == "DS" else raw
    items = text.split(b"\\") if vr in ("CS", "DS") else [text]
    if not all(_PRINTABLE.fullmatch(item) for item in items):
        raise _NotFast
    values = [item.decode("ascii") for item in items]
    if vr in ("UI", "CS"):
        if vr == "CS":
            values = (b"\\".join(items).decode("ascii").rstrip(" ")).split("\\")
        if not all(_FORMS[vr].fullmatch(v) for v in values):
            raise _NotFast
        return values[0] if len(values) == 1 else tuple(values)
    if vr in _TEXT_MAX:
        value = values[0].rstrip(" ")
        if len(value) > _TEXT_MAX[vr]:
            raise _NotFast
        return value
    if not raw.strip(b" "):
        raise _NotFast  # an empty number: pydicom's own empty value
    if vr == "IS":
        if not _FORMS["IS"].fullmatch(values[0]):
            raise _NotFast
        return int(values[0])
    if not all(len(v) <= 16 and _FORMS["DS"].fullmatch(v) for v in values):
        raise _NotFast
    floats = [float(v) for v in values]
    return floats[0] if len(floats) == 1 else tuple(floats)


def _walk(buf: bytes, pos: int, implicit: bool, found: dict | None) -> int:
    """Walk elements from pos: at the top level (found is a dict) up to pixel data, collecting wanted raw values; in
    an item (found None) up to its delimiter. Returns the position after the last element walked."""
    end = len(buf)
    while True:
        if pos + 8 > end:
            raise _Short
        group, element = struct.unpack_from("<HH", buf, pos)
        tag = group << 16 | element
        if found is None and tag == 0xFFFEE00D:  # item delimiter
            return pos + 8
        if found is not None and tag in _PIXEL_TAG_INTS:
            return pos
        if implicit:
            vr, length, pos = None, struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
        else:
            vr = buf[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _Short
                length, pos = struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
            elif vr in _VRS:
                length, pos = struct.unpack_from("<H", buf, pos + 6)[0], pos + 8
            else:
                raise _NotFast
        if found is not None and (tag in _FAST_REFUSE or group == 0x0002):
            raise _NotFast
        if length == 0xFFFFFFFF:
            if not (implicit or vr == b"SQ"):
                raise _NotFast  # undefined-length UN, OB...: pydicom knows the rules
            pos = _skip_sequence(buf, pos, implicit)
            continue
        if pos + length > end:
            raise _Short
        if found is not None and tag in _FAST_VRS:
            if vr is not None and vr.decode("ascii") != _FAST_VRS[tag]:
                raise _NotFast
            found[tag] = buf[pos : pos + length]
        pos += length


def _skip_sequence(buf: bytes, pos: int, implicit: bool) -> int:
    while True:
        if pos + 8 > len(buf):
            raise _Short
        group, element, length = struct.unpack_from("<HHI", buf, pos)
        pos += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            return pos
        if (group, element) != (0xFFFE, 0xE000):
            raise _NotFast
        pos = _walk(buf, pos, implicit, None) if length == 0xFFFFFFFF else pos + length


def _fast_elements(buf: bytes) -> tuple[str, dict[int, bytes], dict[int, bytes], int]:
    """(transfer syntax, file meta elements, wanted raw elements, position of the pixel data element)."""
    pos, meta = 132, {}
    while True:  # file meta: always explicit VR little endian
        if pos + 8 > len(buf):
            raise _Short
        group, element = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        vr = buf[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length, pos = struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
        elif vr in _VRS:
            length, pos = struct.unpack_from("<H", buf, pos + 6)[0], pos + 8
        else:
            raise _NotFast
        if length == 0xFFFFFFFF or pos + length > len(buf):
            raise _NotFast
        meta[element] = buf[pos : pos + length]
        pos += length
    syntax = meta.get(0x0010, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    if not syntax or syntax in _NOT_FAST:
        raise _NotFast
    raw: dict[int, bytes] = {}
    pixels = _walk(buf, pos, syntax == _IMPLICIT_LE, raw)
    return syntax, meta, raw, pixels


def _fast_parse(buf: bytes) -> dict:
    """The wanted values of a Part-10 file by keyword (and its TransferSyntaxUID); raises _NotFast or _Short when
    the fast path declines it."""
    syntax, meta, raw, _ = _fast_elements(buf)
    values = {
        _FAST_NAMES[tag]: _fast_value(_FAST_VRS[tag], data)
        for tag, data in raw.items()
        if data.strip(b" \x00") or tag not in _FAST_EMPTY_OK
    }
    if "SOPClassUID" not in values and 0x0002 in meta:
        values["SOPClassUID"] = _fast_value("UI", meta[0x0002])
    charset = values.pop("SpecificCharacterSet", "")
    if not isinstance(charset, str) or charset not in _FAST_CHARSETS:
        raise _NotFast
    if any(tag not in values for tag in _REQUIRED) or non_image_kind(str(values.get("SOPClassUID", ""))) != "":
        raise _NotFast  # pydicom's path words the reason (or classifies the object)
    for name in ("SOPClassUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality",
                 "PhotometricInterpretation", "FrameOfReferenceUID", "RescaleSlope", "RescaleIntercept"):  # fmt: skip
        if isinstance(values.get(name), tuple):
            raise _NotFast
    for name, count in _FAST_COUNTS.items():
        if not isinstance(values.get(name), tuple) or len(values[name]) != count:
            raise _NotFast
    values["TransferSyntaxUID"] = syntax
    return values


_FIRST_READ = 16384  # one read per file usually holds the whole header of a plain image


def fast_header(fh, path: str, stat: os.stat_result, head: bytes = b"") -> tuple[Series, list[Frame]] | None:
    """header_of's answer for a plain single-frame image file without pydicom, or None where pydicom must read it.
    `head`: the file's first bytes as read already from `fh` (which is open just after them); more is read only when
    the header is longer."""
    buf = head + fh.read(max(0, _FIRST_READ - len(head)))
    try:
        try:
            values = _fast_parse(buf)
        except _Short:
            if len(buf) < _FIRST_READ:
                return None  # the whole file and no pixel data: pydicom says what is wrong
            buf += fh.read(4 << 20)
            values = _fast_parse(buf)
        return _series(values.get, values["TransferSyntaxUID"]), [_single_frame(values.get, path, stat)]
    except Exception:  # _NotFast, a short or malformed header, a value that does not convert: pydicom decides
        return None


def _sniff_head(head: bytes) -> str:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "part10"
    return "raw" if _looks_like_dataset(head[:132]) else ""


def _classify(fh, path: str, kind: str) -> tuple[str, tuple[Series, list[Frame]] | str | None, str]:
    stat = os.fstat(fh.fileno())
    ds = pydicom.dcmread(fh, stop_before_pixels=True, force=kind == "raw")
    meta = getattr(ds, "file_meta", None) or {}
    sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or "").strip()
    if kind == "raw" and not sop_class and "SOPInstanceUID" not in ds:
        # force=True parses almost anything into a few elements: without a SOP UID it was not DICOM after all
        return "unreadable", None, "no DICOM preamble, and the content does not parse as a DICOM object (no SOP UID)"
    if not sop_class and "Rows" not in ds:
        return "unreadable", None, "no SOP Class UID and no image attributes (a damaged header?)"
    what = non_image_kind(sop_class)
    if what is None:  # a private SOP class: pixel data decides
        if _pixel_data_follows(fh, ds) is False and "Rows" not in ds:
            return "non-image", "private", ""
    elif what:
        return "non-image", what, ""
    elif _pixel_data_follows(fh, ds) is False:
        return "unreadable", None, "an image object without pixel data (a truncated file or a header-only export)"
    return "dicom", header_of(ds, path, stat), ""


def read_file(path: str) -> tuple[str, tuple[Series, list[Frame]] | str | None, str]:
    """Classify one file: ('dicom', header, ''), ('non-image', kind such as 'SR', ''), ('non-dicom', None, '') or
    ('unreadable', None, reason). pydicom's warnings about odd headers go to the log (INFO, with the path, which the
    prepare log replaces by the file's pseudonym), never to the console."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed by the with below) once: sniffing, fast path and pydicom share it
    except OSError as exc:
        return "unreadable", None, f"cannot be opened ({exc.__class__.__name__}: {exc.strerror or exc})"
    with fh:
        try:
            head = fh.read(_FIRST_READ)
        except OSError as exc:
            return "unreadable", None, f"cannot be opened ({exc.__class__.__name__}: {exc.strerror or exc})"
        kind = _sniff_head(head)
        if not kind:
            return "non-dicom", None, ""
        if kind == "part10":
            header = fast_header(fh, path, os.fstat(fh.fileno()), head)
            if header is not None:
                return "dicom", header, ""
        return _read_with_pydicom(fh, path, kind)


def _read_with_pydicom(fh, path: str, kind: str) -> tuple[str, tuple[Series, list[Frame]] | str | None, str]:
    with _pydicom_messages() as messages:
        try:
            fh.seek(0)
            result = _classify(fh, path, kind)
        except (InvalidDicomError, ValueError, KeyError, AttributeError, TypeError, IndexError, OSError, EOFError) as e:
            result = "unreadable", None, f"{e.__class__.__name__}: {e}"
        except Exception as exc:  # a malformed file must never stop discovery
            result = "unreadable", None, f"{exc.__class__.__name__}"
    for message in dict.fromkeys(messages):  # the path last: the prepare log hides it up to the line's end
        log.info("pydicom warning while reading a header: %s; in %s", " ".join(message.split()), path)
    return result


class _Collect(logging.Filter):
    def __init__(self, into: list[str]):
        super().__init__()
        self.into = into

    def filter(self, record: logging.LogRecord) -> bool:
        self.into.append(record.getMessage())
        return False


@contextlib.contextmanager
def _pydicom_messages():
    """Collect what pydicom says while one file is read (it warns through `warnings` and its logger, often both),
    so that it is logged once, with the file, instead of reaching the console or the log without context."""
    messages: list[str] = []
    collect = _Collect(messages)
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.addFilter(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        pydicom_log.removeFilter(collect)
        messages.extend(str(w.message) for w in caught)


def pixel_digest(path: str) -> str:
    """SHA-256 of a file's pixel data element as stored (encapsulated fragments included), with its transfer syntax."""
    ds = pydicom.dcmread(path, force=sniff(path) == "raw")
    h = hashlib.sha256(str((getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID", "")).encode())
    for tag in PIXEL_TAGS:
        if tag in ds:
            h.update(tag.encode())
            h.update(ds[tag].value)
    return h.hexdigest()


def _same_geometry(a: list[Frame], b: list[Frame]) -> bool:
    if len(a) != len(b):
        return False
    for fa, fb in zip(sorted(a, key=lambda f: f.frame or 0), sorted(b, key=lambda f: f.frame or 0)):
        pa, pb = fa.plane, fb.plane
        if (fa.frame, pa.rows, pa.cols, fa.slope, fa.intercept) != (fb.frame, pb.rows, pb.cols, fb.slope, fb.intercept):
            return False
        for u, v in ((pa.position, pb.position), (pa.row_cosine, pb.row_cosine), (pa.col_cosine, pb.col_cosine)):
            if not np.allclose(u, v, atol=1e-4):
                return False
        if not np.allclose(pa.spacing, pb.spacing, atol=1e-6):
            return False
    return True


def same_content(a: tuple[Series, list[Frame]], b: tuple[Series, list[Frame]]) -> bool:
    """Whether two files with one SOP Instance UID hold the same image: same series and geometry, and the same pixel
    data (as stored, or decoded where the two were written with different transfer syntaxes, as when a PACS
    re-exports compressed)."""
    (sa, fa), (sb, fb) = a, b
    if (sa.study_uid, sa.series_uid) != (sb.study_uid, sb.series_uid) or not _same_geometry(fa, fb):
        return False
    try:
        if pixel_digest(fa[0].path) == pixel_digest(fb[0].path):
            return True
        return all(
            np.array_equal(read_pixels(x, sa.photometric), read_pixels(y, sb.photometric))
            for x, y in zip(sorted(fa, key=lambda f: f.frame or 0), sorted(fb, key=lambda f: f.frame or 0))
        )
    except Exception:  # undecodable: cannot show the two are one image, so they are not
        return False


def merge(results: Iterable[tuple[str, str, object, str]], root: str | os.PathLike | None = None) -> ScanResult:
    """Group per-file results by patient and series (frames of one series may come from many files). A file whose
    SOP Instance UID was already seen for the patient is dropped when its content is the same (a duplicate export);
    otherwise both files are named, relative to root, in the series' `conflicts`."""
    scan = ScanResult()
    by_uid: dict[tuple[str, str, str], Series] = {}
    first: dict[tuple[str, str], tuple[Series, list[Frame]]] = {}

    def rel(path: str) -> str:
        return os.path.relpath(path, root) if root is not None else path

    for path, kind, header, reason in results:
        if kind == "non-dicom":
            scan.non_dicom_files += 1
            continue
        scan.dicom_files += 1
        if kind == "unreadable":
            scan.unreadable.append((path, reason))
            continue
        if kind == "non-image":
            scan.non_image[header] += 1
            continue
        series, frames = header
        key = (series.patient_id, series.study_uid, series.series_uid)
        if key not in by_uid:
            by_uid[key] = series
            scan.series.setdefault(series.patient_id, []).append(series)
        seen = first.get((series.patient_id, frames[0].sop_uid))
        if seen is None:
            first[(series.patient_id, frames[0].sop_uid)] = header
        elif same_content(seen, header):
            scan.duplicates += 1
            continue
        else:
            pair = (rel(seen[1][0].path), rel(path))
            scan.conflicts.append((*pair, series.patient_id))
            other = (seen[0].patient_id, seen[0].study_uid, seen[0].series_uid)
            for k in dict.fromkeys((key, other)):  # both series: whichever a stack would use is refused
                by_uid[k].conflicts.append(pair)
        by_uid[key].frames.extend(frames)
        by_uid[key].lossy = by_uid[key].lossy or series.lossy  # files of one series may be archived differently
    return scan


_SERIES_FIELDS = tuple(f for f in Series.__dataclass_fields__ if f not in ("frames", "conflicts"))


def header_to_json(header: tuple[Series, list[Frame]]) -> list:
    """A header as JSON values (exact: floats round-trip through their repr), for the scan cache."""
    series, frames = header
    tags = [getattr(series, f) for f in _SERIES_FIELDS]
    rows = [
        [f.sop_uid, f.instance_number, f.frame, f.slope, f.intercept, f.size, f.mtime_ns]
        + [f.plane.position.tolist(), f.plane.row_cosine.tolist(), f.plane.col_cosine.tolist()]
        + [list(f.plane.spacing), f.plane.rows, f.plane.cols]
        for f in frames
    ]
    return [tags, rows]


def header_from_json(obj: list, path: str) -> tuple[Series, list[Frame]]:
    tags, rows = obj
    values = {f: tuple(v) if isinstance(v, list) else v for f, v in zip(_SERIES_FIELDS, tags, strict=True)}
    frames = [
        Frame(path, sop, number, frame, Plane(np.array(pos), np.array(r), np.array(c), tuple(sp), nr, nc), *rest)
        for sop, number, frame, *rest, pos, r, c, sp, nr, nc in rows
    ]
    return Series(**values), frames


def file_key(stat: os.stat_result) -> list[int]:
    """What says a file is unchanged since it was read: size, mtime, inode and ctime (a copy with its mtime kept, or a
    file replaced in place, still changes the inode or the ctime)."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


def scan_tree(
    root: Path,
    map_fn: Callable = map,
    progress: Callable[[int], None] | None = None,
    known: dict[str, list] | None = None,
) -> ScanResult:
    """Discover every DICOM file below root by content. `map_fn` may be a process pool's map to use all cores.

    `known` (the scan cache: path below root → [file_key, kind, header_to_json or label]) spares reading files that
    are unchanged since; the result's `cache` is the same table for this tree, to keep for the next scan. Unreadable
    files are never cached: they are read again, and say why again.
    """
    root = Path(root)
    paths = list(iter_files(root))
    cache: dict[str, list] = {}
    reused: dict[str, tuple] = {}
    for path in paths:
        rel = os.path.relpath(path, root)
        entry = (known or {}).get(rel)
        if entry is None:
            continue
        try:
            key = file_key(os.stat(path))
        except OSError:
            continue
        if entry[0] == key:
            kind, payload = entry[1], entry[2]
            try:
                reused[path] = (kind, header_from_json(payload, path) if kind == "dicom" else payload, "")
            except (ValueError, TypeError, IndexError):  # an entry this code cannot read: the file is read again
                continue
            cache[rel] = entry
    todo = [p for p in paths if p not in reused]
    pending = iter(map_fn(read_file, todo))  # in path order, as the workers finish: progress moves as files are read
    fresh: dict[str, tuple] = {}

    def results():
        for i, path in enumerate(paths, 1):
            out = reused.get(path)
            if out is None:
                out = fresh[path] = next(pending)
            if progress is not None:
                progress(i)
            yield (path, *out)

    scan = merge(results(), root)
    for path in todo:
        kind, payload, _ = fresh[path]
        if kind == "unreadable":
            continue
        try:
            key = file_key(os.stat(path))
        except OSError:
            continue
        if kind == "dicom" and payload[1][0].size != key[0] or kind == "dicom" and payload[1][0].mtime_ns != key[1]:
            continue  # changed while it was read
        cache[os.path.relpath(path, root)] = [key, kind, header_to_json(payload) if kind == "dicom" else payload]
    scan.cache = cache
    scan.reused_files = len(reused)
    return scan


_NATIVE = {_IMPLICIT_LE, "1.2.840.10008.1.2.1"}  # uncompressed little endian, implicit or explicit VR
_RLE = "1.2.840.10008.1.2.5"  # RLE Lossless: decoded here too (common.decode.rle_frame)


def native_pixels(path: str) -> np.ndarray | None:
    """The stored values of a single-frame, uncompressed (or RLE Lossless: common.decode.rle_frame), little-endian
    greyscale file read straight from its bytes, as pydicom's decoder returns them (unused high bits of unsigned
    samples cleared), or None where pydicom must decode (other compression, big endian, signed samples with unused
    bits, anything the fast header path declines)."""
    try:
        with open(path, "rb") as fh:
            buf = fh.read()
        syntax, _, raw, pos = _fast_elements(buf)
        if syntax not in _NATIVE and syntax != _RLE or buf[128:132] != b"DICM":
            return None

        def get(name: str):
            tag = _FAST_TAGS[name]
            return _fast_value(_FAST_VRS[tag], raw[tag]) if tag in raw else None

        rows, cols, bits, stored = get("Rows"), get("Columns"), get("BitsAllocated"), get("BitsStored")
        signed, samples = get("PixelRepresentation"), get("SamplesPerPixel")
        photometric = get("PhotometricInterpretation")
        if samples != 1 or not isinstance(photometric, str) or photometric.strip().upper() not in GREYSCALE:
            return None
        if bits not in (8, 16) or signed not in (0, 1) or not isinstance(stored, int) or not 0 < stored <= bits:
            return None
        if signed and stored != bits or not rows or not cols:
            return None
        if struct.unpack_from("<HH", buf, pos) != (0x7FE0, 0x0010):
            return None
        if syntax == _RLE:
            return rle_frame(buf, pos, rows, cols, bits, stored, signed)
        if syntax == _IMPLICIT_LE:
            length, start = struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
        elif buf[pos + 4 : pos + 6] in (b"OW", b"OB"):
            length, start = struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
        else:
            return None
        need = rows * cols * bits // 8
        if length not in (need, need + need % 2) or start + need > len(buf):
            return None  # encapsulated, short or padded beyond one byte: pydicom says what it makes of it
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        arr = np.frombuffer(buf, dtype=dtype, count=rows * cols, offset=start).reshape(rows, cols)
        if stored < bits:
            arr = arr & dtype.type((1 << stored) - 1)
        return arr
    except Exception:  # _NotFast, _Short, a malformed header: pydicom decides
        return None


def read_pixels(frame: Frame, photometric: str = "MONOCHROME2") -> np.ndarray:
    """Decoded, rescaled float32 pixels of one frame. MONOCHROME1 is inverted so that bright means high signal."""
    arr = native_pixels(frame.path) if frame.frame is None else None
    if arr is None:
        arr = decode_frame(frame.path, None if frame.frame is None else frame.frame - 1)
    if arr.ndim != 2:
        raise ValueError("not a single-channel image")
    out = arr.astype(np.float32)
    if arr.dtype.kind not in "ui" or frame.slope != 1.0 or frame.intercept != 0.0:
        # integers times 1 plus 0 are themselves, exactly: two passes over the slice saved in the usual case
        out = out * np.float32(frame.slope) + np.float32(frame.intercept)
    if photometric.upper() == "MONOCHROME1":
        out = out.max() + out.min() - out
    return out
