"""Patient-level metrics with honest confidence intervals, meta-analysis across sites, and histogram-based evaluation.

Conventions: label 1 = malignant (the positive class), 0 = benign; a score is the model's probability of malignancy
and ``score >= threshold`` calls a patient malignant. Everything returns plain Python floats/ints (NaN where a
quantity is undefined, e.g. sensitivity without malignant patients) so results are JSON-serialisable as they are.
Pure numpy/scipy/scikit-learn: no torch, no flwr.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, special, stats

NAN = float("nan")

# Equal-width bins on [0, 1]. 100 bins keep the within-bin tie error of the pooled AUC far below 0.005 for the score
# distributions a ResNet produces on a few hundred patients (measured in tests/test_metrics.py), and thresholds land
# on a 0.01 grid, finer than any operating point a report would quote. More bins would only make cells sparser, and
# sparse cells are what the minimum-cell-count rule has to merge away.
N_HIST_BINS = 100
# The top edge lies just above 1 so that every edge is a threshold the histogram resolves exactly: with a top edge of
# 1.0, "score >= 1.0" would need to tell a score of exactly 1.0 (a saturated float32 sigmoid) from 0.995 in the same
# last bin. The top edge as a threshold calls nobody malignant, on histograms and on scores alike.


def edges_for(bins: int) -> np.ndarray:
    """`bins` equal-width bins over [0, 1], the top edge just above 1 (see below)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    edges[-1] = 1.0 + 1e-9
    return edges


DEFAULT_EDGES = edges_for(N_HIST_BINS)
# The validation histograms that choose a threshold by secure sum (common/securesum.py) use a 0.001 grid: only their
# sum over sites reaches the coordinator and no cell of it is published, so nothing needs merging, and the Youden cut
# can fall between scores that crowd into a few hundredths (bench/threshold_quality.py).
N_VALIDATION_BINS = 1000

# Expected calibration error and reliability curves use 10 equal-width bins (the usual choice; with ~200 patients
# finer bins hold too few patients each).
N_CALIBRATION_BINS = 10

# Public coarse grid (twentieths) to which data-dependent cell edges are snapped by the minimum-cell-count rule.
# Measured on realistic sites (min count 5): 20 cells cost 0.074 mean |AUC error|, 10 cells 0.109, 5 cells 0.15.
N_COARSE_CELLS = 20


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def _check_binary(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels (0/1) and finite scores of equal length; return them as int64 / float64 arrays."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got shapes {y.shape} and {s.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (benign) or 1 (malignant); drop unlabelled patients first")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y.astype(np.int64), s


def _z(alpha: float) -> float:
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


# ----------------------------------------------------------------------------------------------------------------
# Proportions and the confusion matrix


