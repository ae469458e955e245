"""How the acquisition verdict (server/stratified.py) behaves on the phantom's federation: how often it claims a
difference between levels when no attribute has any effect, and how often it names fat-suppressed T2 when only that
attribute lowers the AUC; and the operating-point contrast (Youden J) with and without a score shift at the
fat-suppressed sites.

The sites and their levels are the default cohort's (simulations/sites.py, levels by common/acquisition.py; every
patient of a site shares its scanner, as under site-held-out). Each replicate draws a site AUC
expit(logit(0.85) + u + effect·[fat-suppressed T2]), u ~ N(0, tau²), binormal scores for the site's malignant and
benign patients, the site's DeLong AUC and confusion counts, and runs the coordinator's stratify() on those strata.
Synthetic: these are the method's operating characteristics on this design, not results.

    .venv/bin/python bench/stratified_power.py [--reps 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import special, stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import acquisition as A  # noqa: E402
from common import metrics as M  # noqa: E402
from common.dicom import is_lossy  # noqa: E402
from server import stratified as S  # noqa: E402
from simulations.sites import SITES  # noqa: E402


def levels_of(site) -> dict[str, str]:
    spacing = max(site.fov / site.matrix, site.fov / (site.t2_matrix or site.matrix))
    return {
        "manufacturer": A.manufacturer_level(site.manufacturer),
        "field-strength": A.field_strength_level(site.field_strength),
        "t2-fat-suppression": A.YES if site.t2_fat_sat else A.NO,
        "slice-thickness": A.binned(site.thickness, A.SLICE_THICKNESS),
        "pixel-spacing": A.binned(spacing, A.PIXEL_SPACING),
        "lossy-compression": A.YES if is_lossy(None, str(site.transfer_syntax)) else A.NO,
    }


def replicate(rng, design, tau: float, effect: float, shift: float = 0.0) -> dict:
    """One federation: `effect` lowers the fat-suppressed sites' logit AUC; `shift` moves all their scores up (in SD
    units) while the threshold stays where the other sites put it (a scanner that shifts scores: ranking kept)."""
    reports = {}
    for name, n, m, levels in design:
        fs = levels["t2-fat-suppression"] == A.YES
        mu = special.logit(0.85) + rng.normal(0.0, tau) + (effect if fs else 0.0)
        d = np.sqrt(2.0) * stats.norm.ppf(special.expit(mu))  # binormal separation of that AUC
        y = np.r_[np.ones(m), np.zeros(n - m)].astype(np.int64)
        s = np.r_[rng.normal(d, 1.0, m), rng.normal(0.0, 1.0, n - m)] + (shift if fs else 0.0)
        threshold = np.sqrt(2.0) * stats.norm.ppf(0.85) / 2  # chosen on the typical site, the same everywhere
        auc, var = M.delong_auc(y, s)
        cell = {"n": n, "n-pos": m, "n-neg": n - m, **M.confusion_of(y, s >= threshold).as_dict(), "auc": auc}
        cell["auc-var"] = var
        reports[name] = {"n": n, "strata": {"min-cell": 5, "attributes": {a: {lv: cell} for a, lv in levels.items()}}}
    return S.stratify(reports)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    design = [(s.name, s.n_patients, s.n_malignant, levels_of(s)) for s in SITES]
    print("site    n  malignant  " + "  ".join(A.ATTRIBUTES))
    for name, n, m, levels in design:
        print(f"{name} {n:3d} {m:5d}      " + "  ".join(levels.values()))
    print(f"\n{args.reps} replicates each; 'claims': the verdict does not say 'No evidence of a difference'")
    rng = np.random.default_rng(args.seed)
    print("\nAt the operating point (Youden J meta-regression; the threshold of the typical site everywhere):")
    for tau in (0.3, 0.5):
        for shift in (0.0, 1.0, 1.5):
            claims = named = 0
            for _ in range(args.reps):
                block = replicate(rng, design, tau, 0.0, shift)
                drop = block.get("largest_j_drop") or {}
                claims += bool(drop) and drop["hi"] < 0
                named += drop.get("attribute") == "t2-fat-suppression" and drop["hi"] < 0
            print(
                f"tau {tau}, fat-suppressed sites' scores shifted {shift:+.1f} SD: the largest J drop's interval "
                f"excludes 0 in {claims / args.reps:.2f}; that drop is fat suppression in {named / args.reps:.2f}"
            )
    print("\nRanking (AUC meta-regression):")
    for tau in (0.3, 0.5):
        for effect in (0.0, -1.0, -1.5):
            claims = named = named_ci = 0
            for _ in range(args.reps):
                block = replicate(rng, design, tau, effect)
                drop = block["largest_drop"] or {}
                fs = drop.get("attribute") == "t2-fat-suppression"
                claims += not block["verdict"].startswith("No evidence")
                named += fs
                named_ci += fs and drop["hi"] < 0
            print(
                f"tau {tau}, fat-suppressed T2 effect {effect:+.1f} logit: claims {claims / args.reps:.2f}; "
                f"names fat suppression the largest drop {named / args.reps:.2f} "
                f"(with its interval excluding 0: {named_ci / args.reps:.2f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
