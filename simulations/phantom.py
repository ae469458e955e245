"""Analytic lumbar-spine phantom: anatomy, fracture signs and MR contrast, evaluated at any patient points (LPS mm).

A `Case` holds one patient's anatomy and drawn signs. `tissue_maps(case, points)` classifies every point (label,
marrow fat fraction, oedema and tumour weights, disc hydration) and returns a mask per drawn sign; `mr_signal` turns
those maps into spin-echo / inversion-recovery signal from tissue T1/T2/PD for a sequence's TR/TE/TI at 1.5 or 3 T,
so the sites' different TR/TE and field strengths change contrast the way real scanners do.

Geometry: the spine is described in a curvilinear frame — `s` along the lordotic centreline (superior +), `u`
across it (posterior +), `lx` lateral (patient left +). Each point belongs to the vertebral level whose body centre is
nearest along s (boundaries at mid-disc), so one template evaluation serves every level (vectorised, no per-level
loop over all points). Numbers are millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulations.signs import sample_confounders, sample_signs, sign_strengths

LEVELS = ("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
LESION_LEVELS = ("T12", "L1", "L2", "L3", "L4")
LESION_LEVEL_P = {"benign": (0.25, 0.35, 0.2, 0.12, 0.08), "malignant": (0.2, 0.2, 0.2, 0.2, 0.2)}

# Labels of the tissue map.
AIR, FAT, MUSCLE, VISCERA, CORTEX, MARROW, DISC, CSF, CORD, ROOTS, LIGAMENT, TUMOUR, FLUID, AORTA, IVC, HAEMATOMA = (
    range(16)
)
N_LABELS = 16

# Tissue (T1 ms, T2 ms, PD) at 1.5 T. Fat's T2 is the effective fast-spin-echo value (J-coupling keeps fat bright).
TISSUE = {
    "fat": (260.0, 150.0, 1.0),
    "red": (650.0, 50.0, 0.8),  # haematopoietic marrow water
    "oedema": (1300.0, 140.0, 0.95),
    "tumour": (1100.0, 95.0, 0.85),
    "cortex": (1000.0, 12.0, 0.07),
    "nucleus": (1100.0, 130.0, 0.9),
    "annulus": (900.0, 35.0, 0.6),
    "csf": (4000.0, 1800.0, 1.0),
    "cord": (800.0, 80.0, 0.75),
    "roots": (900.0, 90.0, 0.8),
    "muscle": (900.0, 35.0, 0.75),
    "viscera": (750.0, 60.0, 0.8),
    "ligament": (800.0, 18.0, 0.12),
    "fluid": (3500.0, 900.0, 1.0),
    "aorta": (1500.0, 150.0, 0.04),  # fast flow: signal void on spin echo
    "ivc": (1400.0, 180.0, 0.35),  # slow flow: intermediate
    "haematoma": (500.0, 250.0, 0.9),  # subacute: methaemoglobin shortens T1
}
LABEL_TISSUE = {
    AIR: None,
    FAT: "fat",
    MUSCLE: "muscle",
    VISCERA: "viscera",
    CORTEX: "cortex",
    CSF: "csf",
    CORD: "cord",
    ROOTS: "roots",
    LIGAMENT: "ligament",
    TUMOUR: "tumour",
    AORTA: "aorta",
    IVC: "ivc",
    HAEMATOMA: "haematoma",
}


@dataclass
class Sequence:
    """What the phantom needs of an acquisition: TR/TE/TI (ms), field strength, fat suppression, contrast agent."""

    tr: float
    te: float
    ti: float | None = None
    field_strength: float = 1.5
    fat_sat: bool = False
    contrast: bool = False


@dataclass
class Case:
    """One patient's anatomy and drawn signs. Build with `make_case`."""

    label: str
    signs: dict[str, bool]
    strength: dict[str, float]
    typicality: float
    confounders: dict[str, bool]
    lesion: int  # index into LEVELS
    body_h: np.ndarray  # per level, mm
    disc_h: np.ndarray  # disc below each level, mm
    body_d: np.ndarray  # AP depth per level
    body_w: np.ndarray  # lateral half-width per level
    s_center: np.ndarray  # body centres along s (lesion body at 0)
    x0: float
    y0: float
    zc: float
    kappa: float  # lordosis: centreline y = y0 + kappa (z - zc)^2
    lat_slope: float  # slight scoliosis: x of the midline drifts with z
    canal_d: float
    canal_w: float
    spinous_len: float
    muscle_t: float
    subcut_t: float
    abdomen_d: float
    dep_top: np.ndarray  # endplate depression per level (mm), superior / inferior
    dep_bot: np.ndarray
    wedge: np.ndarray  # per level: 1 angled (anterior wedge), 0 concave (central)
    bulge: np.ndarray  # posterior wall bulge per level (mm; negative = normal slight concavity)
    disc_deg: np.ndarray  # per disc 0..1
    tissue_jitter: dict[str, tuple[float, float]]
    marrow_ff: float
    features: list[dict] = field(default_factory=list)  # focal lesions: dicts with kind, centre, radii, weights
    texture: tuple[np.ndarray, np.ndarray, np.ndarray] = None  # random Fourier field: k (m,3), phase, amplitude
    params: dict = field(default_factory=dict)


