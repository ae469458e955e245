"""Patient-coordinate geometry of MR slices and resampling onto the canonical sagittal grid.

DICOM patient coordinates are LPS: +x towards the patient's left, +y posterior, +z superior (head).
The canonical sagittal grid (DESIGN.md stack contract): columns run anterior → posterior (+y), rows run
superior → inferior (−z), whatever orientation the vendor stored; slices are ordered by ascending patient x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# In-plane directions the canonical grid aims for.
ANTERIOR_TO_POSTERIOR = np.array([0.0, 1.0, 0.0])
SUPERIOR_TO_INFERIOR = np.array([0.0, 0.0, -1.0])
LEFT_RIGHT = np.array([1.0, 0.0, 0.0])


@dataclass(frozen=True)
class Plane:
    """Geometry of one stored 2-D image (a slice or one frame)."""

    position: np.ndarray  # ImagePositionPatient: centre of the first (top-left) pixel, mm
    row_cosine: np.ndarray  # direction of increasing column index
    col_cosine: np.ndarray  # direction of increasing row index
    spacing: tuple[float, float]  # (between rows, between columns) mm, as DICOM PixelSpacing
    rows: int
    cols: int
    normal: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        n = np.cross(self.row_cosine, self.col_cosine)
        object.__setattr__(self, "normal", n / np.linalg.norm(n))  # cached: asked for many times per slice

    def to_pixel(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patient points (..., 3) → fractional (row, col) indices in this image (projected onto its plane)."""
        d = points - self.position
        col = d @ self.row_cosine / self.spacing[1]
        row = d @ self.col_cosine / self.spacing[0]
        return row, col

    def to_patient(self, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """Fractional (row, col) indices → patient points (..., 3)."""
        row = np.asarray(row, dtype=float)[..., None]
        col = np.asarray(col, dtype=float)[..., None]
        return self.position + col * self.spacing[1] * self.row_cosine + row * self.spacing[0] * self.col_cosine


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n < 1e-6:
        raise ValueError("degenerate direction vector")
    return v / n


def canonical_axes(plane: Plane) -> tuple[np.ndarray, np.ndarray]:
    """In-plane unit vectors (u, v): u closest to anterior→posterior, v closest to superior→inferior.

    Taking both in the stored plane makes mirrored, flipped, transposed or slightly oblique series land on the
    same canonical grid, while never leaving the acquired plane.
    """
    n = plane.normal
    u = ANTERIOR_TO_POSTERIOR - (ANTERIOR_TO_POSTERIOR @ n) * n
    u = unit(u)
    v = np.cross(n, u)
    if v @ SUPERIOR_TO_INFERIOR < 0:
        v = -v
    return u, v


def lr_position(plane: Plane) -> float:
    """Position of a plane along the patient's left–right axis: its centre point projected on the normal, oriented
    so that larger means further towards the patient's left (+x). Never the series' own normal sign."""
    n = plane.normal
    sign = 1.0 if n @ LEFT_RIGHT >= 0 else -1.0
    return float(sign * (plane.position @ n))


@dataclass(frozen=True)
class CanonicalGrid:
    """An S×S square grid of patient points on the lesion plane, centred on the box."""

    center: np.ndarray
    u: np.ndarray  # column direction (anterior → posterior)
    v: np.ndarray  # row direction (superior → inferior)
    side_mm: float
    size: int

    @property
    def spacing(self) -> float:
        return self.side_mm / self.size

    def points(self, offset: np.ndarray | None = None) -> np.ndarray:
        """(S, S, 3) patient points of the grid's pixel centres, optionally shifted (e.g. to a neighbour plane)."""
        t = (np.arange(self.size) + 0.5) * self.spacing - self.side_mm / 2
        pts = self.center + t[None, :, None] * self.u + t[:, None, None] * self.v
        return pts if offset is None else pts + offset

    def box_pixels(self, corners: np.ndarray) -> tuple[float, float, float, float]:
        """Patient-space corner points (k, 3) → their bounding box (x0, y0, x1, y1) in grid pixels."""
        d = corners - self.center
        x = d @ self.u / self.spacing + self.size / 2
        y = d @ self.v / self.spacing + self.size / 2
        return float(x.min()), float(y.min()), float(x.max()), float(y.max())


def grid_for_box(plane: Plane, box: tuple[int, int, int, int], size: int, margin: float) -> CanonicalGrid:
    """Square crop in millimetres centred on the box (x0, y0, x1, y1 in stored pixels, x1/y1 exclusive);
    side = the box's longer side in mm × (1 + 2·margin)."""
    x0, y0, x1, y1 = box
    width_mm = (x1 - x0) * plane.spacing[1]
    height_mm = (y1 - y0) * plane.spacing[0]
    # Pixel (r, c) covers [r-0.5, r+0.5]: the box's centre in index coordinates is ((x0+x1-1)/2, (y0+y1-1)/2).
    center = plane.to_patient((y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2)
    u, v = canonical_axes(plane)
    side = max(width_mm, height_mm) * (1 + 2 * margin)
    return CanonicalGrid(center=center, u=u, v=v, side_mm=side, size=size)


def box_corners(plane: Plane, box: tuple[int, int, int, int]) -> np.ndarray:
    """The four outer corners of a stored-pixel box, in patient coordinates."""
    x0, y0, x1, y1 = box
    rows = np.array([y0, y0, y1, y1], dtype=float) - 0.5
    cols = np.array([x0, x1, x0, x1], dtype=float) - 0.5
    return plane.to_patient(rows, cols)


def resample(image: np.ndarray, plane: Plane, points: np.ndarray, out_spacing: float) -> np.ndarray:
    """Sample `image` (stored on `plane`) at patient `points` (S, S, 3), bilinear, once.

    When the output is coarser than the input, the input is low-pass filtered first (Gaussian, σ from the
    spacing ratio) so that small images do not alias. Points outside the image read 0 (air).
    """
    img = np.asarray(image, dtype=np.float32)
    sigma = [max(0.0, (out_spacing / s - 1.0) / 2.0) for s in plane.spacing]
    if max(sigma) > 0.05:
        img = ndimage.gaussian_filter(img, sigma=sigma, mode="nearest")
    # float32 in, float32 out: the (S, S) result is map_coordinates' own array, no copy
    return ndimage.map_coordinates(img, _indices(plane, points), order=1, mode="constant", cval=0.0)


# (the last grid, its stored indices by plane): see _indices. Holds the grid itself, so that `is` compares a live
# object; replaced whole (one rebinding), so that a thread with another grid never writes into this grid's table.
_last_grid: tuple[np.ndarray | None, dict] = (None, {})


def _indices(plane: Plane, points: np.ndarray) -> np.ndarray:
    """(2, S, S) fractional (row, col) indices of `points` in `plane`'s image: `Plane.to_pixel`'s values, bit for bit,
    written straight into the array map_coordinates takes (no list of two arrays stacked into a third).

    Parallel slices of one series whose positions differ only along an axis that neither in-plane direction has a
    component on (an exactly sagittal series steps in x; its cosines have x = 0) have identical indices: the terms
    that differ are multiplied by an exact 0. They are computed once per grid (`points`, not modified by callers)
    and reused for the other slices, and for a second series of the same in-plane geometry.
    """
    used = (plane.row_cosine != 0) | (plane.col_cosine != 0)
    key = (
        plane.row_cosine.tobytes(),
        plane.col_cosine.tobytes(),
        tuple(plane.spacing),
        used.tobytes(),
        plane.position[used].tobytes(),
        bool(np.isfinite(plane.position).all()),  # inf × 0 is not 0
    )
    global _last_grid
    grid = _last_grid
    if grid[0] is not points:
        grid = _last_grid = (points, {})
    cached = grid[1].get(key)
    if cached is not None:
        return cached
    out = np.empty((2, *points.shape[:-1]))
    d = points - plane.position
    np.matmul(d, plane.col_cosine, out=out[0])  # as to_pixel: d @ col_cosine / spacing between rows
    np.matmul(d, plane.row_cosine, out=out[1])
    out[0] /= plane.spacing[0]
    out[1] /= plane.spacing[1]
    out.flags.writeable = False  # shared between calls
    grid[1][key] = out
    return out
