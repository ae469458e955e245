"""Quality of the federated decision threshold, pooled-histogram AUC and ECE: per-site suppressed vs secure sum (#21).

    python bench/threshold_quality.py                 # 100 seeds x 2 score scenarios, 200 timing repetitions (~1 min)
    python bench/threshold_quality.py --quick         # 6 seeds, 20 repetitions (~5 s, for CI)
    python bench/threshold_quality.py --seeds 200 --tau 0.8

Cohort: the paper-like ten sites of simulations/sites.py (SITES: 190 patients, 50 malignant; per site its
n_patients and n_malignant). Per seed every patient gets a synthetic key ("s<seed>/<site>/<i>"); tenfold membership
is the one the sites compute (common/splits.py: fold_of_key with k = 10 and fold seed 0, is_validation with
val_fraction 0.2 and split seed 0, the experiment defaults of server/experiment.py and server/protocols.py). A site
with no inner-train patient of one class in fold f's model sits that unit out (server/protocols.apply_sit_outs) and
sends no validation histogram for it.

Scores (synthetic out-of-fold model outputs; no model is trained): for each fold's model, every validation and test
patient gets a fresh draw x from the class's Beta distribution, shifted by its site on the logit scale,
score = expit(logit(x) + d_site), d_site ~ N(0, tau^2) drawn once per seed (tau 0.5 by default). The same score model
for validation and test patients. Scenarios:
  low        benign Beta(1.5, 12), malignant Beta(3, 9): both classes low on the probability scale (exact AUC ~0.83)
  separated  benign Beta(2, 6),    malignant Beta(6, 2): well separated around 0.5 (exact AUC ~0.96)

Per fold f: validation = training patients (fold != f) with is_validation true at the sites that train the unit;
test = fold f's patients at every site. Thresholds from the validation patients:
  (a) today: each site's validation histogram (M.score_histogram, 100 bins) with the minimum cell count 5 applied per
      site and per class (M.suppress_small_cells), summed over sites, server.aggregates.youden_from_histograms; 0.5
      when its Youden J is not > 0 (as server/protocols.evaluate_unit does);
  (b) secure: each site's exact integer [pos || neg] histogram on the validation grid (M.N_VALIDATION_BINS = 1000
      bins per class, as server/protocols.evaluate_unit asks for) masked with common/securesum.py (a fresh
      X25519 run key per site and seed, HKDF context per summation with a fresh nonce, a fresh self-mask seed, pairwise
      ChaCha20 masks), sent as uint32 bytes, unmasked with every seed, checked by histogram_sum against the sites'
      counts, then youden_from_histograms on the exact pooled sum (same 0.5 fallback);
  (c) exact: Youden on the raw pooled validation scores, every cut point between two adjacent distinct scores
      (threshold = their midpoint; also below the lowest and above the highest score); "malignant when score >=
      threshold"; among cuts of equal J the middle one (the same tie rule as youden_from_histograms); 0.5 if J <= 0;
  (d) yardstick, another exact rule: common/training.choose_threshold's (sklearn roc_curve, first maximum of J,
      threshold = the lowest validation score called malignant). |(d) - (c)| is how far two exact Youden conventions
      lie apart on test patients: a difference of (b) of that size is the rule's own instability, not the pooling's.
Sensitivity and specificity of each threshold on fold f's test patients pooled over the sites. Reported: mean over
seeds x folds of |sens(a) - sens(c)|, |spec(a) - spec(c)| and the same for (b) and (d), with a standard error from
the per-seed means (seeds are independent, folds within a seed are not); a fold without a malignant (benign)
test patient has no sensitivity (specificity) and is left out of that mean. Also per seed with the ten folds pooled
(each out-of-fold patient classified at its own fold's threshold: the tenfold figure the report quotes). Goal (b): <=
0.03. Diagnostics: folds where (b)'s validation J lies below the exact maximum (the grid has no edge inside the
optimal gap between two validation scores), fallbacks to 0.5, how many sites' malignant validation histograms the
per-site minimum cell count spread over all of [0, 1], and site x fold units sat out.

Pooled-histogram AUC and ECE of the out-of-fold test scores (all folds pooled, the report's tenfold tag):
  today  = server.aggregates.pooled_histograms(reports, None): interval-censored EM over every site's histograms with
           the minimum cell count 5 applied per site;
  secure = pooled_histograms(reports, secure) with secure = {"mode": "secure", "participants": every site, "sum": the
           exact pooled [pos || neg] (through the same masking arithmetic), "floor": 5, "info": {...}};
  AUC = M.histogram_auc, ECE = server.aggregates.calibration_from_histograms(...)["ece"] (10 coarse bins of 10 fine
  bins, each fine bin at its centre), both on the EM / exact pooled histograms, as server.aggregates.combine does;
  exact = sklearn roc_auc_score and M.expected_calibration_error (10 equal-width bins, the same bins) of the raw
  scores. Reported: mean |AUC - exact| and |ECE - exact| over seeds. Goal (secure): <= 0.02.

Cost of one summation: 10 sites, a 200-cell vector: X25519 key generation per site, masking per site (9 pairwise
keys + HKDF + ChaCha20 streams + self mask), unmasking + sanity check at the coordinator, time.perf_counter medians
over repetitions, and bytes per masked vector. Over the real SuperNodes: see the deployment test, not measured here.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import special
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import metrics as M  # noqa: E402
from common import securesum as S  # noqa: E402
from common.splits import fold_of_key, is_validation  # noqa: E402
from server import aggregates as A  # noqa: E402
from simulations.sites import SITES  # noqa: E402

K = 10  # tenfold
FOLD_SEED = 0  # server/experiment.py: folds.seed default
SPLIT_SEED = 0  # experiment seed default (the inner-validation split)
VAL_FRACTION = 0.2  # train.val_fraction default
MIN_CELL = 5  # experiment min_cell default
NB = len(M.DEFAULT_EDGES) - 1
SCENARIOS = {  # name: ((benign a, b), (malignant a, b))
    "low": ((1.5, 12.0), (3.0, 9.0)),
    "separated": ((2.0, 6.0), (6.0, 2.0)),
}
GOAL_THRESHOLD, GOAL_CURVES = 0.03, 0.02


# ----- cohort and scores ---------------------------------------------------------------------------------------------


def cohort(seed: int) -> list[dict]:
    """Per site: keys, labels, fold and inner-validation flag of every patient (common/splits.py membership)."""
    out = []
    for p in SITES:
        keys = [f"s{seed}/{p.name}/{i}" for i in range(p.n_patients)]
        labels = np.r_[np.ones(p.n_malignant, dtype=np.int64), np.zeros(p.n_patients - p.n_malignant, dtype=np.int64)]
        fold = np.array([fold_of_key(k, K, FOLD_SEED) for k in keys])
        val = np.array([is_validation(k, VAL_FRACTION, SPLIT_SEED) for k in keys])
        out.append({"name": p.name, "y": labels, "fold": fold, "val": val})
    return out


def draw_scores(rng, y: np.ndarray, shift: float, scenario: str) -> np.ndarray:
    (bn_a, bn_b), (ml_a, ml_b) = SCENARIOS[scenario]
    x = np.where(y == 1, rng.beta(ml_a, ml_b, y.size), rng.beta(bn_a, bn_b, y.size))
    x = np.clip(x, 1e-12, 1 - 1e-12)
    return special.expit(special.logit(x) + shift)


# ----- thresholds ----------------------------------------------------------------------------------------------------


def exact_youden(y: np.ndarray, s: np.ndarray) -> float:
    """(c): Youden on raw scores; cut points at midpoints between adjacent distinct scores (and beyond both ends);
    among cuts of equal J the middle one, ordered from high to low thresholds like youden_from_histograms."""
    if y.size == 0 or y.min() == y.max():
        return 0.5
    u = np.unique(s)
    cuts = np.r_[u[0] - 1e-6, (u[:-1] + u[1:]) / 2, u[-1] + 1e-6][::-1]  # high to low
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    tpr = 1 - np.searchsorted(pos, cuts, side="left") / pos.size  # score >= cut
    fpr = 1 - np.searchsorted(neg, cuts, side="left") / neg.size
    j = tpr - fpr
    if j.max() <= 0:
        return 0.5
    best = np.flatnonzero(np.isclose(j, j.max(), rtol=0, atol=1e-12))
    return float(cuts[int(best[len(best) // 2])])


def sklearn_youden(y: np.ndarray, s: np.ndarray) -> float:
    """(d): common/training.choose_threshold (sklearn roc_curve, the first maximum of J, threshold = the lowest
    validation score called malignant). Another exact convention, to show how far two exact Youden rules lie apart
    on test patients."""
    from common.training import choose_threshold

    return choose_threshold(y, s)


def federated_youden(hp, hn) -> tuple[float, bool]:
    """youden_from_histograms with server/protocols.evaluate_unit's fallback to 0.5 when J is not > 0: (threshold,
    whether it fell back)."""
    choice = A.youden_from_histograms(hp, hn)
    return (choice["threshold"], False) if choice["youden"] > 0 else (0.5, True)


def secure_sum(vectors: list[np.ndarray], totals: list[tuple[int, int]], run: str, sum_id: str):
    """The exact [pos || neg] sum through common/securesum.py: mask at each site, wire bytes, unmask, check."""
    privates = [S.new_private_key() for _ in vectors]
    peers = sorted(S.public_key(p) for p in privates)
    info = S.context(run, sum_id, secrets.token_hex(16))
    seeds = [S.new_seed() for _ in vectors]
    wire = [
        S.mask(v, priv, peers, info, seed).tobytes() for v, priv, seed in zip(vectors, privates, seeds, strict=True)
    ]
    size = vectors[0].size
    total = S.unmask([S.decode(b, size) for b in wire], seeds, info)
    hp, hn = S.histogram_sum(total, sum(t[0] for t in totals), sum(t[1] for t in totals))
    return hp, hn


def rates(y: np.ndarray, s: np.ndarray, t: float) -> tuple[float, float]:
    call = s >= t
    sens = float(call[y == 1].mean()) if (y == 1).any() else np.nan
    spec = float((~call[y == 0]).mean()) if (y == 0).any() else np.nan
    return sens, spec


def counts_at(y: np.ndarray, s: np.ndarray, t: float) -> np.ndarray:
    call = s >= t
    return np.array([(call & (y == 1)).sum(), (y == 1).sum(), (~call & (y == 0)).sum(), (y == 0).sum()])


# ----- one seed ------------------------------------------------------------------------------------------------------


def one_seed(seed: int, scenario: str, tau: float) -> dict:
    rng = np.random.default_rng([seed, list(SCENARIOS).index(scenario)])
    sites = cohort(seed)
    shifts = rng.normal(0.0, tau, len(sites))
    run = f"bench-{seed}-{scenario}"
    rows = []  # per fold: (sens, spec) of a, b, c
    pooled = {m: np.zeros(4, dtype=np.int64) for m in "abcd"}  # tp, n_pos, tn, n_neg over the ten folds
    oof = [{"y": [], "s": []} for _ in sites]  # out-of-fold test scores per site
    stats = {"fallback_a": 0, "fallback_b": 0, "flat_pos": 0, "site_folds": 0, "sat_out": 0, "j_lower": 0, "thr": []}
    for f in range(K):
        scores = [draw_scores(rng, st["y"], d, scenario) for st, d in zip(sites, shifts, strict=True)]
        val_y, val_s, clear_p, clear_n, vectors, totals = [], [], [], [], [], []
        for st, s in zip(sites, scores, strict=True):
            train = st["fold"] != f
            inner = train & ~st["val"]
            if not ((st["y"][inner] == 1).any() and (st["y"][inner] == 0).any()):
                stats["sat_out"] += 1  # no inner-train patient of one class: the site sits the unit out
                continue
            v = train & st["val"]
            if not v.any():
                continue
            y, sv = st["y"][v], s[v]
            hp, hn = M.score_histogram(y, sv)
            sp, sn = M.suppress_small_cells(hp, MIN_CELL), M.suppress_small_cells(hn, MIN_CELL)
            clear_p.append(sp)
            clear_n.append(sn)
            stats["site_folds"] += 1
            stats["flat_pos"] += int(hp.sum() > 0 and np.count_nonzero(sp) == NB)  # spread over all of [0, 1]
            # The secure validation sum uses the finer grid of server/protocols.evaluate_unit (M.N_VALIDATION_BINS).
            fp, fn = M.score_histogram(y, sv, M.edges_for(M.N_VALIDATION_BINS))
            vectors.append(np.concatenate([fp, fn]).astype(np.int64))
            totals.append((int(hp.sum()), int(hn.sum())))
            val_y.append(y)
            val_s.append(sv)
        t_a, fell_a = federated_youden(np.sum(clear_p, axis=0), np.sum(clear_n, axis=0))
        if len(vectors) >= S.MIN_PARTICIPANTS:
            t_b, fell_b = federated_youden(*secure_sum(vectors, totals, run, f"tenfold-{f}/validation"))
        else:  # fewer than three participants: the per-site suppressed fallback
            t_b, fell_b = t_a, fell_a
        stats["fallback_a"] += int(fell_a)
        stats["fallback_b"] += int(fell_b)
        vy, vs = np.concatenate(val_y), np.concatenate(val_s)
        t_c = exact_youden(vy, vs)
        t_d = sklearn_youden(vy, vs)
        j_b, j_c = (sum(rates(vy, vs, t)) - 1 for t in (t_b, t_c))
        stats["j_lower"] += int(j_b < j_c - 1e-12)  # the grid misses the exact optimum (vs a tie choice)
        stats["thr"].append((t_a, t_b, t_c, t_d))
        test_y = np.concatenate([st["y"][st["fold"] == f] for st in sites])
        test_s = np.concatenate([s[st["fold"] == f] for st, s in zip(sites, scores, strict=True)])
        rows.append([rates(test_y, test_s, t) for t in (t_a, t_b, t_c, t_d)])
        for m, t in zip("abcd", (t_a, t_b, t_c, t_d), strict=True):
            pooled[m] += counts_at(test_y, test_s, t)
        for i, (st, s) in enumerate(zip(sites, scores, strict=True)):
            held = st["fold"] == f
            oof[i]["y"].append(st["y"][held])
            oof[i]["s"].append(s[held])
    # The report's tenfold tag: per-site out-of-fold histograms.
    reports, vectors, totals, all_y, all_s = {}, [], [], [], []
    for st, o in zip(sites, oof, strict=True):
        y, s = np.concatenate(o["y"]), np.concatenate(o["s"])
        hp, hn = M.score_histogram(y, s)
        reports[st["name"]] = {
            "hist-pos": M.suppress_small_cells(hp, MIN_CELL),
            "hist-neg": M.suppress_small_cells(hn, MIN_CELL),
        }
        vectors.append(np.concatenate([hp, hn]).astype(np.int64))
        totals.append((int(hp.sum()), int(hn.sum())))
        all_y.append(y)
        all_s.append(s)
    sp, sn = secure_sum(vectors, totals, run, "report/tenfold")
    secure = {
        "mode": "secure",
        "participants": [st["name"] for st in sites],
        "sum": np.concatenate([sp, sn]).tolist(),
        "floor": MIN_CELL,
        "info": {"pooling": "secure sum"},
    }
    y, s = np.concatenate(all_y), np.concatenate(all_s)
    curves = {"exact": (float(roc_auc_score(y, s)), M.expected_calibration_error(y, s))}
    for name, sec in (("today", None), ("secure", secure)):
        hp, hn, _ = A.pooled_histograms(reports, sec)
        curves[name] = (M.histogram_auc(hp, hn), A.calibration_from_histograms(hp, hn)["ece"])
    return {"rows": np.array(rows, dtype=float), "pooled": pooled, "curves": curves, "stats": stats}


# ----- cost of one summation -----------------------------------------------------------------------------------------


def summation_cost(reps: int, n_sites: int = 10, size: int = 2 * NB) -> dict:
    rng = np.random.default_rng(0)
    keygen, masking, unmasking = [], [], []
    nbytes = 0
    for r in range(reps):
        vectors = [rng.integers(0, 4, size) for _ in range(n_sites)]
        t0 = time.perf_counter()
        privates = [S.new_private_key() for _ in range(n_sites)]
        peers = sorted(S.public_key(p) for p in privates)
        keygen.append((time.perf_counter() - t0) / n_sites)
        info = S.context("bench", f"cost-{r}", secrets.token_hex(16))
        seeds = [S.new_seed() for _ in range(n_sites)]
        wire = []
        for v, priv, seed in zip(vectors, privates, seeds, strict=True):
            t0 = time.perf_counter()
            wire.append(S.mask(v, priv, peers, info, seed).tobytes())
            masking.append(time.perf_counter() - t0)
        nbytes = len(wire[0])
        t0 = time.perf_counter()
        total = S.unmask([S.decode(b, size) for b in wire], seeds, info)
        half = size // 2
        S.histogram_sum(total, int(sum(v[:half].sum() for v in vectors)), int(sum(v[half:].sum() for v in vectors)))
        unmasking.append(time.perf_counter() - t0)
        assert np.array_equal(total.astype(np.int64), np.sum(vectors, axis=0))  # masks cancel
    return {
        "keygen": statistics.median(keygen),
        "mask": statistics.median(masking),
        "unmask": statistics.median(unmasking),
        "bytes": nbytes,
        "reps": reps,
    }


# ----- main ----------------------------------------------------------------------------------------------------------


def _mean_abs(a, b) -> float:
    d = np.abs(np.asarray(a) - np.asarray(b))
    return float(np.nanmean(d))


def _mean_abs_se(a, b, n_seeds: int) -> tuple[float, float]:
    """Mean |a - b| over seeds x folds and its standard error from the per-seed means (seeds are independent)."""
    d = np.abs(np.asarray(a) - np.asarray(b)).reshape(n_seeds, -1)
    per_seed = np.nanmean(d, axis=1)
    return float(np.nanmean(d)), float(np.std(per_seed, ddof=1) / np.sqrt(n_seeds)) if n_seeds > 1 else np.nan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100, help="seeds per scenario (>= 20 for the issue's figure)")
    ap.add_argument("--tau", type=float, default=0.5, help="SD of the per-site logit shift")
    ap.add_argument("--reps", type=int, default=200, help="repetitions of the timed summation")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ", ".join(SCENARIOS))
    ap.add_argument("--quick", action="store_true", help="6 seeds, 20 repetitions")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.reps = 6, 20
    start = time.perf_counter()
    n_pat, n_mal = sum(p.n_patients for p in SITES), sum(p.n_malignant for p in SITES)
    print("# Federated threshold, pooled-histogram AUC and ECE: per-site suppressed (today) vs secure sum (issue 21)")
    print(
        f"# cohort: simulations/sites.py SITES, {len(SITES)} sites, {n_pat} patients ({n_mal} malignant); sizes "
        + ", ".join(f"{p.n_patients}/{p.n_malignant}" for p in SITES)
        + " (patients/malignant)"
    )
    print(
        f"# tenfold k={K} (fold_of_key, fold seed {FOLD_SEED}), inner validation is_validation fraction "
        f"{VAL_FRACTION} (seed {SPLIT_SEED}); min cell {MIN_CELL}; {NB} bins; site logit shift SD tau={args.tau}; "
        f"{args.seeds} seeds per scenario"
    )
    for name, (bn, ml) in SCENARIOS.items():
        print(f"# scenario {name}: benign Beta{bn}, malignant Beta{ml}, score = expit(logit(x) + d_site)")
    for scenario in args.scenarios.split(","):
        res = [one_seed(seed, scenario, args.tau) for seed in range(args.seeds)]
        rows = np.concatenate([r["rows"] for r in res])  # (S*K, 4 methods, 2 sens/spec)
        sens, spec = rows[:, :, 0], rows[:, :, 1]
        st = {
            k: sum(r["stats"][k] for r in res)
            for k in ("fallback_a", "fallback_b", "flat_pos", "site_folds", "sat_out", "j_lower")
        }
        thr = np.array([t for r in res for t in r["stats"]["thr"]])
        pooled = {m: np.array([r["pooled"][m] for r in res]) for m in "abcd"}
        p_sens = {m: pooled[m][:, 0] / pooled[m][:, 1] for m in "abcd"}
        p_spec = {m: pooled[m][:, 2] / pooled[m][:, 3] for m in "abcd"}
        curves = {k: np.array([r["curves"][k] for r in res]) for k in ("exact", "today", "secure")}
        n_units = rows.shape[0]
        print(f"\n## scenario {scenario} ({args.seeds} seeds x {K} folds = {n_units} fold models)")
        print(
            f"estimand: mean absolute difference over {args.seeds} seeds x {K} folds, sensitivity (specificity) at the "
            "federated threshold vs at the exact pooled Youden threshold, on out-of-fold patients (fold f's test "
            "patients pooled over the sites)"
        )
        print(
            f"{'threshold':44} {'|d sens|':>9} {'(SE)':>7} {'|d spec|':>9} {'(SE)':>7} {'sens':>7} {'spec':>7} "
            f"{'thr mean':>9} {'|d thr|':>8}"
        )
        for i, label in (
            (0, "(a) today: per-site suppressed"),
            (1, "(b) secure sum, exact pooled hist"),
            (2, "(c) exact pooled Youden (raw, midpoints)"),
            (3, "(d) exact, choose_threshold rule (yardstick)"),
        ):
            d_sens, se_sens = _mean_abs_se(sens[:, i], sens[:, 2], args.seeds)
            d_spec, se_spec = _mean_abs_se(spec[:, i], spec[:, 2], args.seeds)
            d_thr = float(np.mean(np.abs(thr[:, i] - thr[:, 2])))
            print(
                f"{label:44} {d_sens:9.4f} {se_sens:7.4f} {d_spec:9.4f} {se_spec:7.4f} {np.nanmean(sens[:, i]):7.3f} "
                f"{np.nanmean(spec[:, i]):7.3f} {thr[:, i].mean():9.4f} {d_thr:8.4f}"
            )
        print(
            f"same, per seed with the ten folds pooled (the report's tenfold sensitivity/specificity): "
            f"(a) |d sens| {_mean_abs(p_sens['a'], p_sens['c']):.4f} |d spec| {_mean_abs(p_spec['a'], p_spec['c']):.4f}; "
            f"(b) |d sens| {_mean_abs(p_sens['b'], p_sens['c']):.4f} |d spec| {_mean_abs(p_spec['b'], p_spec['c']):.4f}; "
            f"(d) |d sens| {_mean_abs(p_sens['d'], p_sens['c']):.4f} |d spec| {_mean_abs(p_spec['d'], p_spec['c']):.4f}"
        )
        same_b = float(np.mean(np.all(np.isclose(rows[:, 1], rows[:, 2], equal_nan=True), axis=1)))
        d_b = _mean_abs(sens[:, 1], sens[:, 2]), _mean_abs(spec[:, 1], spec[:, 2])
        print(
            f"goal (b) <= {GOAL_THRESHOLD}: sens {'met' if d_b[0] <= GOAL_THRESHOLD else 'NOT met'}, spec "
            f"{'met' if d_b[1] <= GOAL_THRESHOLD else 'NOT met'}; (b) and (c) give identical test sens and spec in "
            f"{same_b:.0%} of folds; (b)'s validation Youden J below the exact maximum (the validation grid has no edge in "
            f"the optimal gap; otherwise a tie between equally good cuts) in {st['j_lower']}/{n_units} folds"
        )
        print(
            f"fell back to 0.5: (a) {st['fallback_a']}/{n_units}, (b) {st['fallback_b']}/{n_units} folds; site validation splits whose malignant "
            f"histogram the min cell count spread over all of [0, 1]: {st['flat_pos']}/{st['site_folds']}; "
            f"site x fold units sat out (no inner-train patient of a class): {st['sat_out']}"
        )
        ex = curves["exact"]
        print(f"pooled-histogram AUC and ECE of the out-of-fold scores (tenfold tag), mean over {args.seeds} seeds")
        print(f"{'pooling':34} {'AUC':>7} {'|d AUC|':>8} {'ECE':>7} {'|d ECE|':>8}")
        print(f"{'exact (raw scores)':34} {ex[:, 0].mean():7.4f} {'':8} {ex[:, 1].mean():7.4f}")
        for key, label in (
            ("today", "today: EM over per-site suppressed"),
            ("secure", "secure sum (pooled_histograms)"),
        ):
            c = curves[key]
            print(
                f"{label:34} {c[:, 0].mean():7.4f} {_mean_abs(c[:, 0], ex[:, 0]):8.4f} {c[:, 1].mean():7.4f} "
                f"{_mean_abs(c[:, 1], ex[:, 1]):8.4f}"
            )
        sec = curves["secure"]
        ok = _mean_abs(sec[:, 0], ex[:, 0]) <= GOAL_CURVES and _mean_abs(sec[:, 1], ex[:, 1]) <= GOAL_CURVES
        print(f"goal secure within {GOAL_CURVES}: {'met' if ok else 'NOT met'}")
    for cells, what in ((2 * NB, "report histograms"), (2 * M.N_VALIDATION_BINS, "validation histograms")):
        cost = summation_cost(args.reps, size=cells)
        print(
            f"\n## cost of one summation ({what}): {len(SITES)} sites, {cells}-cell vector, median of {args.reps} reps"
        )
        print(f"key pair per site       {cost['keygen'] * 1e3:8.3f} ms")
        print(
            f"mask per site           {cost['mask'] * 1e3:8.3f} ms  ({len(SITES) - 1} pairwise masks and a self mask)"
        )
        print(f"unmask + check (server) {cost['unmask'] * 1e3:8.3f} ms")
        print(f"bytes per masked vector {cost['bytes']:8d}     (uint32), {cost['bytes'] * len(SITES)} for all sites")
    print(f"# {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