def _texture(rng, m=10, lo=5.0, hi=22.0):
    """Random Fourier components for a smooth, patient-fixed texture field (same in T1 and T2)."""
    k = rng.standard_normal((m, 3))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    k *= (2 * np.pi / rng.uniform(lo, hi, m))[:, None]
    return (
        k.astype(np.float32),
        rng.uniform(0, 2 * np.pi, m).astype(np.float32),
        np.full(m, np.sqrt(2.0 / m), np.float32),
    )


def make_case(label: str, rng: np.random.Generator, difficulty: float = 1.0, rho: float | None = None) -> Case:
    """Draw one patient: anatomy, lesion level, signs (published rates), their strengths and confounders."""
    kw = {} if rho is None else {"rho": rho}
    signs, t = sample_signs(label, rng, **kw)
    strength = sign_strengths(signs, t, rng, difficulty)
    conf = sample_confounders(rng, label)
    nl = len(LEVELS)
    size = rng.normal(1.0, 0.06)
    body_h = rng.normal(28.5, 1.2, nl) * size
    body_h[-1] = 45.0  # sacrum block
    body_h[:2] *= 0.9  # thoracic bodies are lower
    disc_h = np.clip(rng.normal(9.5, 1.0, nl) + np.linspace(-1.5, 1.5, nl), 6.5, 13.0) * size
    disc_deg = np.zeros(nl)
    if conf["disc_degeneration"]:
        for i in rng.choice(np.arange(3, nl - 1), size=rng.integers(1, 4), replace=False):
            disc_deg[i] = rng.uniform(0.4, 1.0)
    disc_h *= 1.0 - 0.4 * disc_deg
    body_d = rng.normal(35.0, 1.5) * size + np.linspace(-3.0, 2.0, nl) + rng.normal(0, 0.6, nl)
    body_w = body_d * rng.uniform(0.62, 0.7) + np.linspace(-2.0, 2.5, nl)
    p = LESION_LEVEL_P[label]
    lesion = LEVELS.index(LESION_LEVELS[rng.choice(len(LESION_LEVELS), p=np.asarray(p) / sum(p))])

    # Body centres along s, lesion body at s = 0, stacked downwards.
    sc = np.zeros(nl)
    for i in range(1, nl):
        sc[i] = sc[i - 1] - body_h[i - 1] / 2 - disc_h[i - 1] - body_h[i] / 2
    sc -= sc[lesion]

    dep_top, dep_bot = np.zeros(nl), np.zeros(nl)
    wedge, bulge = np.zeros(nl), np.full(nl, -0.8)
    # Height loss 15–55% of the body, the same range for both classes (no shortcut through height).
    loss = rng.uniform(0.15, 0.55) * body_h[lesion]
    angled = not signs["concave_endplate"]
    wedge[lesion] = 1.0 if angled else 0.0
    if rng.random() < 0.7:
        dep_top[lesion] = loss
    else:
        dep_top[lesion], dep_bot[lesion] = loss * 0.6, loss * 0.4
    if signs["convex_posterior"]:
        bulge[lesion] = 1.5 + 3.5 * strength["convex_posterior"]
    case = Case(
        label=label,
        signs=signs,
        strength=strength,
        typicality=t,
        confounders=conf,
        lesion=lesion,
        body_h=body_h,
        disc_h=disc_h,
        body_d=body_d,
        body_w=body_w,
        s_center=sc,
        x0=rng.normal(0, 3.0),
        y0=rng.normal(0, 4.0),
        zc=rng.normal(0, 10.0),
        kappa=rng.uniform(0.0008, 0.0028),
        lat_slope=rng.normal(0, 0.03),
        canal_d=rng.uniform(14.0, 19.0),
        canal_w=rng.uniform(10.0, 12.5),
        spinous_len=rng.uniform(24.0, 34.0),
        muscle_t=rng.uniform(38.0, 60.0),
        subcut_t=rng.uniform(8.0, 40.0),
        abdomen_d=rng.uniform(90.0, 160.0),
        dep_top=dep_top,
        dep_bot=dep_bot,
        wedge=wedge,
        bulge=bulge,
        disc_deg=disc_deg,
        tissue_jitter={k: (rng.normal(1, 0.06), rng.normal(1, 0.06)) for k in TISSUE},
        marrow_ff=rng.uniform(0.28, 0.42) if conf["red_marrow"] else rng.uniform(0.5, 0.72),
        texture=_texture(rng),
    )
    _add_features(case, rng)
    return case


