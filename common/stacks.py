"""One patient's DICOM → the fixed 6-channel stack (DESIGN.md stack contract).

Channels T1[-1], T1[0], T1[+1], T2[-1], T2[0], T2[+1]; 0 is the lesion slice, ±1 its neighbours along the patient's
left–right axis (−1 towards the patient's right, i.e. lower patient x). Every channel is resampled once, bilinearly,
from its stored pixels onto one canonical grid on the lesion plane, and normalised with robust statistics of its
whole slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.dicom import Frame, Series, read_pixels
from common.errors import PatientSkipped
from common.geometry import CanonicalGrid, box_corners, grid_for_box, lr_position, resample
from common.manifest import ManifestRow
from common.series import choose_t1, choose_t2

NEIGHBOUR_TOLERANCE = 0.25  # neighbours must lie one slice spacing ± 25% from the lesion slice
LOW_PCT, HIGH_PCT = 0.5, 99.5


@dataclass(frozen=True)
class StackResult:
    stack: np.ndarray  # (6, S, S) float32
    box: tuple[float, float, float, float]  # the manifest box on the canonical grid, in output pixels
    frames: tuple[Frame, ...]  # the six frames used (for the cache fingerprint; stays at the site)


def ordered(series: Series, line: int, what: str) -> tuple[list[Frame], np.ndarray, float]:
    """Frames sorted by left–right position, their positions, and the series' slice spacing (median step)."""
    frames = sorted(series.frames, key=lambda f: (lr_position(f.plane), f.sop_uid, f.frame or 0))
    pos = np.array([lr_position(f.plane) for f in frames])
    steps = np.diff(pos)
    if len(frames) < 3:
        raise PatientSkipped(f"manifest line {line}: the {what} series has {len(frames)} slice(s); 3 are needed")
    positive = steps[steps > 1e-3]
    if len(positive) == 0:
        raise PatientSkipped(f"manifest line {line}: the {what} series has all slices at one position")
    return frames, pos, float(np.median(positive))


def find_lesion(t1: Series, row: ManifestRow) -> Frame:
    if row.lesion_sop_uid:
        hits = [f for f in t1.frames if f.sop_uid == row.lesion_sop_uid]
        if len(hits) > 1:  # multi-frame: lesion_instance names the frame
            hits = [f for f in hits if f.frame == row.lesion_instance]
            if not hits:
                raise PatientSkipped(
                    f"manifest line {row.line}: lesion_sop_uid is a multi-frame file; lesion_instance must give the "
                    f"1-based frame number (got {row.lesion_instance})"
                )
        if hits:
            return hits[0]
        raise PatientSkipped(f"manifest line {row.line}: lesion slice not found (lesion_sop_uid not in the T1W series)")
    hits = [f for f in t1.frames if (f.frame if f.frame is not None else f.instance_number) == row.lesion_instance]
    if not hits:
        raise PatientSkipped(
            f"manifest line {row.line}: lesion slice not found (no instance/frame {row.lesion_instance} in the "
            "sagittal T1W series)"
        )
    if len(hits) > 1:
        raise PatientSkipped(
            f"manifest line {row.line}: instance {row.lesion_instance} occurs {len(hits)} times in the T1W series; "
            "give lesion_sop_uid instead"
        )
    return hits[0]


def neighbours(frames: list[Frame], pos: np.ndarray, spacing: float, lesion: Frame, line: int) -> list[Frame]:
    """[−1, 0, +1] frames: the adjacent slices at one spacing ± 25%; never replicated, never a farther slice."""
    i = next(k for k, f in enumerate(frames) if f is lesion)
    near = np.abs(pos - pos[i]) < 1e-3 * spacing
    if near.sum() > 1:
        raise PatientSkipped(f"manifest line {line}: two T1W slices share the lesion slice's position")
    out = []
    for side, k in (("right (−1)", i - 1), ("left (+1)", i + 1)):
        if k < 0 or k >= len(frames):
            raise PatientSkipped(
                f"manifest line {line}: lesion slice is on the edge of the T1W volume; no {side} neighbour"
            )
        gap = abs(pos[k] - pos[i])
        if abs(gap - spacing) > NEIGHBOUR_TOLERANCE * spacing:
            raise PatientSkipped(
                f"manifest line {line}: no {side} neighbour at one slice spacing ({spacing:.1f} mm ± 25%; nearest is "
                f"{gap:.1f} mm away: a missing slice?)"
            )
        out.append(frames[k])
    return [out[0], lesion, out[1]]


