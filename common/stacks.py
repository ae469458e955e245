"""One patient's DICOM → the fixed 6-channel stack (DESIGN.md stack contract).

Channels T1[-1], T1[0], T1[+1], T2[-1], T2[0], T2[+1]; 0 is the lesion slice, ±1 its neighbours along the patient's
left–right axis (−1 towards the patient's right, i.e. lower patient x). Every channel is resampled once, bilinearly,
from its stored pixels onto one canonical grid on the lesion plane, and normalised with robust statistics of its
whole slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from common.acquisition import attributes_of
from common.dicom import Frame, Series, read_pixels
from common.errors import PatientSkipped
from common.geometry import CanonicalGrid, Plane, box_corners, grid_for_box, lr_position, resample
from common.manifest import ManifestRow
from common.quantiles import percentiles
from common.series import choose_t1, choose_t2

NEIGHBOUR_TOLERANCE = 0.25  # neighbours must lie one slice spacing ± 25% from the lesion slice
LOW_PCT, HIGH_PCT = 0.5, 99.5
OVERVIEW_PX = 256  # longer side of the QC overview (the whole lesion slice): enough to count vertebrae
# LPS patient axes: the letter each direction points to (DICOM PS3.3 C.7.6.1.1.1)
AXIS_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))


@dataclass(frozen=True)
class QCInfo:
    """What the QC page shows beside the stack (stays at the site, like the stack; no identifiers)."""

    overview: np.ndarray  # (H, W) uint8: the whole T1W lesion slice on the stack's in-plane axes, downsampled
    overview_box: tuple[float, float, float, float]  # the manifest box in overview pixels (x0, y0, x1, y1)
    overview_crop: tuple[float, float, float, float]  # the stack tiles' field of view in overview pixels
    letters: dict[str, str]  # patient direction at each edge of every tile: {"left", "right", "top", "bottom"}
    t1_description: str
    t2_description: str
    t1_spacing: tuple[float, float]  # PixelSpacing of the T1W lesion slice (between rows, between columns), mm
    t2_spacing: tuple[float, float]
    slice_spacing: float  # T1W slice spacing (median step between positions), mm
    tile_spacing: float  # stack pixel size, mm

    def to_json(self) -> dict:
        """Everything but the image, JSON-ready."""
        return {
            "overview_box": list(self.overview_box),
            "overview_crop": list(self.overview_crop),
            "letters": dict(self.letters),
            "t1_description": self.t1_description,
            "t2_description": self.t2_description,
            "t1_spacing": list(self.t1_spacing),
            "t2_spacing": list(self.t2_spacing),
            "slice_spacing": self.slice_spacing,
            "tile_spacing": self.tile_spacing,
        }


@dataclass(frozen=True)
class StackResult:
    stack: np.ndarray  # (6, S, S) float32
    box: tuple[float, float, float, float]  # the manifest box on the canonical grid, in output pixels
    frames: tuple[Frame, ...]  # the six frames used (for the cache fingerprint; stays at the site)
    qc: QCInfo | None = None
    attributes: dict[str, str] | None = None  # acquisition levels of the T1W/T2W series used (common/acquisition.py)


def direction_letters(direction: np.ndarray) -> str:
    """Patient-direction letters of a unit vector, strongest first (e.g. "P", or "PS" for an oblique one); a
    component under 0.25 (about 15° of tilt) is left out so that a slightly oblique sagittal still reads "P"."""
    order = np.argsort(-np.abs(direction))
    return "".join(AXIS_LETTERS[k][int(direction[k] > 0)] for k in order if abs(direction[k]) >= 0.25)


def edge_letters(u: np.ndarray, v: np.ndarray) -> dict[str, str]:
    """Letters for the edges of an image whose columns run along u and rows along v."""
    return {
        "left": direction_letters(-u),
        "right": direction_letters(u),
        "top": direction_letters(-v),
        "bottom": direction_letters(v),
    }


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
    lo, hi = percentiles(image, LOW_PCT, HIGH_PCT)  # np.percentile's values, several times faster
    if not np.isfinite(hi - lo) or hi - lo <= 1e-6:
        raise ValueError("flat image")
    return float(lo), float(hi)


def channel(
    frame: Frame, photometric: str, grid: CanonicalGrid, keep: list | None = None, points: np.ndarray | None = None
) -> np.ndarray:
    """One normalised channel on the grid; `keep` (a list) receives (pixels, lo, hi) for the QC overview. `points`:
    grid.points(), when the caller computed them once for all six channels."""
    pixels = read_pixels(frame, photometric)
    if pixels.shape != (frame.plane.rows, frame.plane.cols):
        raise ValueError("pixel matrix does not match Rows/Columns")
    lo, hi = normalise(pixels)
    out = resample(pixels, frame.plane, grid.points() if points is None else points, grid.spacing)
    if keep is not None:
        keep.append((pixels, lo, hi))
    return (out - lo) / (hi - lo)


def _grid_pixels(points: np.ndarray, origin: np.ndarray, u, v, spacing: float) -> tuple[float, float, float, float]:
    d = points - origin
    x, y = d @ u / spacing, d @ v / spacing
    return float(x.min()), float(y.min()), float(x.max()), float(y.max())


def _downsample(pixels: np.ndarray, plane: Plane, origin, u, v, spacing: float, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear samples on the grid origin + (col + ½)·spacing·u + (row + ½)·spacing·v, after a k×k block mean
    (k = the whole output/input spacing ratio): enough against aliasing for a picture, and as one affine map a
    fraction of the cost of `resample`'s point arrays and Gaussian over the whole slice."""
    k = int(spacing / min(plane.spacing))
    img = np.asarray(pixels, dtype=np.float32)
    position = plane.position
    step = np.array(plane.spacing, dtype=float)
    if k >= 2:
        r, c = img.shape[0] // k * k, img.shape[1] // k * k
        img = img[:r, :c].reshape(r // k, k, c // k, k).mean(axis=(1, 3))
        position = plane.to_patient((k - 1) / 2, (k - 1) / 2)  # block (0, 0)'s centre
        step = step * k
    # stored (row, col) = matrix @ (out row, out col) + offset
    axes = np.stack([plane.col_cosine / step[0], plane.row_cosine / step[1]])  # patient → stored (row, col)
    matrix = spacing * axes @ np.stack([v, u], axis=1)
    offset = axes @ (origin + 0.5 * spacing * (u + v) - position)
    return ndimage.affine_transform(img, matrix, offset, output_shape=shape, order=1, mode="constant", cval=0.0)


def overview(pixels: np.ndarray, lo: float, hi: float, plane: Plane, grid: CanonicalGrid, box) -> tuple:
    """The whole lesion slice resampled onto the stack's in-plane axes (so that it reads like the tiles: anterior
    left, superior up, whatever the stored orientation), longer side OVERVIEW_PX; with the manifest box and the
    tiles' field of view in its pixels. Cheap next to the six channels: one more small resample of decoded pixels."""
    u, v = grid.u, grid.v
    r, c = plane.rows - 0.5, plane.cols - 0.5
    corners = plane.to_patient(np.array([-0.5, -0.5, r, r]), np.array([-0.5, c, -0.5, c]))
    pu, pv = corners @ u, corners @ v
    spacing = max(pu.max() - pu.min(), pv.max() - pv.min()) / OVERVIEW_PX
    w = max(1, round((pu.max() - pu.min()) / spacing))
    h = max(1, round((pv.max() - pv.min()) / spacing))
    # the grid's centre lies on the lesion plane: offsets along u and v from it stay in the plane
    centre_u, centre_v = grid.center @ u, grid.center @ v
    origin = grid.center + (pu.min() - centre_u) * u + (pv.min() - centre_v) * v
    img = (_downsample(pixels, plane, origin, u, v, spacing, (h, w)) - lo) / (hi - lo)
    image = (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    half = grid.side_mm / 2
    crop = grid.center + np.array([[-half, -half], [half, half]]) @ np.stack([u, v])
    return (
        image,
        _grid_pixels(box_corners(plane, box), origin, u, v, spacing),
        _grid_pixels(crop, origin, u, v, spacing),
    )


def study_series(row: ManifestRow, series_list: list[Series]) -> list[Series]:
    """The series the T1W/T2W are chosen from: the row's study_uid, else all, unless several studies leave the choice
    open (client/pacs.py chooses what to fetch with this, common.series and find_lesion: one set of rules)."""
    line = row.line
    if row.study_uid:
        series_list = [s for s in series_list if s.study_uid == row.study_uid]
        if not series_list:
            raise PatientSkipped(f"manifest line {line}: no DICOM for study_uid {row.study_uid}")
    elif not row.lesion_sop_uid and not row.t1_series_uid and len({s.study_uid for s in series_list}) > 1:
        raise PatientSkipped(f"manifest line {line}: the patient has several studies; set study_uid or lesion_sop_uid")
    return series_list


def build_stack(row: ManifestRow, series_list: list[Series], size: int, margin: float) -> StackResult:
    """Build one patient's stack or raise PatientSkipped with a reason naming the manifest line."""
    line = row.line
    series_list = study_series(row, series_list)
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
    points = grid.points()  # the same for all six channels
    channels, kept = [], []
    for frames_, series in ((t1_frames, t1), (t2_frames, t2)):
        for f in frames_:
            try:
                channels.append(channel(f, series.photometric, grid, kept if f is lesion else None, points))
            except Exception as exc:  # decoding problems of one file skip this patient only
                kind = "T1W" if series is t1 else "T2W"
                raise PatientSkipped(
                    f"manifest line {line}: pixel data of a {kind} slice cannot be decoded "
                    f"({exc.__class__.__name__}: {exc}); re-export the series"  # whole: the cause is often last
                ) from None
    stack = np.stack(channels).astype(np.float32)
    if not np.all(np.isfinite(stack)):
        raise PatientSkipped(f"manifest line {line}: the stack holds non-finite values (corrupt pixel data)")
    box = grid.box_pixels(box_corners(lesion.plane, row.box))
    image, ov_box, ov_crop = overview(*kept[0], lesion.plane, grid, row.box)
    qc = QCInfo(
        overview=image,
        overview_box=ov_box,
        overview_crop=ov_crop,
        letters=edge_letters(grid.u, grid.v),
        t1_description=t1.description,
        t2_description=t2.description,
        t1_spacing=tuple(float(x) for x in lesion.plane.spacing),
        t2_spacing=tuple(float(x) for x in t2_frames[1].plane.spacing),
        slice_spacing=spacing,
        tile_spacing=grid.spacing,
    )
    return StackResult(stack, box, tuple(t1_frames + t2_frames), qc, attributes_of(t1, t2))