def _add_features(case: Case, rng: np.random.Generator) -> None:
    """Focal findings (signs and confounders) as parameter dicts in level-local coordinates (lx, u, v)."""
    L, st, sg = case.lesion, case.strength, case.signs
    h, d = case.body_h[L], case.body_d[L]
    top = h / 2 - case.dep_top[L]
    f = case.features
    malignant = case.label == "malignant"
    if sg["band_low_t1"]:
        f.append(dict(kind="band", level=L, width=3.0 + 9.0 * st["band_low_t1"], weight=0.3 + 0.65 * st["band_low_t1"]))
    if sg["diffuse_low_t1"]:
        s = st["diffuse_low_t1"]
        f.append(
            dict(kind="diffuse", level=L, weight=0.35 + 0.6 * s, tumour=malignant, spare=rng.uniform(0, 0.35 * (1 - s)))
        )
    if sg["fluid_sign"]:
        s = st["fluid_sign"]
        f.append(
            dict(kind="fluid", level=L, c=(rng.normal(0, 3), rng.normal(-2, 3), top - 2.0 - 3 * rng.random()),
                 r=(5 + 6 * s, 4 + 8 * s, 0.8 + 2.2 * s), weight=0.5 + 0.5 * s)
        )  # fmt: skip
    if sg["retropulsion"]:
        s = st["retropulsion"]
        f.append(dict(kind="retropulsion", level=L, shift=1.5 + 4.0 * s, r=(7 + 4 * s, 3 + 2 * s, 3.5 + 3 * s)))
    if sg["pedicle"]:
        s = st["pedicle"]
        sides = [-1, 1] if rng.random() < 0.6 else [int(rng.choice([-1, 1]))]
        f.append(dict(kind="pedicle", level=L, sides=sides, weight=0.3 + 0.7 * s, tumour=malignant))
    if sg["epidural_mass"]:
        s = st["epidural_mass"]
        f.append(
            dict(kind="epidural", level=L, thick=2.0 + 7.0 * s, c_lx=rng.normal(0, 4), r_v=h * (0.3 + 0.35 * s),
                 r_lx=6 + 6 * s)
        )  # fmt: skip
        if rng.random() < 0.5:
            f.append(dict(kind="paraspinal", level=L, c=(rng.normal(0, 8), -d / 2 - 4 - 4 * s, 0.0),
                          r=(10 + 8 * s, 3 + 6 * s, h * 0.45), tissue="tumour"))  # fmt: skip
    others = [i for i in range(1, len(LEVELS) - 1) if i != L]
    if sg["other_fracture"]:
        i = int(rng.choice(others))
        case.dep_top[i] = rng.uniform(0.1, 0.3) * case.body_h[i]
        case.wedge[i] = float(rng.random() < 0.6)
        if rng.random() < 0.3:  # acute second fracture with its own band
            f.append(
                dict(
                    kind="band",
                    level=i,
                    width=3 + 5 * rng.random(),
                    weight=0.3 + 0.5 * rng.random(),
                    sign="other_fracture",
                )
            )
        f.append(dict(kind="mark_body", level=i, sign="other_fracture"))
    if sg["skip_lesions"]:
        for i in rng.choice(others, size=rng.integers(1, 4), replace=False):
            s = st["skip_lesions"]
            r = 3 + 7 * s * rng.uniform(0.6, 1.0)
            hh = case.body_h[i]
            f.append(
                dict(kind="focal", level=int(i), c=(rng.normal(0, 6), rng.normal(0, 6), rng.uniform(-hh / 3, hh / 3)),
                     r=(r, r, r), ff=0.1, oed=0.0, tum=0.6 + 0.4 * s, sign="skip_lesions")
            )  # fmt: skip
    conf = case.confounders
    if conf["haemangioma"]:
        i = int(rng.choice(range(1, len(LEVELS) - 1)))
        r = rng.uniform(4, 11)
        hh = case.body_h[i]
        f.append(
            dict(kind="focal", level=i, c=(rng.normal(0, 6), rng.normal(0, 6), rng.uniform(-hh / 4, hh / 4)),
                 r=(r, r, r * 1.2), ff=0.9, oed=0.55, tum=0.0, sign="conf_haemangioma")
        )  # fmt: skip
    if conf["modic"]:
        discs = np.flatnonzero(case.disc_deg > 0) if (case.disc_deg > 0).any() else np.array([4])
        i = int(rng.choice(discs))
        case.disc_deg[i] = max(case.disc_deg[i], 0.5)
        f.append(dict(kind="modic", disc=i, type=1 if rng.random() < 0.45 else 2, width=2.5 + 5 * rng.random()))
    if conf["paraspinal_haematoma"]:
        f.append(dict(kind="paraspinal", level=L, c=(rng.normal(0, 10), -d / 2 - 3, 0.0), r=(14, 3 + 3 * rng.random(), h * 0.5),
                      tissue="haematoma", sign="conf_paraspinal_haematoma"))  # fmt: skip
    # Slight endplate irregularity everywhere so the fractured endplate is not the only non-flat one.
    case.params["schmorl"] = rng.random() < 0.2


