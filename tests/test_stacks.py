"""The stack contract (DESIGN.md): canonical geometry whatever the storage, neighbours by position, T2 through
patient coordinates, distractors never picked, bad geometry skipped with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from dicomfactory import SPACING, Variant, expected_channel, t1_anatomy, t2_anatomy, write_patient
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from common.dicom import scan_tree
from common.errors import PatientSkipped
from common.geometry import grid_for_box
from common.manifest import ManifestRow
from common.series import choose_t1
from common.stacks import build_stack, find_lesion

SIZE, MARGIN = 48, 0.5


def build(tmp_path, variant=Variant(), **kw):
    row = write_patient(tmp_path, "P1", variant, **kw)
    scan = scan_tree(tmp_path)
    mrow = ManifestRow(
        line=2,
        patient_id="P1",
        label=0,
        lesion_sop_uid=row.get("lesion_sop_uid", ""),
        lesion_instance=row.get("lesion_instance"),
        box=(row["x0"], row["y0"], row["x1"], row["y1"]),
    )
    return build_stack(mrow, scan.series["P1"], SIZE, MARGIN), mrow, scan


def corr(a, b) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def canonical(tmp_path_factory):
    return build(tmp_path_factory.mktemp("canonical"))


def test_canonical_stack_matches_the_anatomy(canonical):
    result, mrow, scan = canonical
    t1 = choose_t1(scan.series["P1"], mrow.lesion_sop_uid, None, "", 2)
    grid = grid_for_box(find_lesion(t1, mrow).plane, mrow.box, SIZE, MARGIN)
    assert result.stack.shape == (6, SIZE, SIZE) and result.stack.dtype == np.float32
    for c, (fn, dx) in enumerate(
        [
            (t1_anatomy, -SPACING),
            (t1_anatomy, 0),
            (t1_anatomy, SPACING),
            (t2_anatomy, -SPACING),
            (t2_anatomy, 0),
            (t2_anatomy, SPACING),
        ]
    ):
        assert corr(result.stack[c], expected_channel(fn, grid, dx)) > 0.98, f"channel {c}"


def test_canonical_orientation_and_neighbour_order(canonical):
    stack = canonical[0].stack
    half = SIZE // 2
    # anterior-superior marker: columns run anterior→posterior, rows superior→inferior → upper-left quadrant
    quadrants = [
        stack[1, :half, :half].max(),
        stack[1, :half, half:].max(),
        stack[1, half:, :half].max(),
        stack[1, half:, half:].max(),
    ]
    assert int(np.argmax(quadrants)) == 0
    # the marker one slice to the patient's left (+x) shows in T1[+1] only
    centre = (slice(half - 6, half + 6), slice(half, half + 12))
    assert stack[2][centre].max() > stack[1][centre].max() + 0.3
    assert stack[2][centre].max() > stack[0][centre].max() + 0.3
    # the box maps back onto the middle of the canonical grid
    x0, y0, x1, y1 = canonical[0].box
    assert abs((x0 + x1) / 2 - half) < 1 and abs((y0 + y1) / 2 - half) < 1


@pytest.mark.parametrize(
    "variant",
    [
        Variant(mirrored=True, t2_mirrored=True),
        Variant(flipped_normal=True),
        Variant(mirrored=True, flipped_normal=True),
        Variant(transposed=True),
        Variant(descending=True),
        Variant(reversed_instances=True),
        Variant(multiframe=True),
        Variant(monochrome1=True, slope=2.0, intercept=-100.0),
    ],
    ids=[
        "mirrored",
        "opposite-normal",
        "rotated-180",
        "transposed",
        "descending",
        "instances-reversed",
        "enhanced-multiframe",
        "monochrome1-rescaled",
    ],
)
def test_stored_variants_give_the_canonical_stack(tmp_path, canonical, variant):
    result, _, _ = build(tmp_path, variant)
    for c in range(6):
        assert corr(result.stack[c], canonical[0].stack[c]) > 0.98, f"channel {c}"
    np.testing.assert_allclose(result.stack, canonical[0].stack, atol=0.08)


def test_lesion_by_instance_number_uses_instance_not_position(tmp_path, canonical):
    result, _, _ = build(tmp_path, Variant(reversed_instances=True), use_instance=True)
    np.testing.assert_allclose(result.stack, canonical[0].stack, atol=0.08)


def test_t2_on_another_grid_lands_on_the_t1_anatomy(tmp_path):
    variant = Variant(t2_matrix=96, t2_fov=200.0, t2_offset=(1.5, 7.0, -9.0), t2_slices=7, t2_mirrored=True)
    result, mrow, scan = build(tmp_path, variant)
    t1 = choose_t1(scan.series["P1"], mrow.lesion_sop_uid, None, "", 2)
    grid = grid_for_box(find_lesion(t1, mrow).plane, mrow.box, SIZE, MARGIN)
    for c, dx in zip((3, 4, 5), (-SPACING, 0, SPACING)):
        # each T2 slice lies 1.5 mm to the left of its T1 slice: the expected image is the anatomy there
        assert corr(result.stack[c], expected_channel(t2_anatomy, grid, dx + 1.5)) > 0.98


def test_t2_farther_than_half_a_spacing_is_skipped(tmp_path):
    with pytest.raises(PatientSkipped, match="half a slice spacing"):
        build(tmp_path, Variant(t2_slices=3, t2_offset=(20.0, 0.0, 0.0)))


@pytest.mark.parametrize(
    ("variant", "match"),
    [
        (Variant(drop_t1_slices=(3,)), r"no left \(\+1\) neighbour"),
        (Variant(drop_t1_slices=(5,)), r"no right \(−1\) neighbour"),
        (Variant(drop_t1_slices=(5, 6, 7, 8)), "edge of the T1W volume"),
        (Variant(no_t2=True, extra_series=["stir"]), "missing series"),
    ],
    ids=["gap-left", "gap-right", "edge", "only-stir"],
)
def test_bad_geometry_is_skipped_with_a_reason(tmp_path, variant, match):
    with pytest.raises(PatientSkipped, match=match):
        build(tmp_path, variant)


def test_distractor_series_are_never_picked(tmp_path, canonical):
    result, _, _ = build(tmp_path, Variant(extra_series=["localizer", "stir", "t1c", "axial"]), use_instance=True)
    np.testing.assert_allclose(result.stack, canonical[0].stack, atol=1e-5)


def test_two_plain_t1_series_need_a_choice(tmp_path):
    with pytest.raises(PatientSkipped, match="set t1_series_uid"):
        build(tmp_path, Variant(extra_series=["t1_other"]), use_instance=True)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_transfer_syntaxes_decode_to_the_same_stack(tmp_path, canonical, syntax):
    result, _, _ = build(tmp_path, Variant(transfer_syntax=syntax))
    np.testing.assert_allclose(result.stack, canonical[0].stack, atol=1e-4)


def test_jpeg_baseline_decodes_close_to_the_original(tmp_path, canonical):
    result, _, _ = build(tmp_path, Variant(transfer_syntax=JPEGBaseline8Bit, slope=12.0))
    for c in range(6):
        assert corr(result.stack[c], canonical[0].stack[c]) > 0.98


def test_resample_gives_the_plain_formulas_values_bit_for_bit():
    """resample reuses one grid's stored indices for parallel slices offset along an axis the plane ignores
    (exactly sagittal slices stepping in x): its values stay those of the plain formula (every point's to_pixel,
    then map_coordinates) bit for bit, for such slices, for oblique ones, and after the grid changes."""
    from scipy import ndimage

    from common.geometry import Plane, resample, unit

    rng = np.random.default_rng(3)
    image = (rng.random((60, 50)) * 1000).astype(np.float32)
    sagittal = (np.array([0.0, 1, 0]), np.array([0.0, 0, -1]))
    oblique = (unit([0.05, 0.99, 0.1]), unit(np.cross([0.05, 0.99, 0.1], [1.0, 0, 0])))
    for points in ((rng.random((40, 40, 3)) - 0.5) * 40, (rng.random((40, 40, 3)) - 0.5) * 40):
        for row_cosine, col_cosine in (sagittal, oblique, sagittal):
            for x in (-4.0, 0.0, 4.0):  # three parallel slices
                plane = Plane(np.array([x, -12.5, 14.0]), row_cosine, col_cosine, (0.9, 0.8), 60, 50)
                row, col = plane.to_pixel(points)
                got = resample(image * (1 + x), plane, points, 0.5)  # other pixels per slice, as in a series
                want = ndimage.map_coordinates(
                    image * (1 + x), [row.ravel(), col.ravel()], order=1, mode="constant", cval=0.0
                )
                assert got.dtype == np.float32 and got.tobytes() == want.reshape(40, 40).tobytes()
