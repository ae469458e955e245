"""Ten virtual hospital profiles that differ the way real sites do, plus the generic sites of the "public" cohort.

Differences: vendor and model names, 1.5/3 T, TR/TE (within DESIGN.md's ranges), matrix and pixel spacing, slice
thickness and gap, noise, coil bias field, stored intensity scale (RescaleSlope/Intercept, bits), orientation
conventions, InstanceNumber order, transfer syntax, Enhanced MR multi-frame, MONOCHROME1, distractor series, folder
layout and file naming, which manifest column names the lesion slice, and malignant prevalence and size.
site07 differs strongly (3 T oncology centre: short-TR T1, fat-suppressed long-TE T2, high malignant prevalence) so
that site-held-out validation has something real to find. site04 (Canon 1.5 T, 4 mm slices, ordinary prevalence) also
fat-suppresses its T2W (chemical-shift fat saturation, "FatSat"): fat suppression is then carried by two sites that
differ in vendor, field strength, slice thickness and case mix, so that a drop that follows fat suppression can be
told from a drop that follows site07 (#24). Every other site's T2W is plain fast spin echo.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGExtended12Bit, JPEGLSLossless, RLELossless


@dataclass(frozen=True)
class SiteProfile:
    name: str
    n_patients: int
    n_malignant: int
    manufacturer: str
    model: str
    field_strength: float
    t1: tuple[float, float]  # TR, TE (ms)
    t2: tuple[float, float]
    t1_desc: str
    t2_desc: str
    matrix: int = 320
    t2_matrix: int | None = None  # None: same as T1
    fov: float = 280.0
    n_slices: int = 13
    spacing: float = 4.4  # slice centre to centre
    thickness: float = 4.0
    orientation: dict = field(default_factory=dict)  # SliceGeometry.sagittal flags
    reverse_instances: bool = False  # InstanceNumber runs against position
    t2_offset: float = 0.0  # T2 slab shifted by this fraction of the spacing
    t2_extra_slices: int = 0
    t2_fat_sat: bool = False
    transfer_syntax: str = ExplicitVRLittleEndian
    multiframe: bool = False
    monochrome1: bool = False
    bits: int = 16
    scale: float = 2000.0  # real-world value of a reference fat signal of 1.0
    slope: float = 1.0
    intercept: float = 0.0
    noise: float = 0.025  # Rician sigma relative to the fat signal on T1W
    bias: float = 120.0  # coil sensitivity fall-off length (mm) from the back
    distractors: tuple[str, ...] = ()  # "loc", "ax_t2", "stir", "t1c"
    layout: str = "pacs"  # pacs | cd | by_uid | flat
    file_names: str = "opaque"
    manifest_ref: str = "sop"  # sop | instance | both
    junk_files: bool = False
    patient_prefix: str = "P"
    fov_jitter: float = 25.0  # mm, position of the spine in the field of view
    contrast_agent: str = "GADOBUTROL 7.5 ML"


def _p(name, n, m, vendor, model, tesla, t1, t2, d1, d2, **kw) -> SiteProfile:
    return SiteProfile(name, n, m, vendor, model, tesla, t1, t2, d1, d2, **kw)


SITES: tuple[SiteProfile, ...] = (
    _p("site01", 34, 7, "SIEMENS", "Avanto", 1.5, (550, 11), (3200, 95), "t1_tse_sag", "t2_tse_sag",
       matrix=320, fov=280, n_slices=13, spacing=4.4, thickness=4.0, distractors=("loc", "ax_t2"),
       layout="pacs", patient_prefix="1000"),
    _p("site02", 28, 6, "GE MEDICAL SYSTEMS", "Signa HDxt", 1.5, (600, 9), (3000, 102), "SAG T1 FSE", "SAG T2 FRFSE",
       matrix=288, fov=270, n_slices=13, spacing=4.0, thickness=3.5, orientation={"mirrored": True},
       transfer_syntax=RLELossless, distractors=("loc", "stir"), layout="by_uid", file_names="uid",
       scale=1500, noise=0.03, patient_prefix="GE"),
    _p("site03", 25, 5, "Philips", "Ingenia", 3.0, (450, 8), (3800, 110), "T1W_TSE SAG", "T2W_TSE SAG",
       matrix=320, fov=250, n_slices=15, spacing=3.3, thickness=3.0, orientation={"flipped_normal": True},
       transfer_syntax=JPEGLSLossless, slope=1.8, scale=900, noise=0.018, distractors=("t1c",), layout="cd",
       manifest_ref="instance", patient_prefix="PH"),
    _p("site04", 22, 5, "CANON_MEC", "Vantage Orian", 1.5, (500, 12), (3500, 90), "Sag T1 FSE", "Sag T2 FSE FatSat",
       matrix=256, fov=230, n_slices=11, spacing=4.4, thickness=4.0, orientation={"descending": True}, t2_fat_sat=True,
       transfer_syntax=JPEG2000Lossless, scale=3000, noise=0.03, distractors=("ax_t2",), layout="pacs",
       junk_files=True, patient_prefix="C"),
    _p("site05", 20, 5, "SIEMENS", "Skyra", 3.0, (650, 10), (4000, 105), "t1_tse_sag", "t2_tse_sag",
       matrix=320, fov=250, n_slices=15, spacing=3.3, thickness=3.0, orientation={"tilt_deg": 4.0},
       multiframe=True, noise=0.018, distractors=("loc",), layout="by_uid", file_names="uid", manifest_ref="both",
       patient_prefix="SK"),
    _p("site06", 18, 4, "GE MEDICAL SYSTEMS", "Optima MR450w", 1.5, (520, 14), (2800, 85), "Sag T1", "Sag T2",
       matrix=256, fov=240, n_slices=11, spacing=4.5, thickness=4.0,
       orientation={"mirrored": True, "flipped_normal": True}, monochrome1=True, bits=12, scale=1200,
       noise=0.035, layout="flat", file_names="uid", patient_prefix="OP"),
    _p("site07", 16, 9, "Philips", "Achieva dStream", 3.0, (400, 8), (4200, 120), "T1W_TSE sag",
       "T2W_SPAIR sag", matrix=320, fov=240, n_slices=15, spacing=3.3, thickness=3.0, t2_fat_sat=True,
       orientation={"transposed": True}, slope=2.2, intercept=-50, scale=1600, noise=0.015, bias=80,
       distractors=("loc", "ax_t2", "stir", "t1c"), layout="cd", manifest_ref="instance", patient_prefix="ONC",
       fov_jitter=35.0),
    _p("site08", 13, 4, "SIEMENS", "Aera", 1.5, (580, 12), (3400, 98), "T1 TSE SAG", "T2 TSE SAG",
       matrix=288, fov=270, n_slices=13, spacing=4.0, thickness=3.5, orientation={"yaw_deg": 3.0},
       reverse_instances=True, transfer_syntax=RLELossless, distractors=("stir",), layout="flat", file_names="uid",
       patient_prefix="AE"),
    _p("site09", 8, 2, "CANON_MEC", "Vantage Titan", 1.5, (480, 15), (2600, 80), "Sag T1", "Sag T2",
       matrix=256, t2_matrix=320, fov=250, n_slices=11, spacing=4.4, thickness=4.0, t2_offset=0.3,
       t2_extra_slices=2, transfer_syntax=JPEGLSLossless, noise=0.045, bias=90, layout="pacs",
       manifest_ref="instance", junk_files=True, patient_prefix="T"),
    _p("site10", 6, 3, "GE MEDICAL SYSTEMS", "Signa Creator", 1.5, (500, 12), (3000, 100), "SAG T1", "SAG T2",
       matrix=256, fov=260, n_slices=11, spacing=4.4, thickness=4.0, transfer_syntax=JPEGExtended12Bit, bits=12,
       scale=1400, noise=0.05, bias=70, layout="cd", patient_prefix="R"),
)  # fmt: skip

PUBLIC_SITES: tuple[SiteProfile, ...] = (
    _p("public1", 150, 50, "SIEMENS", "Espree", 1.5, (560, 11), (3300, 96), "t1_tse_sag", "t2_tse_sag",
       matrix=320, fov=270, noise=0.03, patient_prefix="PUBA"),
    _p("public2", 130, 45, "GE MEDICAL SYSTEMS", "Discovery MR750", 3.0, (520, 10), (3600, 104), "SAG T1 FSE",
       "SAG T2 FSE", matrix=288, fov=260, spacing=4.0, thickness=3.5, noise=0.02, scale=1500, patient_prefix="PUBB"),
    _p("public3", 120, 40, "Philips", "Ingenia Elition", 3.0, (480, 9), (3900, 112), "T1W_TSE", "T2W_TSE",
       matrix=320, fov=260, n_slices=15, spacing=3.3, thickness=3.0, noise=0.02, slope=1.5, scale=800,
       patient_prefix="PUBC"),
)  # fmt: skip

SMALL_MATRIX = {256: 96, 288: 104, 320: 112, 352: 120, 384: 128}


def small(profile: SiteProfile, n_patients: int = 3) -> SiteProfile:
    """The --small variant: few patients (at least one of each class), small matrices, same conventions."""
    m = min(max(1, round(n_patients * profile.n_malignant / max(profile.n_patients, 1))), n_patients - 1)
    t2m = SMALL_MATRIX.get(profile.t2_matrix, 128) if profile.t2_matrix else None
    return replace(profile, n_patients=n_patients, n_malignant=max(m, 1), matrix=SMALL_MATRIX.get(profile.matrix, 112),
                   t2_matrix=t2m)  # fmt: skip


def scaled(profiles: tuple[SiteProfile, ...], n_sites: int, n_patients: int) -> list[SiteProfile]:
    """Choose `n_sites` profiles (cycled with new names beyond ten) and share `n_patients` out in their proportions.

    Malignant counts keep each site's prevalence; every site keeps at least one patient.
    """
    chosen = []
    for i in range(n_sites):
        base = profiles[i % len(profiles)]
        name = base.name if i < len(profiles) else f"site{i + 1:02d}"
        chosen.append(replace(base, name=name))
    total = sum(p.n_patients for p in chosen)
    weights = [p.n_patients / total for p in chosen]
    counts = [max(1, int(w * n_patients)) for w in weights]
    # Hand out the remainder to the largest fractional parts (deterministic).
    rest = n_patients - sum(counts)
    order = sorted(range(n_sites), key=lambda i: -(weights[i] * n_patients - int(weights[i] * n_patients)))
    for i in order[: max(rest, 0)]:
        counts[i] += 1
    out = []
    for p, n in zip(chosen, counts):
        m = round(n * p.n_malignant / p.n_patients) if n != p.n_patients else p.n_malignant
        out.append(replace(p, n_patients=n, n_malignant=min(max(m, 0), n)))
    return out