def _field(case: Case, p: np.ndarray, m: int | None = None) -> np.ndarray:
    k, ph, a = (t[:m] for t in case.texture)
    return (np.sin(p @ k.T + ph) * a).sum(-1)


def _ell(dx, dy, dz, rx, ry, rz):
    return (dx / rx) ** 2 + (dy / ry) ** 2 + (dz / rz) ** 2


@dataclass
class Maps:
    label: np.ndarray  # uint8
    ff: np.ndarray  # marrow fat fraction (MARROW); nucleus hydration (DISC)
    oed: np.ndarray  # oedema weight (MARROW); fluid fraction (FLUID)
    tum: np.ndarray  # tumour weight (MARROW)
    tex: np.ndarray  # smooth texture field in [-~2, 2]
    level: np.ndarray  # int8 level index of each point
    body: np.ndarray  # bool: inside a vertebral body (cortex or marrow)
    masks: dict[str, np.ndarray]


def tissue_maps(case: Case, points: np.ndarray) -> Maps:
    """Classify patient points (..., 3) into tissues and record where each drawn sign is."""
    shape = points.shape[:-1]
    p = points.reshape(-1, 3).astype(np.float32)
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    dz = z - np.float32(case.zc)
    yc = case.y0 + case.kappa * dz * dz
    slope = 2.0 * case.kappa * dz
    cos = 1.0 / np.sqrt(1.0 + slope * slope)
    dy = y - yc
    u = dy * cos
    s = dz + dy * slope * cos
    lx = x - (case.x0 + case.lat_slope * dz)
    a0 = np.float32(np.median(case.body_d) / 2)
    n_all = p.shape[0]
    label_all = np.zeros(n_all, np.uint8)

    # Soft tissue everywhere (cheap): abdomen anterior, back posterior.
    canal_back = a0 + 1.5 + case.canal_d
    back_muscle = canal_back + case.muscle_t
    skin = back_muscle + case.subcut_t
    inside = (u < skin) & (u > -a0 - case.abdomen_d)
    label_all[inside] = VISCERA
    label_all[inside & (u < -a0 - case.abdomen_d + 15)] = FAT  # anterior abdominal wall fat
    label_all[(u > -a0 - 30) & (u < -a0) & inside] = FAT  # retroperitoneal fat in front of the spine
    label_all[(u >= canal_back - 6) & (u < back_muscle)] = MUSCLE
    label_all[(u >= back_muscle) & (u < skin)] = FAT

    # Everything else only near the spine: the costly terms (texture, level template) on about half the points.
    near = (u > -a0 - 34) & (u < canal_back + case.spinous_len + 10) & (np.abs(lx) < 70)
    sel = np.flatnonzero(near)
    tex_all = np.zeros(n_all, np.float32)
    far = np.flatnonzero(~near & (label_all == VISCERA))
    if far.size:  # abdomen: coarse heterogeneity from three components
        tex_all[far] = _field(case, np.stack([lx[far], u[far], s[far]], -1), m=3) * np.float32(1.1)
    lx, u, s = lx[sel], u[sel], s[sel]
    tex = _field(case, np.stack([lx, u, s], -1)).astype(np.float32)
    label = label_all[sel]

    nl = len(LEVELS)
    sc = case.s_center
    bnd = sc[:-1] - case.body_h[:-1] / 2 - case.disc_h[:-1] / 2  # decreasing mid-disc boundaries
    idx = (nl - 1 - np.searchsorted(bnd[::-1], s)).astype(np.int8)
    v = s - sc[idx].astype(np.float32)
    H = case.body_h[idx].astype(np.float32)
    a = (case.body_d[idx] / 2).astype(np.float32)
    W = case.body_w[idx].astype(np.float32)
    ff = np.zeros(sel.size, np.float32)
    oed = np.zeros_like(ff)
    tum = np.zeros_like(ff)
    masks: dict[str, np.ndarray] = {}
    label[_ell(lx - 16, u + a0 + 12, 0, 10, 10, 1) < 1] = AORTA  # aorta: left anterolateral
    label[_ell(lx + 20, u + a0 + 10, 0, 11, 9, 1) < 1] = IVC

    # Discs and bodies.
    ln = lx / W
    ln2 = ln * ln
    wedge = case.wedge[idx].astype(np.float32)
    un_raw = np.clip(u / a, -1.0, 1.0)
    prof_conc = np.clip((1 - un_raw * un_raw) * (1 - ln2), 0, 1)
    prof_wedge = np.clip(0.5 - 0.5 * un_raw, 0, 1) * 1.0
    prof = wedge * prof_wedge + (1 - wedge) * prof_conc
    dep_t = case.dep_top[idx].astype(np.float32)
    dep_b = case.dep_bot[idx].astype(np.float32)
    top = H / 2 - dep_t * (0.35 + 0.65 * prof)
    bottom = -H / 2 + dep_b * (0.35 + 0.65 * prof)
    if case.params.get("schmorl"):
        top = top - 2.0 * np.clip(1 - ((u + 3) / 7) ** 2 - ln2 * 4, 0, 1) * (idx == (case.lesion + 2) % (nl - 1))
    mid = (top + bottom) / 2
    half = np.maximum((top - bottom) / 2, 2.0)
    vn = (v - mid) / half
    bul = case.bulge[idx].astype(np.float32)
    ue = np.where(u > 0, u - bul * np.clip(1 - vn * vn, 0, 1) * np.clip(1 - ln2, 0, 1), u)
    un = ue / a
    un2 = un * un
    cs = np.sqrt(np.sqrt(ln2 * ln2 + un2 * un2))
    vn2 = vn * vn
    cs4 = cs**4
    r = np.sqrt(np.sqrt(np.sqrt(cs4 * cs4 + vn2 * vn2 * vn2 * vn2)))
    body = r <= 1.0
    marrow = r <= 1.0 - 1.1 / np.minimum(a, half)

    disc = (cs <= 1.03) & ~body & (np.abs(v) < H / 2 + case.disc_h.max())
    disc_id = np.clip(np.where(v > 0, idx - 1, idx), 0, nl - 1)
    hyd = 1.0 - case.disc_deg[disc_id].astype(np.float32)
    nucleus = np.clip(1.0 - (((u - 0.1 * a) / (0.55 * a)) ** 2 + ln2 / 0.4), 0, 1)
    label[disc] = DISC
    ff[disc] = (nucleus * hyd)[disc]
    label[body] = CORTEX
    label[marrow] = MARROW
    ffm = np.clip(case.marrow_ff * (1 + 0.12 * tex), 0.05, 0.95)
    if case.confounders["red_marrow"]:
        ffm = np.clip(ffm * (1 + 0.35 * np.sin(0.25 * s + tex)), 0.08, 0.9)
    ff[marrow] = ffm[marrow]

    # Canal: epidural fat, thecal sac (CSF), cord above the conus, cauda roots below.
    cu = u - (a0 + 1.5)
    canal = (cu > 0) & (cu < case.canal_d) & (np.abs(lx) < case.canal_w) & ~body
    sac = (cu > 1.0) & (cu < case.canal_d - 3.0) & (np.abs(lx) < case.canal_w - 2.5)
    label[canal] = FAT
    label[sac & canal] = CSF
    conus = sc[LEVELS.index("L1")] - case.body_h[2] * 0.3
    cord = _ell(lx, cu - 0.45 * case.canal_d, 0, 5.0, 3.8, 1) < 1
    label[sac & canal & cord & (s > conus)] = CORD
    roots = _ell(lx, cu - 0.72 * case.canal_d, 0, 4.5, 2.3, 1) < 1
    label[sac & canal & roots & (s <= conus)] = ROOTS
    label[(cu > -1.0) & (cu < 0.5) & (np.abs(lx) < case.canal_w) & ~body & (np.abs(v) < H / 2)] = LIGAMENT  # PLL

    # Posterior elements, per level: pedicles (lateral), laminae, spinous process.
    vc = 0.18 * H
    ped_lx = np.abs(lx) - (case.canal_w + 4.0)
    ped_e = _ell(ped_lx, cu - case.canal_d / 2, v - vc, 4.2, case.canal_d / 2 + 2.0, 7.5)
    ped = ped_e < 1
    lam_u = cu - case.canal_d - 3.0
    lam_e = _ell(lam_u, v - (vc - 3.0), 0, 3.5, 11.0, 1)
    lam = (lam_e < 1) & (np.abs(lx) < case.canal_w + 8)
    su = cu - case.canal_d
    vsp = vc - 4.0 - 0.35 * su
    half_sp = 8.0 - 0.1 * np.clip(su, 0, None)
    spin = (su > 2) & (su < case.spinous_len) & (np.abs(v - vsp) < half_sp) & (np.abs(lx) < 3.6)
    post = ped | lam | spin
    post_marrow = (
        (ped & (ped_e < 0.55))
        | (lam & (lam_e < 0.45))
        | (spin & (np.abs(lx) < 2.2) & (np.abs(v - vsp) < half_sp - 1.3))
    )
    label[post] = CORTEX
    label[post_marrow] = MARROW
    ff[post_marrow] = np.clip(case.marrow_ff * 1.1 * (1 + 0.1 * tex[post_marrow]), 0.05, 0.95)

    lv = idx == case.lesion
    lesion_body = body & lv
    masks["_lesion_body"] = lesion_body

    for feat in case.features:
        _paint(
            case,
            feat,
            feat.get("level"),
            lx,
            u,
            v,
            cu,
            idx,
            top,
            bottom,
            H,
            a,
            body,
            marrow,
            label,
            ff,
            oed,
            tum,
            tex,
            masks,
            post_marrow,
            ped,
        )

    # Sign masks tied to geometry.
    if case.signs["convex_posterior"]:
        masks["convex_posterior"] = lesion_body & (u > a)
    dm = lv & (cs <= 1.0) & (np.abs(v) <= H / 2) & ~body & ((v > top) | (v < bottom))
    masks["concave_endplate" if case.signs["concave_endplate"] else "angled_endplate"] = dm

    def full(arr, fill=0):
        out = np.full(n_all, fill, arr.dtype)
        out[sel] = arr
        return out.reshape(shape)

    label_all[sel] = label
    tex_all[sel] = tex
    return Maps(
        label_all.reshape(shape),
        full(ff),
        full(oed),
        full(tum),
        tex_all.reshape(shape),
        full(idx, -1),
        full(body),
        {k: full(m) for k, m in masks.items()},
    )