def nearest_t2(t2_frames: list[Frame], t2_pos: np.ndarray, target: float, spacing: float, line: int) -> Frame:
    k = int(np.argmin(np.abs(t2_pos - target)))
    if abs(t2_pos[k] - target) > spacing / 2:
        raise PatientSkipped(
            f"manifest line {line}: no T2W slice within half a slice spacing of a T1W slice (nearest "
            f"{abs(t2_pos[k] - target):.1f} mm away); the T2W series does not cover the lesion"
        )
    return t2_frames[k]


def normalise(image: np.ndarray) -> tuple[float, float]:
    """Robust intensity range of a whole slice (not only the crop, so diffuse marrow change survives)."""
    lo, hi = np.percentile(image, [LOW_PCT, HIGH_PCT])
    if not np.isfinite(hi - lo) or hi - lo <= 1e-6:
        raise ValueError("flat image")
    return float(lo), float(hi)


def channel(frame: Frame, photometric: str, grid: CanonicalGrid) -> np.ndarray:
    pixels = read_pixels(frame, photometric)
    if pixels.shape != (frame.plane.rows, frame.plane.cols):
        raise ValueError("pixel matrix does not match Rows/Columns")
    lo, hi = normalise(pixels)
    out = resample(pixels, frame.plane, grid.points(), grid.spacing)
    return (out - lo) / (hi - lo)


def build_stack(row: ManifestRow, series_list: list[Series], size: int, margin: float) -> StackResult:
    """Build one patient's stack or raise PatientSkipped with a reason naming the manifest line."""
    line = row.line
    if row.study_uid:
        series_list = [s for s in series_list if s.study_uid == row.study_uid]
        if not series_list:
            raise PatientSkipped(f"manifest line {line}: no DICOM for study_uid {row.study_uid}")
    elif not row.lesion_sop_uid and not row.t1_series_uid and len({s.study_uid for s in series_list}) > 1:
        raise PatientSkipped(f"manifest line {line}: the patient has several studies; set study_uid or lesion_sop_uid")
    t1 = choose_t1(series_list, row.lesion_sop_uid, row.lesion_instance, row.t1_series_uid, line)
    lesion = find_lesion(t1, row)
    x0, y0, x1, y1 = row.box
    if x1 > lesion.plane.cols or y1 > lesion.plane.rows:
        raise PatientSkipped(
            f"manifest line {line}: box ({x0},{y0})-({x1},{y1}) lies outside the {lesion.plane.cols}×"
            f"{lesion.plane.rows} lesion image (x is the column, y the row)"
        )
    frames, pos, spacing = ordered(t1, line, "T1W")
    t1_frames = neighbours(frames, pos, spacing, lesion, line)
    t2 = choose_t2(series_list, t1, lr_position(lesion.plane), row.t2_series_uid, line)
    t2_sorted, t2_pos, _ = ordered(t2, line, "T2W")
    t2_frames = [nearest_t2(t2_sorted, t2_pos, lr_position(f.plane), spacing, line) for f in t1_frames]

    grid = grid_for_box(lesion.plane, row.box, size, margin)
    channels = []
    for frames_, series in ((t1_frames, t1), (t2_frames, t2)):
        for f in frames_:
            try:
                channels.append(channel(f, series.photometric, grid))
            except Exception as exc:  # decoding problems of one file skip this patient only
                kind = "T1W" if series is t1 else "T2W"
                raise PatientSkipped(
                    f"manifest line {line}: pixel data of a {kind} slice cannot be decoded "
                    f"({exc.__class__.__name__}: {str(exc)[:80]}); re-export the series"
                ) from None
    stack = np.stack(channels).astype(np.float32)
    if not np.all(np.isfinite(stack)):
        raise PatientSkipped(f"manifest line {line}: the stack holds non-finite values (corrupt pixel data)")
    box = grid.box_pixels(box_corners(lesion.plane, row.box))
    return StackResult(stack, box, tuple(t1_frames + t2_frames))