def wilson_ci(k: float, n: float, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n; (nan, nan) when n == 0.

    Written out rather than taken from ``scipy.stats.binomtest`` because histogram-derived counts may be fractional
    after cell merging; for integers it equals scipy's ``proportion_ci(method="wilson")`` (tested).
    """
    if n <= 0:
        return NAN, NAN
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = _z(alpha)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1); the floating-point difference would give 5.6e-17 (1 − 1e-16).
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def proportion(k: float, n: float, alpha: float = 0.05) -> dict:
    """A proportion as ``{value, lo, hi, k, n, method}`` with its Wilson CI; value NaN when n == 0."""
    lo, hi = wilson_ci(k, n, alpha)
    as_num = int if float(k).is_integer() and float(n).is_integer() else float
    value = (k / n) if n > 0 else NAN
    return {"value": value, "lo": lo, "hi": hi, "k": as_num(k), "n": as_num(n), "method": "Wilson score"}


@dataclass(frozen=True)
class Confusion:
    """Counts of a 2×2 table; positive = malignant. Fields may be fractional when derived from merged histograms."""

    tp: float
    fp: float
    tn: float
    fn: float

    def as_dict(self) -> dict:
        return asdict(self)


def confusion(labels, scores, threshold) -> Confusion:
    """2×2 table at a threshold: ``score >= threshold`` → malignant (1). `threshold`: one value, or one per patient
    (each called at its own model's threshold)."""
    y, s = _check_binary(labels, scores)
    return confusion_of(y, s >= np.asarray(threshold, dtype=np.float64))


def confusion_of(labels, calls) -> Confusion:
    """2×2 table of calls already made (1/True: malignant): the one place confusion counts are made."""
    pred, pos = np.asarray(calls).astype(bool), np.asarray(labels) == 1
    return Confusion(
        tp=int((pred & pos).sum()),
        fp=int((pred & ~pos).sum()),
        tn=int((~pred & ~pos).sum()),
        fn=int((~pred & pos).sum()),
    )


def confusion_metrics(c: Confusion, alpha: float = 0.05) -> dict:
    """Accuracy, sensitivity, specificity, PPV, NPV of a 2×2 table, each a ``proportion`` dict with Wilson CI."""
    n = c.tp + c.fp + c.tn + c.fn
    return {
        "accuracy": proportion(c.tp + c.tn, n, alpha),
        "sensitivity": proportion(c.tp, c.tp + c.fn, alpha),
        "specificity": proportion(c.tn, c.tn + c.fp, alpha),
        "ppv": proportion(c.tp, c.tp + c.fp, alpha),
        "npv": proportion(c.tn, c.tn + c.fn, alpha),
    }


# ----------------------------------------------------------------------------------------------------------------
# AUC: DeLong


def _delong_components(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong structural components for one or several score rows (Sun & Xu 2014, midranks).

    ``scores`` is (r, N). Returns auc (r,), V10 (r, m) over positives, V01 (r, n) over negatives, where
    V10_i = P(score_i > negative) + ½ P(tie) and V01_j = P(positive > score_j) + ½ P(tie).
    """
    pos = labels == 1
    x, yneg = scores[:, pos], scores[:, ~pos]
    m, n = x.shape[1], yneg.shape[1]
    tx = stats.rankdata(x, axis=1)  # midranks ("average") handle ties as DeLong's ½ rule
    ty = stats.rankdata(yneg, axis=1)
    tz = stats.rankdata(np.concatenate([x, yneg], axis=1), axis=1)
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return auc, v10, v01


def _class_sizes(y: np.ndarray) -> tuple[int, int]:
    m = int(y.sum())
    return m, int(y.size - m)


def delong_auc(labels, scores) -> tuple[float, float]:
    """ROC AUC and its DeLong variance (DeLong et al. 1988, fast midrank algorithm of Sun & Xu 2014).

    var = S10/m + S01/n with S the sample variances (ddof=1) of the structural components. AUC is NaN when one class
    is absent; the variance is NaN when a class has a single patient (its sample variance is undefined).
    """
    y, s = _check_binary(labels, scores)
    m, n = _class_sizes(y)
    if m == 0 or n == 0:
        return NAN, NAN
    auc, v10, v01 = _delong_components(y, s[None, :])
    if m < 2 or n < 2:
        return float(auc[0]), NAN
    var = np.var(v10[0], ddof=1) / m + np.var(v01[0], ddof=1) / n
    return float(auc[0]), float(var)


def auc_ci(auc: float, var: float, alpha: float = 0.05, method: str = "logit") -> tuple[float, float]:
    """Confidence interval for an AUC from its variance.

    ``logit`` (default): symmetric on logit(AUC) with the delta-method SE sqrt(var)/(AUC(1−AUC)); stays inside
    (0, 1) and is better behaved near 1 than the plain interval (Pepe 2003, §4.2). At AUC 0 or 1 the logit is
    infinite and it falls back to ``normal``: AUC ± z·sqrt(var), clipped to [0, 1] (with DeLong var = 0 there, the
    interval collapses to the point: a known weakness of DeLong on perfectly separated small samples; per-site
    intervals therefore come from ``auc_interval``, which falls back to Newcombe's score interval there).
    """
    if not (np.isfinite(auc) and np.isfinite(var)) or var < 0:
        return NAN, NAN
    z = _z(alpha)
    if method == "logit" and 0.0 < auc < 1.0:
        se = math.sqrt(var) / (auc * (1.0 - auc))
        centre = special.logit(auc)
        return float(special.expit(centre - z * se)), float(special.expit(centre + z * se))
    if method not in ("logit", "normal"):
        raise ValueError(f"method must be 'logit' or 'normal', got {method!r}")
    half = z * math.sqrt(var)
    return max(0.0, auc - half), min(1.0, auc + half)


def delong_paired_test(labels, scores_a, scores_b, alpha: float = 0.05) -> dict:
    """DeLong test of two correlated AUCs on the same patients: difference A − B with normal CI and two-sided p.

    Var(A−B) = Var A + Var B − 2 Cov(A, B) from the covariance of the structural components (DeLong 1988).
    p is 1.0 when both score vectors rank the patients identically (zero variance and zero difference).
    """
    y, sa = _check_binary(labels, scores_a)
    _, sb = _check_binary(labels, scores_b)
    m, n = _class_sizes(y)
    out = {"auc_a": NAN, "auc_b": NAN, "difference": NAN, "var": NAN, "lo": NAN, "hi": NAN, "z": NAN, "p": NAN}
    if m < 2 or n < 2:
        if m and n:
            auc, _, _ = _delong_components(y, np.vstack([sa, sb]))
            out.update(auc_a=float(auc[0]), auc_b=float(auc[1]), difference=float(auc[0] - auc[1]))
        return out
    auc, v10, v01 = _delong_components(y, np.vstack([sa, sb]))
    cov = np.cov(v10) / m + np.cov(v01) / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(auc[0] - auc[1])
    out.update(auc_a=float(auc[0]), auc_b=float(auc[1]), difference=diff, var=max(var, 0.0))
    if var <= 1e-15:
        out.update(lo=diff, hi=diff, z=NAN, p=1.0 if diff == 0 else NAN)
        return out
    se = math.sqrt(var)
    zq = _z(alpha)
    zstat = diff / se
    out.update(lo=diff - zq * se, hi=diff + zq * se, z=zstat, p=float(2 * stats.norm.sf(abs(zstat))))
    return out


def auc_stat(labels, scores) -> float:
    """AUC (Mann–Whitney with ½ for ties) or NaN with one class; fast enough to be a bootstrap statistic."""
    y, s = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    m, n = _class_sizes(y)
    if m == 0 or n == 0:
        return NAN
    r = stats.rankdata(s)
    return float((r[y == 1].sum() - m * (m + 1) / 2.0) / (m * n))


def accuracy_stat(labels, predictions) -> float:
    """Fraction of 0/1 predictions equal to the labels (NaN when empty); a bootstrap statistic."""
    y, p = np.asarray(labels), np.asarray(predictions)
    return float((y == p).mean()) if y.size else NAN


# ----------------------------------------------------------------------------------------------------------------
# Calibration and the full metric set


def calibration_curve(labels, scores, n_bins: int = N_CALIBRATION_BINS) -> dict:
    """Reliability-plot data on equal-width bins over [0, 1]: per non-empty bin the mean score, observed fraction
    malignant and count.

    Same binning as ``sklearn.calibration.calibration_curve(strategy="uniform")`` (tested), plus the counts that a
    plot and the ECE need.
    """
    y, s = _check_binary(labels, scores)
    if y.size and (s.min() < 0 or s.max() > 1):
        raise ValueError("calibration needs probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], s)  # sklearn's rule: right-closed inner edges, last bin includes 1.0
    count = np.bincount(ids, minlength=n_bins)
    sum_s = np.bincount(ids, weights=s, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y, minlength=n_bins)
    keep = count > 0
    return {
        "prob_pred": (sum_s[keep] / count[keep]).tolist(),
        "prob_true": (sum_y[keep] / count[keep]).tolist(),
        "count": count[keep].astype(int).tolist(),
        "bin_lo": edges[:-1][keep].tolist(),
        "bin_hi": edges[1:][keep].tolist(),
    }


def expected_calibration_error(labels, scores, n_bins: int = N_CALIBRATION_BINS) -> float:
    """ECE = Σ_b (n_b/N)·|mean score_b − fraction malignant_b| over ``n_bins`` equal-width bins; NaN when empty."""
    cc = calibration_curve(labels, scores, n_bins)
    total = sum(cc["count"])
    if total == 0:
        return NAN
    gaps = np.abs(np.subtract(cc["prob_pred"], cc["prob_true"]))
    return float(np.dot(cc["count"], gaps) / total)


def binary_metrics(labels, scores, threshold: float, alpha: float = 0.05) -> dict:
    """The report's metric set at one threshold, JSON-ready.

    Proportions (accuracy, sensitivity, specificity, ppv, npv) as ``{value, lo, hi, k, n}`` with Wilson CIs; ``auc``
    as ``{value, lo, hi, var, method}`` from ``auc_interval`` (DeLong logit CI, Newcombe's where DeLong's is
    degenerate); ``brier`` and ``ece`` (10 equal-width
    bins) are NaN when scores are not probabilities in [0, 1]; plus ``confusion``, ``threshold``, n, n_pos, n_neg.
    """
    y, s = _check_binary(labels, scores)
    c = confusion(y, s, threshold)
    m, n = _class_sizes(y)
    auc, var = delong_auc(y, s)
    probs = y.size > 0 and s.min() >= 0 and s.max() <= 1
    out = confusion_metrics(c, alpha)
    out.update(
        auc=auc_interval(auc, var, m, n, alpha),
        brier=float(np.mean((s - y) ** 2)) if probs else NAN,
        ece=expected_calibration_error(y, s) if probs else NAN,
        ece_bins=N_CALIBRATION_BINS,
        confusion=c.as_dict(),
        threshold=float(threshold),
        n=int(y.size),
        n_pos=m,
        n_neg=n,
        alpha=float(alpha),
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap over sites


def _cluster_index(clusters) -> list[np.ndarray]:
    c = np.asarray(clusters)
    return [np.flatnonzero(c == u) for u in np.unique(c)]


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    if values.size == 0:
        return NAN, NAN
    lo, hi = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def cluster_bootstrap(
    labels,
    scores,
    clusters,
    stat_fn: Callable[[np.ndarray, np.ndarray], float] = auc_stat,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Percentile CI of ``stat_fn(labels, scores)`` resampling whole clusters (sites) with replacement.

    Patients of one site share scanner, population and (in FedBN) normalisation, so they are not independent: the site
    is the sampling unit. Replicates where the statistic is undefined (NaN, e.g. one class only) are dropped and
    counted in ``n_boot_valid``. With ~10 sites the percentile interval is somewhat too narrow; read it as such.
    """
    y, s = np.asarray(labels), np.asarray(scores)
    if y.shape != s.shape or y.shape != np.shape(clusters):
        raise ValueError("labels, scores and clusters must have the same length")
    groups = _cluster_index(clusters)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        idx = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))]) if groups else []
        reps.append(stat_fn(y[idx], s[idx]))
    reps = np.asarray(reps, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    lo, hi = _percentile_ci(reps, alpha)
    return {
        "estimate": float(stat_fn(y, s)),
        "lo": lo,
        "hi": hi,
        "n_boot": int(n_boot),
        "n_boot_valid": int(reps.size),
        "n_clusters": len(groups),
        "method": "cluster percentile bootstrap",
    }


def paired_bootstrap_over_sites(
    labels,
    values_a,
    values_b,
    sites,
    stat_fn: Callable[[np.ndarray, np.ndarray], float] = auc_stat,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Paired contrast stat(A) − stat(B) on the same patients, CI by resampling sites; for the generalization verdict.

    A and B are two protocols' outputs for the same patients in the same order (e.g. tenfold vs site-held-out scores
    with ``auc_stat``, or their 0/1 predictions with ``accuracy_stat``). Each replicate draws sites with replacement
    and evaluates both protocols on the same draw, so the between-protocol correlation is kept. ``p_boot`` is the
    two-sided bootstrap proportion 2·min(P(d ≤ 0), P(d ≥ 0)), approximate.
    """
    y, a, b = np.asarray(labels), np.asarray(values_a), np.asarray(values_b)
    if not (y.shape == a.shape == b.shape == np.shape(sites)):
        raise ValueError("labels, values_a, values_b and sites must have the same length")
    groups = _cluster_index(sites)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        diffs.append(stat_fn(y[idx], a[idx]) - stat_fn(y[idx], b[idx]))
    diffs = np.asarray(diffs, dtype=np.float64)
    diffs = diffs[np.isfinite(diffs)]
    est_a, est_b = float(stat_fn(y, a)), float(stat_fn(y, b))
    lo, hi = _percentile_ci(diffs, alpha)
    p = float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean()))) if diffs.size else NAN
    return {
        "estimate_a": est_a,
        "estimate_b": est_b,
        "difference": est_a - est_b,
        "lo": lo,
        "hi": hi,
        "p_boot": p,
        "n_boot": int(n_boot),
        "n_boot_valid": int(diffs.size),
        "n_clusters": len(groups),
        "method": "paired cluster percentile bootstrap over sites",
    }


# ----------------------------------------------------------------------------------------------------------------
# Random-effects meta-analysis
#
# Sites are few (3-10) and small (1-9 malignant cases at many). Two consequences drive the methods here: a normal
# quantile on the DerSimonian-Laird standard error under-covers (it ignores that tau^2 and the weights are estimated
# from a handful of sites), and the usual 0.5-corrected logit proportions are biased at sparse counts. Every summary
# therefore names its method and its estimand (what it describes: these patients, or the typical / a new site).

# What a random-effects summary (and its prediction interval) describes, and what pooled counts describe.
RE_ESTIMAND = (
    "random-effects summary over sites: the typical (median) site; the prediction interval is where a new site's "
    "value is expected"
)
POOLED_ESTIMAND = "pooled over the patients of these sites (patients treated as independent across sites)"
SINGLE_SITE = "single site (no pooling)"
HKSJ_METHOD = (
    "Hartung-Knapp-Sidik-Jonkman CI (t quantile, k minus one df; never narrower than DerSimonian-Laird) on "
    "Paule-Mandel tau^2"
)
GLMM_METHOD = (
    "binomial-normal random-effects model, maximum likelihood (adaptive Gauss-Hermite quadrature), Wald CI with a t "
    "quantile on k minus one df"
)


def _dl_tau2(y: np.ndarray, v: np.ndarray) -> float:
    w = 1.0 / v
    fixed = np.sum(w * y) / np.sum(w)
    q = float(np.sum(w * (y - fixed) ** 2))
    c = float(np.sum(w) - np.sum(w**2) / np.sum(w))
    return max(0.0, (q - (y.size - 1)) / c) if c > 0 else 0.0


def paule_mandel_tau2(estimates: Sequence[float], variances: Sequence[float]) -> float:
    """Paule-Mandel between-site variance: the tau^2 >= 0 at which the generalised Q statistic
    sum w_i (y_i - mu(tau^2))^2 with w_i = 1/(v_i + tau^2) equals k - 1 (Paule & Mandel 1982; recommended for few
    studies by Veroniki et al. 2016). Zero when Q at tau^2 = 0 is already <= k - 1. Solved by bracketing + Brent."""
    y = np.asarray(estimates, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    k = y.size
    if k < 2:
        return 0.0

    def excess(t2: float) -> float:
        w = 1.0 / (v + t2)
        mu = np.sum(w * y) / np.sum(w)
        return float(np.sum(w * (y - mu) ** 2) - (k - 1))

    if excess(0.0) <= 0:
        return 0.0
    hi = max(float(np.var(y, ddof=1)), 1e-12)
    while excess(hi) > 0:  # the generalised Q decreases in tau^2 towards 0
        hi *= 2.0
    return float(optimize.brentq(excess, 0.0, hi, xtol=1e-14, rtol=1e-12))


def random_effects_meta(
    estimates: Sequence[float], variances: Sequence[float], alpha: float = 0.05, method: str = "hksj"
) -> dict:
    """Random-effects pooling of per-site estimates with CI, heterogeneity and prediction interval.

    ``hksj`` (default): tau^2 by Paule-Mandel; mu = sum w*y / sum w*, w* = 1/(v + tau^2); CI mu +- t_{k-1} * SE with
    the Hartung-Knapp-Sidik-Jonkman SE^2 = max(1, q) / sum w*, q = sum w*(y - mu)^2/(k - 1) (Hartung & Knapp 2001;
    Sidik & Jonkman 2002; the max(1, q) safeguard of Knapp & Hartung 2003 / Roever et al. 2015), and the half-width
    never below DerSimonian-Laird's z * SE_DL. With k = 2 this is t with 1 df: honestly wide.
    ``dl``: the former method, DerSimonian-Laird tau^2 and a normal quantile (kept for the coverage benchmark).
    Both: Cochran's Q and I^2 from the fixed-effect fit; prediction interval mu +- t_{k-2} sqrt(tau^2 + SE^2)
    (Higgins, Thompson & Spiegelhalter 2009), NaN when k < 3. k = 1: that site's own normal interval, reported as a
    single site. Variances must be finite and > 0 (transform first: ``meta_proportions`` / ``meta_aucs``).
    """
    if method not in ("hksj", "dl"):
        raise ValueError(f"method must be 'hksj' or 'dl', got {method!r}")
    y = np.asarray(estimates, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    if y.shape != v.shape or y.ndim != 1:
        raise ValueError("estimates and variances must be 1-D of equal length")
    if not (np.isfinite(y).all() and np.isfinite(v).all()) or (v <= 0).any():
        raise ValueError("estimates must be finite and variances finite and > 0")
    k = int(y.size)
    name = HKSJ_METHOD if method == "hksj" else "DerSimonian-Laird, normal CI"
    out = {
        "k": k,
        "estimate": NAN,
        "se": NAN,
        "lo": NAN,
        "hi": NAN,
        "tau2": NAN,
        "q": NAN,
        "q_p": NAN,
        "i2": NAN,
        "pi_lo": NAN,
        "pi_hi": NAN,
        "fixed_estimate": NAN,
        "method": name,
        "tau2_method": "Paule-Mandel" if method == "hksj" else "DerSimonian-Laird",
        "estimand": RE_ESTIMAND,
        "weights": [],
    }
    if k == 0:
        return out
    z = _z(alpha)
    w = 1.0 / v
    fixed = float(np.sum(w * y) / np.sum(w))
    out["fixed_estimate"] = fixed
    if k == 1:
        se = math.sqrt(v[0])
        out.update(estimate=float(y[0]), se=se, lo=float(y[0] - z * se), hi=float(y[0] + z * se), weights=[1.0])
        out.update(method=SINGLE_SITE, estimand="that site alone")
        return out
    q = float(np.sum(w * (y - fixed) ** 2))
    tau2_dl = _dl_tau2(y, v)
    ws_dl = 1.0 / (v + tau2_dl)
    mu_dl = float(np.sum(ws_dl * y) / np.sum(ws_dl))
    se_dl = math.sqrt(1.0 / np.sum(ws_dl))
    out.update(q=q, q_p=float(stats.chi2.sf(q, k - 1)), i2=max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0)
    if method == "dl":
        tau2, mu, se, half = tau2_dl, mu_dl, se_dl, z * se_dl
        ws = ws_dl
    else:
        tau2 = paule_mandel_tau2(y, v)
        ws = 1.0 / (v + tau2)
        mu = float(np.sum(ws * y) / np.sum(ws))
        se_wald = math.sqrt(1.0 / np.sum(ws))
        scale = float(np.sum(ws * (y - mu) ** 2) / (k - 1))
        t = float(stats.t.ppf(1.0 - alpha / 2.0, k - 1))
        half = max(t * math.sqrt(max(scale, 1.0)) * se_wald, z * se_dl)
        se = half / t
        out.update(
            se_wald=se_wald,
            se_hk=math.sqrt(scale) * se_wald,  # unmodified HKSJ SE (statsmodels' sd_eff_w_re_hksj)
            hk_scale=scale,
            df=k - 1,
            dl_lo=mu_dl - z * se_dl,
            dl_hi=mu_dl + z * se_dl,
        )
    out.update(
        estimate=mu,
        se=se,
        lo=mu - half,
        hi=mu + half,
        tau2=tau2,
        weights=(ws / ws.sum()).tolist(),
    )
    if k >= 3:
        pi_half = float(stats.t.ppf(1.0 - alpha / 2.0, k - 2)) * math.sqrt(tau2 + se * se)
        out.update(pi_lo=mu - pi_half, pi_hi=mu + pi_half)
    return out


_BACK = ("estimate", "lo", "hi", "pi_lo", "pi_hi", "fixed_estimate", "dl_lo", "dl_hi")


def _back_transform(res: dict) -> dict:
    """Add probability-scale copies (expit) of a logit-scale meta-analysis result."""
    out = {f"logit_{key}": res[key] for key in ("estimate", "se", *_BACK[1:]) if key in res}
    out.update({key: val for key, val in res.items() if key not in ("se", "se_wald", "se_hk")})
    for key in _BACK:
        if key in res:
            out[key] = float(special.expit(res[key])) if np.isfinite(res[key]) else NAN
    out["scale"] = "logit, back-transformed"
    return out


def _logit_dl(est_var: list[tuple[float, float]], k_excluded: int, alpha: float, detail: str) -> dict:
    """The former method (kept for bench/stat_coverage.py): logit DerSimonian-Laird, normal CI, back-transformed."""
    res = random_effects_meta([e for e, _ in est_var], [v for _, v in est_var], alpha, method="dl")
    out = _back_transform(res)
    out["k_excluded"] = k_excluded
    out["method"] = f"logit DerSimonian-Laird ({detail}), normal CI"
    return out


def logit_proportion(k: float, n: float) -> tuple[float, float]:
    """logit(k/n) and its variance 1/k + 1/(n−k); a 0.5 continuity correction is added to both cells when one is 0.

    Used only by the former ``meta_proportions(method="dl")``: at sparse counts it is biased towards 0.5.
    """
    if n <= 0:
        raise ValueError("a proportion needs n > 0")
    if k == 0 or k == n:
        k, n = k + 0.5, n + 1.0
    return float(math.log(k / (n - k))), float(1.0 / k + 1.0 / (n - k))


# Gauss-Hermite rule (physicists': weight exp(-x^2)) for the adaptive quadrature of the binomial-normal likelihood.
_GH_X, _GH_W = np.polynomial.hermite.hermgauss(15)
_LOG_GH_W = np.log(_GH_W) + _GH_X**2


def _glmm_site_loglik(mu: float, tau: float, k: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, float, float]:
    """log P(k_i | n_i) under k_i ~ Bin(n_i, expit(mu + u_i)), u_i ~ N(0, tau^2), by adaptive Gauss-Hermite quadrature
    (nodes centred on each site's posterior mode and scaled by its curvature; Liu & Pierce 1994), with the first and
    second derivatives of the summed log-likelihood in mu (posterior moments of the score k - n p). Binomial
    coefficients omitted (constant in the parameters)."""
    t2 = tau * tau
    # Start between the site's own logit (half-corrected) and the prior mean, weighted by their precisions; then
    # Newton with steps capped at 1 (the log-integrand is concave, so capped Newton cannot diverge).
    ph = (k + 0.5) / (n + 1.0)
    prec = n * ph * (1.0 - ph)
    u = prec * (special.logit(ph) - mu) / (prec + 1.0 / t2)
    for _ in range(60):
        p = special.expit(mu + u)
        step = np.clip((k - n * p - u / t2) / (n * p * (1.0 - p) + 1.0 / t2), -1.0, 1.0)
        u += step
        if np.max(np.abs(step)) < 1e-8:
            break
    p = special.expit(mu + u)
    sigma = 1.0 / np.sqrt(n * p * (1.0 - p) + 1.0 / t2)
    x = u[:, None] + math.sqrt(2.0) * sigma[:, None] * _GH_X[None, :]
    eta = mu + x
    g = k[:, None] * -np.logaddexp(0.0, -eta) + (n - k)[:, None] * -np.logaddexp(0.0, eta) - x * x / (2.0 * t2)
    g = g + _LOG_GH_W[None, :]
    ll = special.logsumexp(g, axis=1)
    w = np.exp(g - ll[:, None])
    pe = special.expit(eta)
    score = k[:, None] - n[:, None] * pe
    m1 = np.sum(w * score, axis=1)
    d2 = float(np.sum(np.sum(w * (score * score - n[:, None] * pe * (1.0 - pe)), axis=1) - m1 * m1))
    ll = ll + np.log(math.sqrt(2.0) * sigma) - 0.5 * math.log(2.0 * math.pi * t2)
    return ll, float(np.sum(m1)), d2


_LOG_TAU_BOUNDS = (math.log(1e-4), math.log(20.0))


def glmm_proportions_fit(events: Sequence[float], totals: Sequence[float]) -> dict:
    """Maximum-likelihood fit of the binomial-normal random-intercept model logit p_i = mu + u_i, u_i ~ N(0, tau^2).

    Profile likelihood: for each tau, mu by Newton-Raphson (analytic derivatives of the quadrature); log tau by
    bounded Brent on [1e-4, 20]. SE(mu) from the observed information in (mu, tau) (numerical in tau); at the lower
    bound tau is reported as 0 and SE(mu) is the fixed-effect one. ``boundary``: every site at 0 % or 100 % (no finite
    MLE of mu; ``meta_proportions`` does not call the fit then).
    """
    k = np.asarray(events, dtype=np.float64)
    n = np.asarray(totals, dtype=np.float64)
    p0 = (k.sum() + 0.5) / (n.sum() + 1.0)
    state = {"mu": math.log(p0 / (1 - p0))}

    def mu_hat(tau: float) -> tuple[float, float, float]:
        mu = state["mu"]
        for _ in range(50):
            ll, d1, d2 = _glmm_site_loglik(mu, tau, k, n)
            step = d1 / d2 if d2 < 0 else -np.sign(d1)  # d2 < 0 away from separation; else a bounded step uphill
            step = float(np.clip(step, -2.0, 2.0))
            mu = min(max(mu - step, -30.0), 30.0)
            if abs(step) < 1e-9:
                break
        ll, d1, d2 = _glmm_site_loglik(mu, tau, k, n)
        state["mu"] = mu
        return mu, float(np.sum(ll)), d2

    res = optimize.minimize_scalar(
        lambda s: -mu_hat(math.exp(s))[1], bounds=_LOG_TAU_BOUNDS, method="bounded", options={"xatol": 1e-4}
    )
    s = float(res.x)
    at_floor = s <= _LOG_TAU_BOUNDS[0] + 1e-2
    if at_floor:
        ll_floor = -mu_hat(math.exp(_LOG_TAU_BOUNDS[0]))[1]
        at_floor = ll_floor <= res.fun + 1e-9
    tau = math.exp(_LOG_TAU_BOUNDS[0]) if at_floor else math.exp(s)
    mu, ll, d2 = mu_hat(tau)
    var_mu = -1.0 / d2 if d2 < 0 else math.inf
    if not at_floor:

        def f(m: float, t: float) -> float:
            return float(np.sum(_glmm_site_loglik(m, t, k, n)[0]))

        ht, hm = min(1e-4, tau / 2), 1e-4
        h_tt = -(f(mu, tau + ht) - 2 * ll + f(mu, tau - ht)) / ht**2
        h_mt = -(f(mu + hm, tau + ht) - f(mu + hm, tau - ht) - f(mu - hm, tau + ht) + f(mu - hm, tau - ht)) / (
            4 * hm * ht
        )
        det = -d2 * h_tt - h_mt * h_mt
        if d2 < 0 and h_tt > 0 and det > 0:
            var_mu = h_tt / det
    return {
        "mu": mu,
        "tau": 0.0 if at_floor else tau,
        "se": math.sqrt(var_mu) if np.isfinite(var_mu) else math.inf,
        "loglik": ll,
        "converged": bool(res.success),
        "boundary": bool(np.all(k == 0) or np.all(k == n)),
    }


def meta_proportions(
    events: Sequence[float], totals: Sequence[float], alpha: float = 0.05, method: str = "glmm"
) -> dict:
    """Random-effects summary of per-site proportions (sensitivity, specificity), probability scale plus logit copies.

    ``glmm`` (default): the binomial-normal model (Hamza, van Houwelingen & Stijnen 2008; univariate Chu & Cole 2006)
    fitted by maximum likelihood with adaptive Gauss-Hermite quadrature (scipy; ``glmm_proportions_fit``): exact
    binomial within-site likelihood, no continuity correction. CI expit(mu +- t_{k-1} SE), prediction interval
    expit(mu +- t_{k-2} sqrt(tau^2 + SE^2)) for k >= 3. If every site is at 0 % (or 100 %) there is no finite MLE and
    no between-site information: the estimate is 0 (1) and the CI the Wilson interval of the summed counts. k = 1:
    that site's Wilson interval. ``dl``: the former logit DerSimonian-Laird with a 0.5 continuity correction.
    Sites with total 0 are left out (``k_excluded``). The estimand is expit(mu), the median site's proportion.
    """
    pairs = [(k, n) for k, n in zip(events, totals, strict=True) if n > 0]
    if method == "dl":
        est_var = [logit_proportion(k, n) for k, n in pairs]
        return _logit_dl(est_var, len(events) - len(pairs), alpha, "0.5 continuity correction")
    if method != "glmm":
        raise ValueError(f"method must be 'glmm' or 'dl', got {method!r}")
    k = len(pairs)
    out: dict = {"k": k, "k_excluded": len(events) - k, "estimand": RE_ESTIMAND, "scale": "logit, back-transformed"}
    out.update({key: NAN for key in ("estimate", "lo", "hi", "pi_lo", "pi_hi", "tau2")})
    out.update({f"logit_{key}": NAN for key in ("estimate", "se", "lo", "hi", "pi_lo", "pi_hi")})
    out["method"] = GLMM_METHOD
    if k == 0:
        return out
    ev = np.array([p[0] for p in pairs], dtype=np.float64)
    tot = np.array([p[1] for p in pairs], dtype=np.float64)
    if k == 1 or np.all(ev == 0) or np.all(ev == tot):
        lo, hi = wilson_ci(ev.sum(), tot.sum(), alpha)
        out.update(estimate=float(ev.sum() / tot.sum()), lo=lo, hi=hi)
        if k == 1:
            out.update(method=f"{SINGLE_SITE}, Wilson", estimand="that site alone")
        else:
            out.update(
                tau2=0.0,
                method="every site at the same extreme (no finite ML estimate): Wilson interval of the summed counts",
            )
        return out
    fit = glmm_proportions_fit(ev, tot)
    mu, se, tau = fit["mu"], fit["se"], fit["tau"]
    t = float(stats.t.ppf(1.0 - alpha / 2.0, k - 1))
    logit = {"estimate": mu, "se": se, "lo": mu - t * se, "hi": mu + t * se, "pi_lo": NAN, "pi_hi": NAN}
    if k >= 3:
        pi_half = float(stats.t.ppf(1.0 - alpha / 2.0, k - 2)) * math.sqrt(tau * tau + se * se)
        logit.update(pi_lo=mu - pi_half, pi_hi=mu + pi_half)
    out.update({f"logit_{key}": val for key, val in logit.items()})
    for key in ("estimate", "lo", "hi", "pi_lo", "pi_hi"):
        out[key] = float(special.expit(logit[key])) if np.isfinite(logit[key]) else NAN
    out.update(tau2=tau * tau, df=k - 1, converged=fit["converged"], loglik=fit["loglik"])
    return out


def hanley_mcneil_var(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) variance of an AUC under its exponential approximation."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    return float((auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg))


def newcombe_auc_ci(auc: float, n_pos: int, n_neg: int, alpha: float = 0.05) -> tuple[float, float]:
    """Score-type ("Wilson-type") interval for an AUC: Newcombe (2006, Stat Med 25:559), method 5.

    The set of theta with (AUC - theta)^2 <= z^2 V(theta), V(theta) = theta(1-theta)/(m n) [1 + (N*-1)((1-theta)/
    (2-theta) + theta/(1+theta))], N* = (m+n)/2 (the Hanley-McNeil variance with the class sizes symmetrised).
    Like Wilson's interval it has non-zero width at AUC 0 or 1 and with tied scores, where DeLong's variance is 0.
    """
    if n_pos <= 0 or n_neg <= 0 or not np.isfinite(auc):
        return NAN, NAN
    z2 = _z(alpha) ** 2
    nstar = (n_pos + n_neg) / 2.0

    def f(theta: float) -> float:
        v = (
            theta
            * (1 - theta)
            / (n_pos * n_neg)
            * (1 + (nstar - 1) * ((1 - theta) / (2 - theta) + theta / (1 + theta)))
        )
        return (auc - theta) ** 2 - z2 * v

    eps = 1e-12
    lo = 0.0 if auc <= eps else float(optimize.brentq(f, 0.0, auc - eps if auc < 1 else 1 - eps, xtol=1e-14))
    hi = 1.0 if auc >= 1 - eps else float(optimize.brentq(f, auc + eps if auc > 0 else eps, 1.0, xtol=1e-14))
    return lo, hi


def auc_interval(auc: float, var: float, n_pos: int, n_neg: int, alpha: float = 0.05) -> dict:
    """One site's AUC with a CI that never has zero width: ``{value, lo, hi, var, method[, note]}``.

    DeLong variance with the logit CI (``auc_ci``) when 0 < AUC < 1 and the variance is > 0; otherwise (AUC 0 or 1,
    every score tied, a class of one patient) Newcombe's score-type interval (``newcombe_auc_ci``). With a class
    missing there is no AUC: value NaN and a note with the reason.
    """
    out = {"value": NAN, "lo": NAN, "hi": NAN, "var": var, "method": "n/a"}
    if n_pos <= 0 or n_neg <= 0 or not np.isfinite(auc):
        out["note"] = "no malignant patients" if n_pos <= 0 else "no benign patients"
        return out
    out["value"] = float(auc)
    if np.isfinite(var) and var > 0 and 0.0 < auc < 1.0:
        lo, hi = auc_ci(auc, var, alpha)
        out.update(lo=lo, hi=hi, method="DeLong, logit CI")
    else:
        lo, hi = newcombe_auc_ci(auc, n_pos, n_neg, alpha)
        why = "DeLong variance zero or undefined" if 0.0 < auc < 1.0 else "perfect or reversed separation"
        out.update(lo=lo, hi=hi, method=f"Newcombe score interval for the AUC ({why})")
    return out


def logit_auc(auc: float, var: float, n_pos: int, n_neg: int) -> tuple[float, float]:
    """logit(AUC) and its delta-method variance var/(AUC(1−AUC))², made finite for small, separable sites.

    The AUC is pulled half a pair inside, [½/(m·n), 1 − ½/(m·n)], so a perfect site has a finite logit; where the
    given variance is 0 or undefined the Hanley–McNeil variance at the clipped AUC is used. ``meta_aucs`` no longer
    weights by this variance (it grows like 1/(AUC(1-AUC)) and so down-weights exactly the best sites); kept for the
    former method and for callers.
    """
    if n_pos <= 0 or n_neg <= 0 or not np.isfinite(auc):
        raise ValueError("an AUC needs both classes")
    eps = 0.5 / (n_pos * n_neg)
    a = min(max(auc, eps), 1.0 - eps)
    if not np.isfinite(var) or var <= 0:
        var = hanley_mcneil_var(a, n_pos, n_neg)
    return float(special.logit(a)), float(var / (a * (1 - a)) ** 2)


def logit_auc_rows(
    aucs: Sequence[float], n_pos: Sequence[int], n_neg: Sequence[int], centre: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-site (logit AUC, variance) as ``meta_aucs`` pools them, at the pooled AUC `centre`: the one home of that
    transform (``meta_aucs``; the acquisition meta-regression in server/stratified.py).

    With N_i = c(1-c)/V_HM(c; m_i, n_i) the effective binomial size of site i's AUC at c (Hanley-McNeil variance),
    the AUC is clipped to [1/2, N_i + 1/2]/(N_i + 1) (half an effective case, as Haldane for a proportion at 0 or 1),
    so a perfect site is finite and does not pull the pooled logit up; its variance is 1/(N_i c(1-c)), which depends
    on the class sizes only."""
    c = min(max(float(centre), 0.5), 1.0 - 1e-6)  # the variance at an AUC below ½ mirrors the one above
    m = np.asarray(n_pos, dtype=np.float64)
    n = np.asarray(n_neg, dtype=np.float64)
    auc = np.asarray(aucs, dtype=np.float64)
    neff = c * (1 - c) / np.array([hanley_mcneil_var(c, p, q) for p, q in zip(m, n, strict=True)])
    y = special.logit(np.clip(auc, 0.5 / (neff + 1.0), (neff + 0.5) / (neff + 1.0)))
    return y, 1.0 / (neff * c * (1 - c))


def meta_aucs(
    aucs: Sequence[float],
    variances: Sequence[float],
    n_pos: Sequence[int],
    n_neg: Sequence[int],
    alpha: float = 0.05,
    method: str = "hksj",
) -> dict:
    """Random-effects pooling of per-site AUCs on the logit scale; sites with one class left out (``k_excluded``).

    ``hksj`` (default): with N_i = c(1-c)/V_HM(c; m_i, n_i) the effective binomial size of site i's AUC at the
    pooled AUC c (Hanley-McNeil variance V_HM; three passes), the site enters as its logit AUC, clipped to
    [1/2, N_i + 1/2]/(N_i + 1), with variance 1/(N_i c(1-c)): finite for a perfect site, and a site's weight depends on its class sizes only: a perfect site of 5 malignant / 15 benign patients weighs as
    much as any other site of that size (the sites' own DeLong variances give their per-site CIs). Pooled with
    ``random_effects_meta(method="hksj")``; HKSJ's scale factor absorbs any misfit of these variances.
    ``dl``: the former method (``logit_auc`` variances, DerSimonian-Laird, normal CI).
    Estimand: expit(mu), the median site's AUC; the prediction interval is for a new site.
    """
    rows = [
        (a, v, p, n)
        for a, v, p, n in zip(aucs, variances, n_pos, n_neg, strict=True)
        if p > 0 and n > 0 and np.isfinite(a)
    ]
    if method == "dl":
        est_var = [logit_auc(*r) for r in rows]
        return _logit_dl(est_var, len(aucs) - len(rows), alpha, "DeLong/Hanley-McNeil variances")
    if method != "hksj":
        raise ValueError(f"method must be 'hksj' or 'dl', got {method!r}")
    if not rows:
        out = _back_transform(random_effects_meta([], [], alpha))
        out["k_excluded"] = len(aucs)
        return out
    m = [r[2] for r in rows]
    n = [r[3] for r in rows]
    auc = [r[0] for r in rows]
    centre = float(np.clip(np.mean(auc), 0.5, 0.99))
    for _ in range(3):
        y, v = logit_auc_rows(auc, m, n, centre)
        res = random_effects_meta(y, v, alpha)
        centre = float(special.expit(res["estimate"]))
    out = _back_transform(res)
    out["k_excluded"] = len(aucs) - len(rows)
    out["method"] = f"logit AUC, Hanley-McNeil variance at the pooled AUC; {res['method']}"
    out["site_logit_variances"] = v.tolist()
    return out


def meta_auc_differences(
    diffs: Sequence[float],
    variances: Sequence[float],
    n_pos: Sequence[int],
    n_neg: Sequence[int],
    aucs: Sequence[float] | None = None,
    alpha: float = 0.05,
    method: str = "hksj",
) -> dict:
    """Random-effects pooling of per-site paired AUC differences (A − B on the same patients, e.g. tenfold −
    site-held-out), raw AUC scale; every site given is used.

    ``hksj`` (default): within-site variances c/h_i with h = m·n/(m + n) (a DeLong variance scales like 1/m + 1/n)
    and c the median of v_j·h_j over the sites whose paired DeLong variance v_j is > 0, so weights depend on size
    only. A site whose DeLong variance is 0 or undefined (both protocols rank its patients identically or separate
    them perfectly; a class of one patient) is therefore used like any other (indices in ``imputed``). With no
    positive variance at all, c/h_i is replaced by twice the Hanley–McNeil variance at the sites' mean AUC (``aucs``,
    else 0.75; correlation ignored, so conservative). Pooled by ``random_effects_meta(method="hksj")``. ``dl``: the former rule (sites with variance <= 0 dropped, listed in
    ``dropped``; DerSimonian–Laird, normal CI), kept for the coverage benchmark.
    """
    d = np.asarray(diffs, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    m = np.asarray(n_pos, dtype=np.float64)
    n = np.asarray(n_neg, dtype=np.float64)
    if not (d.shape == v.shape == m.shape == n.shape) or (m <= 0).any() or (n <= 0).any():
        raise ValueError("diffs, variances, n_pos, n_neg must have equal length and both classes at every site")
    ok = np.isfinite(v) & (v > 0)
    if method == "dl":
        res = random_effects_meta(d[ok], v[ok], alpha, method="dl")
        res["dropped"] = np.flatnonzero(~ok).tolist()
        return res
    if method != "hksj":
        raise ValueError(f"method must be 'hksj' or 'dl', got {method!r}")
    h = m * n / (m + n)
    v = v.copy()
    if ok.any():
        # Every site, not only the imputed ones: a DeLong variance is smallest exactly where both protocols are near
        # perfect and the difference near 0, so weighting by it biases the pooled difference towards 0.
        v = float(np.median(v[ok] * h[ok])) / h
    else:
        a = float(np.nanmean(aucs)) if aucs is not None and np.isfinite(aucs).any() else 0.75
        for i in range(v.size):
            c = min(max(a, 0.5), 1.0 - 0.5 / (m[i] * n[i]))
            v[i] = 2.0 * hanley_mcneil_var(c, int(m[i]), int(n[i]))
    res = random_effects_meta(d, v, alpha, method="hksj")
    res["imputed"] = np.flatnonzero(~ok).tolist()
    res["variances_used"] = v.tolist()
    return res


META_REGRESSION_METHOD = (
    "random-effects meta-regression (weighted least squares on Paule-Mandel residual tau^2; Knapp-Hartung "
    "covariance scaled by max(1, residual Q/(k - p)), t quantile on k - p df)"
)


def meta_regression(estimates: Sequence[float], variances: Sequence[float], design, alpha: float = 0.05) -> dict:
    """Random-effects meta-regression y_i = x_i' beta + u_i + e_i, u_i ~ N(0, tau^2), e_i ~ N(0, v_i).

    tau^2: the generalised Paule-Mandel value, where the weighted residual sum of squares at the WLS fit equals
    k - p (0 when it is already below at tau^2 = 0); beta by WLS with w = 1/(v + tau^2); covariance
    max(1, Q_res/(k - p)) (X'WX)^-1 (Knapp & Hartung 2003, with the safeguard of ``random_effects_meta``); CIs and
    two-sided p-values with a t quantile on k - p df. With an intercept only it is ``random_effects_meta``'s
    estimate and tau^2. Returns NaN intervals when k - p < 1 (no residual df: nothing is left to estimate tau^2).
    """
    y = np.asarray(estimates, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    x = np.asarray(design, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != y.size or y.shape != v.shape:
        raise ValueError("design must be k x p with one row per estimate")
    if not (np.isfinite(y).all() and np.isfinite(v).all()) or (v <= 0).any():
        raise ValueError("estimates must be finite and variances finite and > 0")
    k, p = x.shape
    if np.linalg.matrix_rank(x) < p:
        raise ValueError("the design matrix is rank deficient (a level without any estimate?)")
    df = k - p

    def fit(t2: float) -> tuple[np.ndarray, np.ndarray, float]:
        w = 1.0 / (v + t2)
        xtw = x.T * w
        inv = np.linalg.inv(xtw @ x)
        beta = inv @ (xtw @ y)
        r = y - x @ beta
        return beta, inv, float(np.sum(w * r * r))

    nan = np.full(p, NAN)
    out: dict = {"k": int(k), "p": int(p), "df": int(df), "method": META_REGRESSION_METHOD, "tau2": NAN}
    if df < 1:
        beta, _, _ = fit(0.0)
        out.update(coef=beta.tolist(), se=nan.tolist(), lo=nan.tolist(), hi=nan.tolist(), p_value=nan.tolist())
        out["note"] = f"{k} estimate(s) for {p} parameter(s): no residual degree of freedom, no interval"
        return out
    tau2 = 0.0
    if fit(0.0)[2] > df:
        hi = max(float(np.var(y, ddof=1)), 1e-12)
        while fit(hi)[2] > df:
            hi *= 2.0
        tau2 = float(optimize.brentq(lambda t2: fit(t2)[2] - df, 0.0, hi, xtol=1e-14, rtol=1e-12))
    beta, inv, q = fit(tau2)
    cov = max(1.0, q / df) * inv
    se = np.sqrt(np.diag(cov))
    t = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    pval = 2.0 * stats.t.sf(np.abs(beta / se), df)
    out.update(coef=beta.tolist(), se=se.tolist(), lo=(beta - t * se).tolist(), hi=(beta + t * se).tolist())
    out.update(p_value=pval.tolist(), tau2=tau2, q_res=q, cov=cov.tolist())
    if p >= 2:  # every coefficient but the intercept at once (an F test on Knapp-Hartung's covariance)
        b, c = beta[1:], cov[1:, 1:]
        f = float(b @ np.linalg.solve(c, b)) / (p - 1)
        out["omnibus"] = {"f": f, "df1": int(p - 1), "df2": int(df), "p": float(stats.f.sf(f, p - 1, df))}
    return out


# ----------------------------------------------------------------------------------------------------------------
# McNemar


def mcnemar_exact(b: int, c: int) -> dict:
    """Exact two-sided McNemar test on the discordant pairs b, c: binomial test of b out of b + c at ½.

    p = 1.0 when there are no discordant pairs.
    """
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    b, c = int(b), int(c)
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return {"b": b, "c": c, "n_discordant": b + c, "p": p, "method": "exact binomial McNemar"}


def mcnemar_paired(correct_a, correct_b) -> dict:
    """McNemar from two paired correctness vectors: b = A right & B wrong, c = A wrong & B right."""
    a = np.asarray(correct_a, dtype=bool)
    bb = np.asarray(correct_b, dtype=bool)
    if a.shape != bb.shape:
        raise ValueError("correctness vectors must have the same length")
    out = mcnemar_exact(int((a & ~bb).sum()), int((~a & bb).sum()))
    out.update(
        n=int(a.size), accuracy_a=float(a.mean()) if a.size else NAN, accuracy_b=float(bb.mean()) if a.size else NAN
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Histogram-based evaluation (what a site sends instead of per-patient scores)


def score_histogram(labels, scores, edges: np.ndarray = DEFAULT_EDGES) -> tuple[np.ndarray, np.ndarray]:
    """Per-class counts of scores in shared bins: (malignant counts, benign counts).

    Bin b is [edges[b], edges[b+1]) and the last bin is closed, so ``score >= edges[j]`` ⇔ bin ≥ j and metrics at a
    threshold on an edge match ``confusion`` exactly. Scores outside [edges[0], edges[-1]] are an error.
    """
    y, s = _check_binary(labels, scores)
    edges = np.asarray(edges, dtype=np.float64)
    if s.size and (s.min() < edges[0] or s.max() > edges[-1]):
        raise ValueError("scores outside the histogram range")
    nb = edges.size - 1
    ids = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, nb - 1)
    return np.bincount(ids[y == 1], minlength=nb), np.bincount(ids[y == 0], minlength=nb)


def histogram_auc(hist_pos, hist_neg) -> float:
    """AUC from per-class histograms on the same bins; a positive and a negative in one bin count ½.

    Histograms of several sites on the shared edges can be summed first: the result is the pooled AUC at bin resolution.
    Counts may be fractional (merged cells). NaN when a class is empty.
    """
    hp = np.asarray(hist_pos, dtype=np.float64)
    hn = np.asarray(hist_neg, dtype=np.float64)
    if hp.shape != hn.shape:
        raise ValueError("histograms must have the same bins")
    m, n = hp.sum(), hn.sum()
    if m <= 0 or n <= 0:
        return NAN
    below = np.cumsum(hn) - hn
    return float(np.sum(hp * (below + 0.5 * hn)) / (m * n))


def histogram_roc(hist_pos, hist_neg, edges: np.ndarray = DEFAULT_EDGES) -> dict:
    """ROC points at every bin edge (threshold = edge, ``score >= threshold`` positive), from high to low thresholds."""
    hp = np.asarray(hist_pos, dtype=np.float64)
    hn = np.asarray(hist_neg, dtype=np.float64)
    tp = np.concatenate([np.cumsum(hp[::-1])[::-1], [0.0]])  # tp[j]: positives in bins >= j
    fp = np.concatenate([np.cumsum(hn[::-1])[::-1], [0.0]])
    m, n = hp.sum(), hn.sum()
    return {
        "threshold": np.asarray(edges, dtype=np.float64)[::-1].tolist(),
        "tpr": (tp[::-1] / m).tolist() if m > 0 else [],
        "fpr": (fp[::-1] / n).tolist() if n > 0 else [],
    }


def regrid(hist, bins: int) -> np.ndarray:
    """A histogram on another equal-width grid of [0, 1]: finer spreads each cell evenly, coarser sums cells."""
    h = np.asarray(hist, dtype=np.float64)
    if h.size == bins:
        return h
    if bins % h.size == 0:
        return np.repeat(h / (bins // h.size), bins // h.size)
    if h.size % bins == 0:
        return h.reshape(bins, -1).sum(axis=1)
    raise ValueError(f"cannot regrid {h.size} bins to {bins}")


def histogram_confusion(hist_pos, hist_neg, threshold: float, edges: np.ndarray = DEFAULT_EDGES) -> Confusion:
    """2×2 table at a threshold that must be one of the bin edges (bins at or above it are called malignant)."""
    edges = np.asarray(edges, dtype=np.float64)
    hits = np.flatnonzero(np.isclose(edges, threshold, rtol=0, atol=1e-12))
    if hits.size != 1:
        raise ValueError(f"threshold {threshold} is not a bin edge; histograms only resolve thresholds on edges")
    j = int(hits[0])
    hp = np.asarray(hist_pos, dtype=np.float64)
    hn = np.asarray(hist_neg, dtype=np.float64)
    tp, fp = hp[j:].sum(), hn[j:].sum()
    c = Confusion(tp=float(tp), fp=float(fp), tn=float(hn.sum() - fp), fn=float(hp.sum() - tp))
    if all(float(v).is_integer() for v in asdict(c).values()):
        c = Confusion(*(int(v) for v in asdict(c).values()))
    return c


def histogram_metrics(
    hist_pos, hist_neg, threshold: float, edges: np.ndarray = DEFAULT_EDGES, alpha: float = 0.05
) -> dict:
    """Accuracy/sensitivity/specificity/PPV/NPV (Wilson CIs) at a bin-edge threshold plus the histogram AUC.

    Sum the sites' histograms first for pooled metrics. No AUC CI here: the pooled AUC's CI comes from the sites'
    own DeLong variances (meta-analysis) or a site-level bootstrap, not from binned counts.
    """
    c = histogram_confusion(hist_pos, hist_neg, threshold, edges)
    out = confusion_metrics(c, alpha)
    out.update(
        auc=histogram_auc(hist_pos, hist_neg),
        confusion=c.as_dict(),
        threshold=float(threshold),
        n_pos=float(np.sum(hist_pos)),
        n_neg=float(np.sum(hist_neg)),
    )
    return out


def _merge_runs(hist: np.ndarray, min_count: float, n_coarse: int) -> list[tuple[int, int]]:
    """Runs [start, stop) of bins, each holding >= min_count, with data-dependent edges snapped to a public coarse grid.

    Occupied bins are grouped greedily from low to high scores until each group reaches min_count (a short remainder
    joins the last group). A group that is one fine bin keeps it; a wider group is widened outward to the coarse grid,
    so its released edges say no more than "some patient lies in this coarse cell"; overlapping runs are merged.
    A class with fewer than min_count patients in all becomes one run over the whole range.
    """
    nb = hist.size
    nz = np.flatnonzero(hist > 0)
    if nz.size == 0:
        return []
    if hist.sum() < min_count:
        return [(0, nb)]
    groups: list[list[int]] = []
    acc, cur = 0.0, []
    for b in nz:
        cur.append(int(b))
        acc += hist[b]
        if acc >= min_count:
            groups.append(cur)
            acc, cur = 0.0, []
    if cur:
        groups[-1].extend(cur)
    coarse = np.unique(np.round(np.linspace(0, nb, n_coarse + 1)).astype(int))
    runs: list[tuple[int, int]] = []
    for g in groups:
        start, stop = g[0], g[-1] + 1
        if stop - start > 1:
            start = int(coarse[coarse <= start].max())
            stop = int(coarse[coarse >= stop].min())
        if runs and start < runs[-1][1]:
            runs[-1] = (runs[-1][0], max(stop, runs[-1][1]))
        else:
            runs.append((start, stop))
    return runs


def suppress_small_cells(hist, min_count: float = 5, rule: str = "merge", n_coarse: int = N_COARSE_CELLS) -> np.ndarray:
    """Apply the minimum-cell-count rule a site uses on one class's histogram before sending it.

    ``merge`` (default): group the patients into runs of adjacent bins holding >= min_count each (edges snapped to a
    public grid of ``n_coarse`` cells unless the run is a single fine bin, see ``_merge_runs``) and spread each run's
    count evenly over its bins. Counts become fractional but stay on the shared edges, so sites still sum bin by bin,
    and every released cell describes >= min_count patients or none. ``zero``: cells below min_count are set to 0
    (those patients vanish). ``merge`` loses far less pooled-AUC accuracy (``suppression_cost``, measured in
    tests/test_metrics.py): at sites with 5-40 patients most fine cells hold one patient, and ``zero`` drops them.
    """
    h = np.asarray(hist, dtype=np.float64)
    if min_count <= 1:
        return h.copy()
    if rule == "zero":
        return np.where(h >= min_count, h, 0.0)
    if rule != "merge":
        raise ValueError(f"rule must be 'merge' or 'zero', got {rule!r}")
    out = np.zeros_like(h)
    for start, stop in _merge_runs(h, min_count, n_coarse):
        out[start:stop] = h[start:stop].sum() / (stop - start)
    return out


def histogram_cells(hist) -> list[tuple[int, int, float]]:
    """Recover the released cells (start, stop, count) of a sent histogram: maximal runs of equal non-zero bins.

    Two adjacent merged cells of equal density read as one wider cell; that only weakens the EM constraint slightly.
    """
    h = np.asarray(hist, dtype=np.float64)
    cells, b = [], 0
    while b < h.size:
        if h[b] <= 0:
            b += 1
            continue
        stop = b + 1
        while stop < h.size and np.isclose(h[stop], h[b], rtol=1e-12, atol=0):
            stop += 1
        cells.append((b, stop, float(h[b:stop].sum())))
        b = stop
    return cells


def pooled_histogram_em(site_hists: Sequence, n_iter: int = 500, tol: float = 1e-9) -> np.ndarray:
    """Pool one class's site histograms, redistributing merged cells by the pooled density (interval-censored EM).

    Each released cell says "count patients somewhere in [start, stop)". Spreading it evenly assumes a flat density,
    which drags a small site's malignant cell (often the whole range) towards 0.5. The self-consistency (Turnbull)
    iteration instead shares each cell's count in proportion to the pooled density of all sites within the cell,
    i.e. it assumes a site's censored patients score like the federation's patients of the same class in that range.
    Totals are preserved; with unsuppressed histograms it returns their plain sum.
    """
    hists = [np.asarray(h, dtype=np.float64) for h in site_hists]
    if not hists:
        raise ValueError("no histograms to pool")
    nb = hists[0].size
    cells = [c for h in hists for c in histogram_cells(h)]
    f = np.sum(hists, axis=0)
    for _ in range(n_iter):
        new = np.zeros(nb)
        for start, stop, count in cells:
            w = f[start:stop]
            ws = w.sum()
            new[start:stop] += count * (w / ws if ws > 0 else 1.0 / (stop - start))
        done = np.max(np.abs(new - f)) < tol
        f = new
        if done:
            break
    return f


def site_histograms(
    labels,
    scores,
    sites,
    edges: np.ndarray = DEFAULT_EDGES,
    min_count: float = 0,
    rule: str = "merge",
    n_coarse: int = N_COARSE_CELLS,
) -> dict:
    """Per-site (malignant, benign) histograms as a site would send them, suppression applied when min_count > 1."""
    y, s = _check_binary(labels, scores)
    site_arr = np.asarray(sites)
    out = {}
    for site in np.unique(site_arr):
        sel = site_arr == site
        hp, hn = score_histogram(y[sel], s[sel], edges)
        out[site.item() if hasattr(site, "item") else site] = (
            suppress_small_cells(hp, min_count, rule, n_coarse),
            suppress_small_cells(hn, min_count, rule, n_coarse),
        )
    return out


def suppression_cost(
    labels,
    scores,
    sites,
    min_count: float = 5,
    rule: str = "merge",
    edges: np.ndarray = DEFAULT_EDGES,
    n_coarse: int = N_COARSE_CELLS,
    em: bool = True,
) -> dict:
    """How far the pooled AUC from summed site histograms lies from the exact pooled AUC, without and with suppression.

    Returns exact_auc, hist_auc (no suppression), suppressed_auc (merged cells spread evenly and summed),
    suppressed_em_auc (pooled with ``pooled_histogram_em``), and their signed errors; used to state the cost of the
    minimum-cell-count rule in the report's closing note.
    """
    exact = auc_stat(*_check_binary(labels, scores))
    plain = list(site_histograms(labels, scores, sites, edges, 0).values())
    sent = list(site_histograms(labels, scores, sites, edges, min_count, rule, n_coarse).values())
    hist_auc = histogram_auc(np.sum([h[0] for h in plain], axis=0), np.sum([h[1] for h in plain], axis=0))
    uniform = histogram_auc(np.sum([h[0] for h in sent], axis=0), np.sum([h[1] for h in sent], axis=0))
    em_auc = (
        histogram_auc(pooled_histogram_em([h[0] for h in sent]), pooled_histogram_em([h[1] for h in sent]))
        if em
        else NAN
    )
    return {
        "exact_auc": exact,
        "hist_auc": hist_auc,
        "suppressed_auc": uniform,
        "suppressed_em_auc": em_auc,
        "hist_error": hist_auc - exact,
        "suppressed_error": uniform - exact,
        "suppressed_em_error": em_auc - exact,
        "min_count": min_count,
        "rule": rule,
        "n_bins": int(np.asarray(edges).size - 1),
        "n_coarse": n_coarse,
    }