def _paint(
    case, f, L, lx, u, v, cu, idx, top, bottom, H, a, body, marrow, label, ff, oed, tum, tex, masks, post_marrow, ped
):
    """Render one focal feature into the maps and its mask."""
    kind = f["kind"]
    name = f.get("sign", {"band": "band_low_t1", "diffuse": "diffuse_low_t1", "fluid": "fluid_sign",
                          "retropulsion": "retropulsion", "pedicle": "pedicle", "epidural": "epidural_mass",
                          "paraspinal": "epidural_mass", "modic": "conf_modic"}.get(kind, kind))  # fmt: skip
    lv = idx == L if L is not None else None
    if kind == "band":
        fract_top = case.dep_top[L] >= case.dep_bot[L]
        dist = (top - v) if fract_top else (v - bottom)
        width = f["width"] * (1 + 0.25 * tex)
        m = marrow & lv & (dist < width)
        w = f["weight"] * np.clip(1.2 - dist / width, 0, 1)
        oed[m] = np.maximum(oed[m], w[m])
        ff[m] *= 1 - 0.8 * w[m]
    elif kind == "diffuse":
        m = marrow & lv
        spare = (tex < -1.0 + 2.0 * f["spare"]) & (f["spare"] > 0.05)  # islands of spared fat
        mm = m & ~spare
        w = np.float32(f["weight"])
        if f["tumour"]:
            tum[mm] = np.maximum(tum[mm], w)
        else:
            oed[mm] = np.maximum(oed[mm], w)
        ff[mm] *= 1 - 0.9 * w
        m = mm
    elif kind in ("fluid", "focal"):
        c, r = f["c"], f["r"]
        e = _ell(lx - c[0], u - c[1], v - c[2], *r)
        m = marrow & lv & (e < 1)
        if kind == "fluid":
            label[m] = FLUID
            oed[m] = f["weight"]
        else:
            ff[m] = f["ff"]
            oed[m] = np.maximum(oed[m], f["oed"])
            tum[m] = np.maximum(tum[m], f["tum"])
    elif kind == "retropulsion":
        c_v = top - f["r"][2] * 0.8
        e = _ell(lx, u - (a + f["shift"] - f["r"][1] * 0.6), v - c_v, *f["r"])
        m = lv & (e < 1) & ~body
        label[m] = CORTEX
        inner = m & (e < 0.4)
        label[inner] = MARROW
        ff[inner] = 0.3
        oed[inner] = 0.5
    elif kind == "pedicle":
        side = np.zeros_like(lx, dtype=bool)
        for sd in f["sides"]:
            side |= (lx * sd) > 0
        m = post_marrow & lv & side
        w = f["weight"] * np.clip(1.1 + 0.2 * tex, 0, 1)
        (tum if f["tumour"] else oed)[m] = np.maximum((tum if f["tumour"] else oed)[m], w[m])
        ff[m] *= 1 - 0.85 * w[m]
        masks[name] = ped & lv & side
        return
    elif kind == "epidural":
        # Anterior epidural space behind the body, compressing the sac.
        e = _ell(lx - f["c_lx"], cu - f["thick"] / 2, v, f["r_lx"], f["thick"] / 2 + 0.5, f["r_v"])
        m = lv & (e < 1) & ~body & (cu > -1.0)
        label[m] = TUMOUR
    elif kind == "paraspinal":
        c, r = f["c"], f["r"]
        m = lv & (_ell(lx - c[0], u - c[1], v - c[2], *r) < 1) & ~body & (u < 0)
        label[m] = TUMOUR if f["tissue"] == "tumour" else HAEMATOMA
    elif kind == "modic":
        i = f["disc"]
        above = (
            (idx == i) & marrow & ((v + case.body_h[i] / 2) < f["width"])
        )  # inferior endplate of the body above the disc
        below = (idx == i + 1) & marrow & ((case.body_h[i + 1] / 2 - v) < f["width"])
        m = above | below
        if f["type"] == 1:
            oed[m] = np.maximum(oed[m], 0.6)
            ff[m] *= 0.4
        else:
            ff[m] = np.clip(ff[m] * 1.5, 0, 0.95)
    elif kind == "mark_body":
        m = body & lv
    else:
        raise ValueError(kind)
    masks[name] = masks[name] | m if name in masks else m


