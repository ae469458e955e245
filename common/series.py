"""Which series of a patient is the sagittal T1W and which the sagittal T2W.

Decided from tags: orientation, TR/TE, inversion (STIR/FLAIR), contrast agent, localizer image type, fat
saturation; SeriesDescription is only a hint where TR/TE are absent, and to recognise distractors. A lesion slice
named by the manifest (lesion_sop_uid) must lie in a series that passes the same checks as automatic selection; a
series the manifest names (t1_series_uid, t2_series_uid) waives the weighting checks but must still be sagittal, as
the stack is built on sagittal slices. A series holding two different files with one SOP Instance UID is never used.
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


def orientation(series: Series) -> str:
    """'sagittal', 'coronal' or 'axial' when every frame lies within 30° of that plane, else 'oblique'."""
    if not series.frames:
        return "empty"
    normals = np.abs(np.array([f.plane.normal for f in series.frames]))
    for axis, name in enumerate(("sagittal", "coronal", "axial")):  # LPS: x left-right, y front-back, z up-down
        if np.all(normals[:, axis] >= SAGITTAL_MIN_COS):
            return name
    return "oblique"


def describe(series: Series) -> str:
    """What a series is, in a reason's words: 'an axial T2W series', 'a sagittal STIR/FLAIR T2W series', ..."""
    if series.modality and series.modality.upper() != "MR":
        text = f"{series.modality} series"
    else:
        kind = distractor_reason(series)
        extra = {"localizer": "localizer ", "post-contrast": "post-contrast ", "derived image": "derived "}.get(
            kind, ""
        )
        if kind.startswith("inversion"):
            extra = "STIR/FLAIR "
        w = weighting(series)
        text = f"{orientation(series)} {extra}{w + 'W' if w else ''} series".replace("  ", " ")
        if not w:
            tr, te = series.repetition_time, series.echo_time
            timing = f", TR {tr:g} ms, TE {te:g} ms" if tr is not None and te is not None else ""
            text += f" of unknown weighting{timing}"
    if series.description:
        text += f" ('{series.description}')"
    return ("an " if text[0].lower() in "aeiou" else "a ") + text


def _refuse_conflicts(series: Series, role: str, line: int) -> Series:
    if series.conflicts:
        (a, b), more = series.conflicts[0], len(series.conflicts) - 1
        raise PatientSkipped(
            f"manifest line {line}: the {role} series holds two different files with one SOP Instance UID "
            f"({a} and {b}{f'; and {more} more pair(s)' if more else ''}); remove the wrong one (a re-export of "
            "changed images?) and run prepare again"
        )
    return series


def _require_sagittal(series: Series, column: str, role: str, line: int) -> Series:
    if not is_sagittal(series):
        raise PatientSkipped(
            f"manifest line {line}: {column} names {describe(series)}; the {role} input must be a sagittal series"
        )
    return _refuse_conflicts(series, role, line)


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
    """Fat suppression from ScanOptions (FS, SFS...), Enhanced MR's SpectrallySelectedSuppression, or the
    description (SPAIR, SPIR, fat sat, Dixon)."""
    return (
        any(o in ("FS", "SFS", "FSA", "FSS") for o in series.scan_options)
        or series.fat_suppression in ("FAT", "FAT_AND_WATER")
        or bool(FATSAT_HINT.search(series.description))
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
    if override:  # the site named the series: its weighting is the site's call, its orientation is not
        return _require_sagittal(_by_uid(series_list, override, "t1_series_uid", line), "t1_series_uid", "T1W", line)
    if sop_uid:
        holding = [s for s in series_list if any(f.sop_uid == sop_uid for f in s.frames)]
        if not holding:
            raise PatientSkipped(
                f"manifest line {line}: lesion slice not found (no DICOM file with lesion_sop_uid {sop_uid}; "
                "check the UID or that the T1W series was exported)"
            )
        for s in holding:
            _refuse_conflicts(s, "T1W", line)
        t1 = holding[0]
        if distractor_reason(t1) or weighting(t1) != "T1":  # the same checks as automatic selection
            hint = (
                "set t1_series_uid to this series to use it anyway"
                if is_sagittal(t1)
                else "it must name a slice of the sagittal T1W series"
            )
            raise PatientSkipped(
                f"manifest line {line}: lesion slice is in {describe(t1)}, not a sagittal T1W series; check "
                f"lesion_sop_uid ({hint})"
            )
        return t1
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
    return _refuse_conflicts(found[0], "T1W", line)


def choose_t2(series_list: list[Series], t1: Series, lesion_lr: float, override: str, line: int) -> Series:
    """The sagittal T2W series of the same study (and frame of reference when several) nearest the lesion."""
    if override:
        t2 = _by_uid(series_list, override, "t2_series_uid", line)
        if t2.series_uid == t1.series_uid:
            raise PatientSkipped(f"manifest line {line}: t2_series_uid names the T1W series; name the sagittal T2W one")
        return _require_sagittal(t2, "t2_series_uid", "T2W", line)
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

    return _refuse_conflicts(min(found, key=lambda s: (distance(s), s.series_uid)), "T2W", line)
