"""Which series of a patient is the sagittal T1W and which the sagittal T2W.

Decided from tags: orientation, TR/TE, inversion (STIR/FLAIR), contrast agent, localizer image type, fat
saturation; SeriesDescription is only a hint where TR/TE are absent, and to recognise distractors. The manifest's
series UIDs override everything.
"""

from __future__ import annotations

import math
import re

import numpy as np

from common.dicom import Series
from common.errors import PatientSkipped
from common.geometry import LEFT_RIGHT, lr_position

SAGITTAL_MIN_COS = math.cos(math.radians(30))
LOCALIZER_HINT = re.compile(r"loc|scout|survey|plan|3.?pl", re.I)
INVERSION_HINT = re.compile(r"stir|tirm|flair|\bir\b|inversion", re.I)
CONTRAST_HINT = re.compile(r"\+\s*c\b|post|\bgd\b|gad|contrast|km\b|\bce\b", re.I)
FATSAT_HINT = re.compile(r"\bfs\b|fat.?sat|spair|spir|dixon|\bfat\b", re.I)


def is_sagittal(series: Series) -> bool:
    if not series.frames:
        return False
    normals = np.array([f.plane.normal for f in series.frames])
    return bool(np.all(np.abs(normals @ LEFT_RIGHT) >= SAGITTAL_MIN_COS))


def distractor_reason(series: Series) -> str:
    """Why a series can never be the T1W/T2W input ('' when it can)."""
    desc = series.description
    if series.modality and series.modality.upper() != "MR":
        return f"modality {series.modality}"
    if "LOCALIZER" in series.image_type or LOCALIZER_HINT.search(desc):
        return "localizer"
    if not is_sagittal(series):
        return "not sagittal"
    if (series.inversion_time or 0) > 0 or "IR" in series.scanning_sequence or INVERSION_HINT.search(desc):
        return "inversion recovery (STIR/FLAIR)"
    if series.contrast_agent or CONTRAST_HINT.search(desc):
        return "post-contrast"
    if "DERIVED" in series.image_type[:1]:
        return "derived image"
    return ""


def weighting(series: Series) -> str | None:
    """'T1', 'T2' or None, from TR/TE (T1W TR≈400–800/TE≈8–20; T2W TR≈2500–4000/TE≈80–120), else the description."""
    tr, te = series.repetition_time, series.echo_time
    if tr is not None and te is not None:
        if tr < 1200 and te < 40:
            return "T1"
        if tr >= 1500 and te >= 60:
            return "T2"
        return None
    desc = series.description.lower()
    if re.search(r"t1", desc) and not re.search(r"t2", desc):
        return "T1"
    if re.search(r"t2", desc) and not re.search(r"t1", desc):
        return "T2"
    return None


def fat_saturated(series: Series) -> bool:
    return any(o in ("FS", "SFS", "FSA", "FSS") for o in series.scan_options) or bool(
        FATSAT_HINT.search(series.description)
    )


def candidates(series_list: list[Series], role: str) -> list[Series]:
    """Usable series of that weighting; fat-saturated ones only where no plain one exists."""
    found = [s for s in series_list if not distractor_reason(s) and weighting(s) == role]
    plain = [s for s in found if not fat_saturated(s)]
    return plain or found


def _by_uid(series_list: list[Series], uid: str, what: str, line: int) -> Series:
    for s in series_list:
        if s.series_uid == uid:
            return s
    raise PatientSkipped(f"manifest line {line}: {what} {uid} not found among this patient's DICOM series")


def choose_t1(series_list: list[Series], sop_uid: str, instance: int | None, override: str, line: int) -> Series:
    """The T1W series holding the lesion slice."""
    if override:
        return _by_uid(series_list, override, "t1_series_uid", line)
    if sop_uid:
        holding = [s for s in series_list if any(f.sop_uid == sop_uid for f in s.frames)]
        if not holding:
            raise PatientSkipped(
                f"manifest line {line}: lesion slice not found (no DICOM file with lesion_sop_uid {sop_uid}; "
                "check the UID or that the T1W series was exported)"
            )
        return holding[0]
    found = candidates(series_list, "T1")
    if not found:
        kinds = sorted({distractor_reason(s) or (weighting(s) or "unknown weighting") for s in series_list})
        raise PatientSkipped(
            f"manifest line {line}: no sagittal T1W series (found: {', '.join(kinds) or 'no series'}); "
            "export it or set t1_series_uid"
        )
    if len(found) > 1:
        raise PatientSkipped(
            f"manifest line {line}: {len(found)} sagittal T1W series, cannot tell which holds lesion_instance "
            f"{instance}; set t1_series_uid or lesion_sop_uid"
        )
    return found[0]


def choose_t2(series_list: list[Series], t1: Series, lesion_lr: float, override: str, line: int) -> Series:
    """The sagittal T2W series of the same study (and frame of reference when several) nearest the lesion."""
    if override:
        return _by_uid(series_list, override, "t2_series_uid", line)
    found = [s for s in candidates(series_list, "T2") if s.study_uid == t1.study_uid]
    if not found:
        raise PatientSkipped(
            f"manifest line {line}: missing series: no sagittal T2W series in the lesion's study; "
            "export it or set t2_series_uid"
        )
    same_for = [s for s in found if t1.frame_of_reference and s.frame_of_reference == t1.frame_of_reference]
    found = same_for or found

    def distance(s: Series) -> float:
        return min(abs(lr_position(f.plane) - lesion_lr) for f in s.frames)

    return min(found, key=lambda s: (distance(s), s.series_uid))