def _tissue(name: str, case: Case, seq: Sequence):
    t1, t2, pd = TISSUE[name]
    j1, j2 = case.tissue_jitter[name]
    t1, t2 = t1 * j1, t2 * j2
    if seq.field_strength >= 2.5:  # 3 T: T1 lengthens (fat less), T2 shortens slightly
        t1 *= 1.15 if name == "fat" else 1.3
        t2 *= 0.92
    if seq.contrast and name in ("tumour", "oedema", "ivc", "nucleus", "haematoma"):
        t1 = 1.0 / (1.0 / t1 + {"tumour": 1 / 350, "oedema": 1 / 700}.get(name, 1 / 2000))
    return t1, t2, pd


def _se(t1, t2, pd, seq: Sequence):
    tr, te = seq.tr, seq.te
    if seq.ti is not None:
        return pd * np.abs(1 - 2 * np.exp(-seq.ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)
    return pd * (1 - np.exp(-tr / t1)) * np.exp(-te / t2)


def tissue_signal(name: str, case: Case, seq: Sequence) -> float:
    s = float(_se(*_tissue(name, case, seq), seq))
    if name == "fat" and seq.fat_sat:
        s *= 0.08
    return s


def mr_signal(maps: Maps, case: Case, seq: Sequence) -> np.ndarray:
    """Noise-free signal (float32, same shape as the maps); fat ≈ 0.5–1 on T1W, CSF ≈ 0.5 on T2W."""
    lut = np.zeros(N_LABELS, np.float32)
    for lab, name in LABEL_TISSUE.items():
        if name:
            lut[lab] = tissue_signal(name, case, seq)
    out = lut[maps.label]
    S = {k: tissue_signal(k, case, seq) for k in ("fat", "red", "oedema", "tumour", "nucleus", "annulus", "fluid")}
    m = maps.label == MARROW
    ff, oed, tum = maps.ff[m], maps.oed[m], maps.tum[m]
    water = (
        np.clip(1 - oed - tum, 0, 1) * S["red"] + np.clip(oed, 0, 1) * S["oedema"] + np.clip(tum, 0, 1) * S["tumour"]
    )
    water = water / np.maximum(np.clip(1 - oed - tum, 0, 1) + np.clip(oed, 0, 1) + np.clip(tum, 0, 1), 1.0)
    out[m] = ff * S["fat"] + (1 - ff) * water
    d = maps.label == DISC
    out[d] = maps.ff[d] * S["nucleus"] + (1 - maps.ff[d]) * S["annulus"]
    fl = maps.label == FLUID
    out[fl] = maps.oed[fl] * S["fluid"] + (1 - maps.oed[fl]) * S["oedema"]
    v = maps.label == VISCERA
    out[v] *= np.clip(1 + 0.35 * maps.tex[v], 0.2, 2.0)  # bowel and vessels: coarse heterogeneity
    return out
