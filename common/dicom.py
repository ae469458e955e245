"""Discovery of DICOM files by content, header extraction, and pixel reading.

Files are recognised by the Part-10 preamble (b"DICM" at byte 128), never by name or extension; everything else is
counted as non-DICOM and ignored. Headers are read without pixel data; pixels are decoded only for the few slices a
stack needs. Enhanced MR multi-frame files become one `Frame` per frame with geometry from the functional groups.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from common.decode import decode_frame
from common.geometry import Plane, unit

log = logging.getLogger(__name__)

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


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
    frames: list[Frame] = field(default_factory=list)


@dataclass
class ScanResult:
    """All series found below a root, grouped by patient."""

    series: dict[str, list[Series]] = field(default_factory=dict)  # PatientID → series
    dicom_files: int = 0
    non_dicom_files: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): stays at the site


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file carries the DICOM Part-10 preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


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
    tags = {
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
    """Header of one file → (its series description, its frames). Raises ValueError/InvalidDicomError when the
    file cannot be used as an image (no pixel geometry, truncated header...)."""
    stat = os.stat(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for tag in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns"):
        if tag not in ds:
            raise ValueError(f"no {tag}")
    series = Series(
        patient_id=str(ds.PatientID).strip(),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
        description=str(ds.get("SeriesDescription", "")),
        modality=str(ds.get("Modality", "")),
        image_type=_strs(ds.get("ImageType")),
        repetition_time=_float(ds.get("RepetitionTime")),
        echo_time=_float(ds.get("EchoTime")),
        inversion_time=_float(ds.get("InversionTime")),
        scanning_sequence=_strs(ds.get("ScanningSequence")),
        scan_options=_strs(ds.get("ScanOptions")),
        contrast_agent=str(ds.get("ContrastBolusAgent", "") or "").strip(),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
    )
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
        plane = _plane(
            ds.get("ImagePositionPatient"),
            ds.get("ImageOrientationPatient"),
            ds.get("PixelSpacing"),
            ds.Rows,
            ds.Columns,
        )
        slope, intercept = _rescale(ds)
        frames = [
            Frame(
                path,
                str(ds.SOPInstanceUID),
                _int(ds.get("InstanceNumber")),
                None,
                plane,
                slope,
                intercept,
                stat.st_size,
                stat.st_mtime_ns,
            )
        ]
    return series, frames


def read_file(path: str) -> tuple[str, tuple[Series, list[Frame]] | None, str]:
    """Classify one file: ('dicom', header, ''), ('non-dicom', None, '') or ('unreadable', None, reason)."""
    if not is_dicom_file(path):
        return "non-dicom", None, ""
    try:
        with warnings.catch_warnings():  # pydicom warns on every odd header; the reason is reported instead
            warnings.simplefilter("ignore")
            return "dicom", read_header(path), ""
    except (InvalidDicomError, ValueError, KeyError, AttributeError, TypeError, IndexError, OSError, EOFError) as exc:
        return "unreadable", None, f"{exc.__class__.__name__}: {exc}"[:200]
    except Exception as exc:  # a malformed file must never stop discovery
        return "unreadable", None, f"{exc.__class__.__name__}"


def merge(results: Iterable[tuple[str, str, tuple[Series, list[Frame]] | None, str]]) -> ScanResult:
    """Group per-file results by patient and series (frames of one series may come from many files)."""
    scan = ScanResult()
    by_uid: dict[tuple[str, str, str], Series] = {}
    for path, kind, header, reason in results:
        if kind == "non-dicom":
            scan.non_dicom_files += 1
            continue
        scan.dicom_files += 1
        if kind == "unreadable":
            scan.unreadable.append((path, reason))
            continue
        series, frames = header
        key = (series.patient_id, series.study_uid, series.series_uid)
        if key not in by_uid:
            by_uid[key] = series
            scan.series.setdefault(series.patient_id, []).append(series)
        by_uid[key].frames.extend(frames)
    return scan


def scan_tree(root: Path, map_fn: Callable = map, progress: Callable[[int], None] | None = None) -> ScanResult:
    """Discover every DICOM file below root by content. `map_fn` may be a process pool's imap to use all cores."""
    paths = list(iter_files(Path(root)))

    def results():
        for i, (path, out) in enumerate(zip(paths, map_fn(read_file, paths)), 1):
            if progress is not None:
                progress(i)
            yield (path, *out)

    return merge(results())


def read_pixels(frame: Frame, photometric: str = "MONOCHROME2") -> np.ndarray:
    """Decoded, rescaled float32 pixels of one frame. MONOCHROME1 is inverted so that bright means high signal."""
    arr = decode_frame(frame.path, None if frame.frame is None else frame.frame - 1)
    if arr.ndim != 2:
        raise ValueError("not a single-channel image")
    out = arr.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)
    if photometric.upper() == "MONOCHROME1":
        out = out.max() + out.min() - out
    return out
