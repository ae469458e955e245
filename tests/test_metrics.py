"""Tests for common/metrics.py: hand-computed cases, scikit-learn agreement, brute-force DeLong, histogram AUC."""

import json
import math

import numpy as np
import pytest
from scipy import special, stats
from sklearn.calibration import calibration_curve as sk_calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from common import metrics as M


def _brute_delong(labels, scores):
    """DeLong's structural components by definition: psi(x, y) = 1 if x > y, ½ if equal, 0 otherwise."""
    y, s = np.asarray(labels), np.asarray(scores, dtype=float)
    x, z = s[y == 1], s[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return psi.mean(), v10, v01


def _realistic_cohort(seed, n_sites=12, overconfidence=1.0):
    """~250 patients in sites of 5-40, ~26% malignant, logit-normal scores with a site shift (AUC ≈ 0.9)."""
    rng = np.random.default_rng(seed)
    y, s, site = [], [], []
    for i, n in enumerate(rng.integers(5, 41, n_sites)):
        lab = (rng.random(n) < 0.26).astype(int)
        logit = 1.5 * overconfidence * (np.where(lab == 1, 1.05, -1.05) + rng.normal(0, 1, n) + rng.normal(0, 0.4))
        y += lab.tolist()
        s += special.expit(logit).tolist()
        site += [f"site{i}"] * n
    return np.array(y), np.array(s), np.array(site)


# ---------------------------------------------------------------- proportions


def test_wilson_against_hand_formula_and_scipy():
    # 40/50, z = 1.959964: centre (0.8 + z²/100)/(1 + z²/50) = 0.77859, half-width 0.10897 (worked by hand)
    lo, hi = M.wilson_ci(40, 50)
    assert lo == pytest.approx(0.66962, abs=1e-4)
    assert hi == pytest.approx(0.88756, abs=1e-4)
    for k, n in [(0, 7), (7, 7), (3, 11), (47, 50)]:
        ref = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert M.wilson_ci(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert all(math.isnan(v) for v in M.wilson_ci(0, 0))


def test_confusion_and_metrics_on_a_known_table():
    # tp 40, fn 10, tn 120, fp 20
    labels = [1] * 50 + [0] * 140
    scores = [0.9] * 40 + [0.1] * 10 + [0.2] * 120 + [0.7] * 20
    c = M.confusion(labels, scores, 0.5)
    assert (c.tp, c.fp, c.tn, c.fn) == (40, 20, 120, 10)
    assert M.confusion(labels, scores, 0.7).fp == 20  # score == threshold counts as malignant
    m = M.binary_metrics(labels, scores, 0.5)
    assert m["sensitivity"]["value"] == pytest.approx(0.8)
    assert m["specificity"]["value"] == pytest.approx(120 / 140)
    assert m["accuracy"]["value"] == pytest.approx(160 / 190)
    assert m["ppv"]["value"] == pytest.approx(40 / 60)
    assert m["npv"]["value"] == pytest.approx(120 / 130)
    assert (m["sensitivity"]["k"], m["sensitivity"]["n"]) == (40, 50)
    assert (m["sensitivity"]["lo"], m["sensitivity"]["hi"]) == pytest.approx(M.wilson_ci(40, 50))
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["brier"] == pytest.approx(brier_score_loss(labels, scores))
    assert (m["n"], m["n_pos"], m["n_neg"]) == (190, 50, 140)
    json.dumps(m)  # plain types only


def test_one_class_and_empty_inputs_give_nan_not_errors():
    m = M.binary_metrics([0, 0, 0], [0.1, 0.6, 0.3], 0.5)
    assert math.isnan(m["sensitivity"]["value"]) and math.isnan(m["auc"]["value"])
    assert m["specificity"]["value"] == pytest.approx(2 / 3)
    json.dumps(m)
    e = M.binary_metrics([], [], 0.5)
    assert e["n"] == 0 and math.isnan(e["accuracy"]["value"]) and math.isnan(e["brier"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        M.binary_metrics([0, 1], [0.2, float("nan")], 0.5)
    with pytest.raises(ValueError):
        M.confusion([0, 2], [0.2, 0.3], 0.5)
    with pytest.raises(ValueError):
        M.delong_auc(
            [0, 1, 1],
            [0.2, 0.3],
        )


def test_ece_and_calibration_curve_match_sklearn_and_hand_value():
    rng = np.random.default_rng(0)
    s = rng.random(300)
    y = (rng.random(300) < s).astype(int)
    cc = M.calibration_curve(y, s, 10)
    prob_true, prob_pred = sk_calibration_curve(y, s, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(cc["prob_true"], prob_true)
    np.testing.assert_allclose(cc["prob_pred"], prob_pred)
    # Hand case: two bins; [0.1,0.1] with 0/2 malignant (gap 0.1), [0.9,0.9] with 1/2 (gap 0.4) → ECE 0.25
    assert M.expected_calibration_error([0, 0, 1, 0], [0.1, 0.1, 0.9, 0.9]) == pytest.approx(0.25)


# ---------------------------------------------------------------- DeLong


@pytest.mark.parametrize("seed", range(6))
def test_delong_auc_and_variance_against_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 30))
    y = rng.permutation(np.r_[[1] * (n // 3), [0] * (n - n // 3)])
    s = np.round(rng.random(n) + 0.3 * y, 1)  # rounding makes ties
    auc, var = M.delong_auc(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    a, v10, v01 = _brute_delong(y, s)
    assert auc == pytest.approx(a)
    assert var == pytest.approx(np.var(v10, ddof=1) / v10.size + np.var(v01, ddof=1) / v01.size, rel=1e-10)


def test_delong_edge_cases():
    assert all(math.isnan(v) for v in M.delong_auc([1, 1], [0.2, 0.4]))
    auc, var = M.delong_auc([1, 0, 0], [0.9, 0.1, 0.2])
    assert auc == 1.0 and math.isnan(var)
    auc, var = M.delong_auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2])
    assert (auc, var) == (1.0, 0.0)


def test_auc_ci_logit_and_normal():
    lo, hi = M.auc_ci(0.9, 0.0025)
    se_logit = 0.05 / (0.9 * 0.1)
    assert lo == pytest.approx(special.expit(special.logit(0.9) - 1.959964 * se_logit), abs=1e-6)
    assert hi == pytest.approx(special.expit(special.logit(0.9) + 1.959964 * se_logit), abs=1e-6)
    assert lo < 0.9 < hi < 1
    assert M.auc_ci(0.9, 0.0049, method="normal") == pytest.approx((0.9 - 0.1372, 1.0), abs=1e-4)  # clipped at 1
    assert M.auc_ci(1.0, 0.0) == (1.0, 1.0)


def test_delong_paired_against_brute_force_covariance():
    rng = np.random.default_rng(3)
    y = np.r_[[1] * 15, [0] * 35]
    sa = rng.random(50) + 0.5 * y
    sb = sa + rng.normal(0, 0.3, 50)
    res = M.delong_paired_test(y, sa, sb)
    _, a10, a01 = _brute_delong(y, sa)
    _, b10, b01 = _brute_delong(y, sb)
    cov = np.cov(np.vstack([a10, b10])) / 15 + np.cov(np.vstack([a01, b01])) / 35
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert res["var"] == pytest.approx(var, rel=1e-10)
    assert res["difference"] == pytest.approx(roc_auc_score(y, sa) - roc_auc_score(y, sb))
    assert res["p"] == pytest.approx(2 * stats.norm.sf(abs(res["difference"]) / math.sqrt(var)))
    same = M.delong_paired_test(y, sa, 2 * sa + 1)  # same ranking → no difference
    assert same["difference"] == 0 and same["p"] == 1.0


# ---------------------------------------------------------------- McNemar


def test_mcnemar_exact_known_table():
    assert M.mcnemar_exact(1, 9)["p"] == pytest.approx(22 / 1024)  # 2·(C(10,0)+C(10,1))/2¹⁰ = 0.0215
    assert M.mcnemar_exact(0, 0)["p"] == 1.0
    assert M.mcnemar_exact(5, 5)["p"] == pytest.approx(1.0)
    res = M.mcnemar_paired([1, 1, 0, 0, 1], [0, 1, 1, 1, 1])  # b = 1 (first), c = 2
    assert (res["b"], res["c"]) == (1, 2)
    assert res["p"] == pytest.approx(1.0)


# ---------------------------------------------------------------- meta-analysis


def test_dersimonian_laird_hand_worked():
    # y = (0.1, 0.3, 0.5), v = (0.01, 0.02, 0.04) → w = (100, 50, 25), Σw = 175, fixed = 37.5/175 = 3/14
    # Q = 100(3/35)²... = 26/7, C = 175 − 13125/175 = 100, τ² = (26/7 − 2)/100 = 3/175
    res = M.random_effects_meta([0.1, 0.3, 0.5], [0.01, 0.02, 0.04], method="dl")
    tau2 = 3 / 175
    ws = 1 / (np.array([0.01, 0.02, 0.04]) + tau2)
    mu = float(np.dot(ws, [0.1, 0.3, 0.5]) / ws.sum())
    se = math.sqrt(1 / ws.sum())
    assert res["fixed_estimate"] == pytest.approx(3 / 14)
    assert res["q"] == pytest.approx(26 / 7)
    assert res["tau2"] == pytest.approx(tau2)
    assert res["estimate"] == pytest.approx(mu) and mu == pytest.approx(0.25240, abs=1e-5)
    assert res["se"] == pytest.approx(se)
    assert res["i2"] == pytest.approx((26 / 7 - 2) / (26 / 7))
    half = 12.706205 * math.sqrt(tau2 + se**2)  # t(0.975, df = 1)
    assert (res["pi_lo"], res["pi_hi"]) == pytest.approx((mu - half, mu + half), abs=1e-5)


def test_dersimonian_laird_equal_variances_closed_form_and_small_k():
    # Equal v: τ² = max(0, sample variance − v)
    y = [0.2, 0.9, 0.4, 1.3]
    res = M.random_effects_meta(y, [0.05] * 4, method="dl")
    assert res["tau2"] == pytest.approx(np.var(y, ddof=1) - 0.05)
    assert res["estimate"] == pytest.approx(np.mean(y))
    homog = M.random_effects_meta([0.5, 0.51, 0.49], [0.1, 0.1, 0.1])
    assert homog["tau2"] == 0 and homog["i2"] == 0
    two = M.random_effects_meta([0.1, 0.4], [0.01, 0.01])
    assert math.isnan(two["pi_lo"]) and not math.isnan(two["lo"])
    one = M.random_effects_meta([0.3], [0.04])
    assert one["estimate"] == 0.3 and one["lo"] == pytest.approx(0.3 - 1.959964 * 0.2, abs=1e-6)
    with pytest.raises(ValueError):
        M.random_effects_meta([0.1, 0.2], [0.0, 0.1])


def test_meta_proportions_continuity_correction_and_back_transform():
    est, var = M.logit_proportion(0, 10)
    assert est == pytest.approx(math.log(0.5 / 10.5))  # cells (0, 10) → (0.5, 10.5)
    assert var == pytest.approx(1 / 0.5 + 1 / 10.5)
    assert M.logit_proportion(3, 4) == pytest.approx((math.log(3), 1 / 3 + 1))
    res = M.meta_proportions([5, 4, 9, 0], [5, 6, 10, 0], method="dl")
    assert res["k"] == 3 and res["k_excluded"] == 1
    assert 0 < res["lo"] < res["estimate"] < res["hi"] < 1
    assert res["estimate"] == pytest.approx(special.expit(res["logit_estimate"]))
    json.dumps(res)


def test_meta_aucs_handles_perfect_small_sites():
    res = M.meta_aucs([1.0, 0.9, 0.85, 0.95], [0.0, 0.004, 0.006, float("nan")], [5, 8, 6, 1], [15, 20, 30, 10])
    assert res["k"] == 4
    assert 0.8 < res["estimate"] < 1 and res["lo"] < res["estimate"] < res["hi"]
    res_dl = M.meta_aucs(
        [1.0, 0.9, 0.85, 0.95], [0.0, 0.004, 0.006, float("nan")], [5, 8, 6, 1], [15, 20, 30, 10], method="dl"
    )
    assert res_dl["lo"] < res_dl["estimate"] < res_dl["hi"]
    est, var = M.logit_auc(1.0, 0.0, 5, 15)
    assert est == pytest.approx(special.logit(1 - 0.5 / 75))
    assert var > 0 and math.isfinite(var)


# ---------------------------------------------------------------- bootstrap over sites


def test_cluster_bootstrap_covers_and_is_reproducible():
    y, s, site = _realistic_cohort(1)
    a = M.cluster_bootstrap(y, s, site, n_boot=200, seed=4)
    b = M.cluster_bootstrap(y, s, site, n_boot=200, seed=4)
    assert a == b
    assert a["lo"] < a["estimate"] < a["hi"] and a["n_clusters"] == 12
    assert a["estimate"] == pytest.approx(roc_auc_score(y, s))


def test_cluster_bootstrap_resamples_whole_sites():
    # Site draws AA, BB, AB give AUC 1, 0, 0.75; resampling patients would also give e.g. 0.5 or 2/3.
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.1, 0.2, 0.8])
    site = np.array(["A", "A", "B", "B"])
    seen = set()
    res = M.cluster_bootstrap(
        y, s, site, stat_fn=lambda yy, ss: seen.add(round(M.auc_stat(yy, ss), 6)) or 0.0, n_boot=50
    )
    assert seen == {1.0, 0.0, 0.75} and res["n_clusters"] == 2


def test_paired_bootstrap_over_sites_detects_a_real_difference():
    y, s, site = _realistic_cohort(2)
    rng = np.random.default_rng(0)
    worse = np.clip(s + rng.normal(0, 0.35, s.size), 0, 1)
    res = M.paired_bootstrap_over_sites(y, s, worse, site, n_boot=300, seed=1)
    assert res["difference"] == pytest.approx(roc_auc_score(y, s) - roc_auc_score(y, worse))
    assert res["lo"] > 0 and res["p_boot"] < 0.05
    same = M.paired_bootstrap_over_sites(y, s, s, site, n_boot=50)
    assert same["difference"] == 0 and same["lo"] == 0 == same["hi"]
    acc = M.paired_bootstrap_over_sites(
        y, (s >= 0.5).astype(int), (worse >= 0.5).astype(int), site, M.accuracy_stat, 100
    )
    assert acc["estimate_a"] == pytest.approx(np.mean((s >= 0.5) == y))


# ---------------------------------------------------------------- histograms


def test_histogram_auc_exact_when_scores_sit_on_bin_centres():
    rng = np.random.default_rng(0)
    centres = (M.DEFAULT_EDGES[:-1] + M.DEFAULT_EDGES[1:]) / 2
    s = rng.choice(centres, 200)
    y = (rng.random(200) < s).astype(int)
    hp, hn = M.score_histogram(y, s)
    assert hp.sum() == y.sum() and hn.sum() == (1 - y).sum()
    assert M.histogram_auc(hp, hn) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_histogram_metrics_match_exact_metrics_on_bin_edges():
    y, s, _ = _realistic_cohort(3)
    hp, hn = M.score_histogram(y, s)
    for thr in (0.0, 0.25, 0.5, 0.73, 1.0):
        h = M.histogram_metrics(hp, hn, M.DEFAULT_EDGES[round(thr * 100)])
        exact = M.binary_metrics(y, s, M.DEFAULT_EDGES[round(thr * 100)])
        for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
            assert h[key]["k"] == exact[key]["k"] and h[key]["n"] == exact[key]["n"], (thr, key)
    with pytest.raises(ValueError):
        M.histogram_confusion(hp, hn, 0.505)
    roc = M.histogram_roc(hp, hn)
    assert roc["tpr"][0] == 0 and roc["tpr"][-1] == 1 and np.all(np.diff(roc["fpr"]) >= 0)


def test_pooled_histogram_auc_within_0005_of_exact():
    errors = []
    for seed in range(20):
        for conf in (0.7, 1.0, 1.5):
            y, s, site = _realistic_cohort(seed, overconfidence=conf)
            errors.append(M.suppression_cost(y, s, site, min_count=5)["hist_error"])
    print(f"\npooled histogram AUC error (100 bins, no suppression): max |err| {np.max(np.abs(errors)):.4f}")
    assert np.max(np.abs(errors)) < 0.005


def test_suppression_rule_and_its_cost():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h = rng.poisson(rng.choice([0.05, 0.3, 2.0]), 100)
        out = M.suppress_small_cells(h, 5)
        assert out.sum() == pytest.approx(h.sum())
        runs = M._merge_runs(h.astype(float), 5, M.N_COARSE_CELLS)
        for a, b in runs:
            assert h[a:b].sum() >= 5 or (a, b) == (0, 100)  # every released cell holds >= 5, or is the whole range
            assert np.allclose(out[a:b], h[a:b].sum() / (b - a))
        covered = np.zeros(100, bool)
        for a, b in runs:
            assert not covered[a:b].any()
            covered[a:b] = True
        assert covered[h > 0].all() and (out[~covered] == 0).all()
    assert np.array_equal(M.suppress_small_cells([0, 7, 3, 0], 5, rule="zero"), [0, 7, 0, 0])
    costs = {"merge": [], "merge_em": [], "zero": []}
    for seed in range(10):
        y, s, site = _realistic_cohort(seed)
        c = M.suppression_cost(y, s, site, min_count=5, rule="merge")
        costs["merge"].append(c["suppressed_error"])
        costs["merge_em"].append(c["suppressed_em_error"])
        costs["zero"].append(M.suppression_cost(y, s, site, min_count=5, rule="zero", em=False)["suppressed_error"])
    summary = {r: (float(np.mean(np.abs(v))), float(np.mean(v)), int(np.isnan(v).sum())) for r, v in costs.items()}
    print(f"\nsuppression cost at min_count 5 (mean |err|, mean signed err, n undefined of 10): {summary}")
    # Measured figures go in the closing note; these bounds guard against regressions, not a claim of accuracy.
    assert summary["merge"][0] < 0.12 and summary["merge"][1] < 0  # spreading evenly is conservative (AUC too low)
    assert summary["zero"][2] > 0  # zeroing leaves classes empty at realistic sites: AUC undefined


def test_pooled_histogram_em_preserves_totals_and_plain_sums():
    a = np.array([0, 2, 1, 0, 3, 0], float)
    b = np.array([1, 0, 0, 4, 0, 0], float)
    np.testing.assert_allclose(M.pooled_histogram_em([a, b]), a + b)
    merged = np.full(6, 0.5)  # one cell of 3 patients spread over the whole range
    pooled = M.pooled_histogram_em([merged, a])
    assert pooled.sum() == pytest.approx(9)
    assert pooled[0] == pytest.approx(0, abs=1e-6) and pooled[4] > pooled[1]  # follows the other site's density
    assert M.histogram_cells([0, 0.5, 0.5, 2, 0]) == [(1, 3, 1.0), (3, 4, 2.0)]


# ---------------------------------------------------------------- few sites (issue 18)


def test_wilson_endpoints_are_exact():
    for n in (1, 3, 7, 50):
        assert M.wilson_ci(0, n)[0] == 0.0 and M.wilson_ci(n, n)[1] == 1.0
        for k in range(n + 1):
            lo, hi = M.wilson_ci(k, n)
            assert lo <= k / n <= hi and hi > lo


def test_histogram_confusion_equals_confusion_at_every_edge_including_scores_of_exactly_0_and_1():
    y = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    s = np.array([1.0, 0.995, 0.0, 0.5, 0.5, 1.0, 0.01, 0.99])
    hp, hn = M.score_histogram(y, s)
    for edge in M.DEFAULT_EDGES:
        assert M.histogram_confusion(hp, hn, edge) == M.confusion(y, s, edge), edge
    assert M.confusion(y, s, M.DEFAULT_EDGES[-1]).tp == 0  # the top edge calls nobody malignant


def test_hksj_paule_mandel_hand_worked_k2():
    # Equal v = 0.01, y = (0.1, 0.4): PM solves 0.045/(0.01 + tau2) = 1 → tau2 = 0.035; SE^2 = (0.01 + 0.035)/2;
    # HKSJ scale = 1 (PM makes the generalised Q equal k - 1), so the CI is 0.25 ± t(0.975, 1)·0.15.
    res = M.random_effects_meta([0.1, 0.4], [0.01, 0.01])
    assert res["tau2"] == pytest.approx(0.035) and res["estimate"] == pytest.approx(0.25)
    assert (res["lo"], res["hi"]) == pytest.approx((0.25 - 12.706205 * 0.15, 0.25 + 12.706205 * 0.15), abs=1e-5)
    assert math.isnan(res["pi_lo"]) and "Hartung" in res["method"]
    one = M.random_effects_meta([0.3], [0.04])
    assert one["k"] == 1 and one["method"].startswith("single site") and one["lo"] < 0.3 < one["hi"]


def test_paule_mandel_root_and_hksj_against_statsmodels():
    rng = np.random.default_rng(5)
    for _ in range(20):
        k = int(rng.integers(2, 11))
        v = rng.uniform(0.01, 0.3, k)
        y = rng.normal(0.5, 0.6, k) + rng.normal(0, np.sqrt(v))
        res = M.random_effects_meta(y, v)
        # Direct check of the PM equation: generalised Q = k - 1 at tau2 (or Q(0) < k - 1 and tau2 = 0).
        w = 1 / (v + res["tau2"])
        gq = np.sum(w * (y - np.sum(w * y) / w.sum()) ** 2)
        assert (gq == pytest.approx(k - 1, rel=1e-8)) if res["tau2"] > 0 else gq <= k - 1
        assert res["lo"] <= res["estimate"] <= res["hi"] and res["pi_lo"] <= res["lo"] if k >= 3 else True
        assert res["hi"] - res["lo"] >= res["dl_hi"] - res["dl_lo"] - 1e-12  # never narrower than DL
    sm = pytest.importorskip("statsmodels.stats.meta_analysis")
    for _ in range(20):
        k = int(rng.integers(2, 11))
        v = rng.uniform(0.01, 0.3, k)
        y = rng.normal(0.5, 0.6, k) + rng.normal(0, np.sqrt(v))
        res = M.random_effects_meta(y, v)
        ref = sm.combine_effects(y, v, method_re="pm", use_t=True)
        # statsmodels iterates PM to a looser tolerance (ours is the exact root, checked above)
        assert res["tau2"] == pytest.approx(ref.tau2, rel=1e-5, abs=1e-9)
        assert res["estimate"] == pytest.approx(ref.mean_effect_re, rel=1e-5, abs=1e-7)
        assert res["se_hk"] == pytest.approx(ref.sd_eff_w_re_hksj, rel=1e-5)
        assert res["se_wald"] == pytest.approx(ref.sd_eff_w_re, rel=1e-5)


def _glmm_nll_by_quad(theta, k, n):
    from scipy import integrate

    mu, tau = theta[0], abs(theta[1])
    total = 0.0
    for ki, ni in zip(k, n, strict=True):
        f = lambda u, ki=ki, ni=ni: stats.binom.pmf(ki, ni, special.expit(mu + u)) * stats.norm.pdf(u, 0, tau)  # noqa: E731
        total += math.log(integrate.quad(f, -12 * tau, 12 * tau, epsabs=1e-14)[0])
    return -total


@pytest.mark.parametrize(
    "k,n", [([4, 5, 3, 9], [5, 5, 6, 10]), ([30, 12, 40, 5, 22], [40, 20, 45, 10, 30]), ([1, 3, 2], [3, 4, 9])]
)
def test_glmm_fit_matches_direct_numerical_likelihood_maximisation(k, n):
    from scipy import optimize

    ref = optimize.minimize(
        _glmm_nll_by_quad, [1.0, 0.5], args=(k, n), method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-11}
    )
    fit = M.glmm_proportions_fit(k, n)
    assert fit["mu"] == pytest.approx(ref.x[0], abs=2e-4) and fit["tau"] == pytest.approx(abs(ref.x[1]), abs=2e-4)
    const = sum(math.log(math.comb(b, a)) for a, b in zip(k, n, strict=True))
    assert fit["loglik"] + const == pytest.approx(-ref.fun, abs=1e-6)
    res = M.meta_proportions(k, n)
    assert res["lo"] < res["estimate"] < res["hi"] and res["estimate"] == pytest.approx(special.expit(fit["mu"]))
    assert "binomial-normal" in res["method"] and res["estimand"] == M.RE_ESTIMAND


def test_meta_proportions_degenerate_and_single_site():
    allfull = M.meta_proportions([5, 3, 4], [5, 3, 4])
    assert allfull["estimate"] == 1.0 == allfull["hi"] and 0 < allfull["lo"] < 1
    one = M.meta_proportions([3, 0], [4, 0])
    assert one["k"] == 1 and one["k_excluded"] == 1 and one["lo"] < 0.75 < one["hi"]
    mixed = M.meta_proportions([5, 0, 3], [5, 4, 6])  # separation at two sites, still a finite fit
    assert 0 < mixed["lo"] < mixed["estimate"] < mixed["hi"] < 1


def test_auc_interval_never_zero_width_and_names_what_it_cannot_do():
    cases = [
        ([1, 1, 0, 0, 0], [0.9, 0.8, 0.1, 0.2, 0.3]),  # perfect
        ([1, 1, 0, 0, 0], [0.1, 0.2, 0.9, 0.8, 0.7]),  # reversed
        ([1, 1, 0, 0, 0], [0.5] * 5),  # all tied
        ([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3]),  # a class of one
    ]
    for y, s in cases:
        m = M.binary_metrics(y, s, 0.5)["auc"]
        assert m["lo"] <= m["value"] <= m["hi"] and m["hi"] - m["lo"] > 0.05, (y, s, m)
        assert m["method"].startswith("Newcombe")
    none = M.binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)["auc"]
    assert math.isnan(none["value"]) and none["note"] == "no malignant patients"
    # Newcombe's bound solves (AUC - theta)^2 = z^2 V(theta) (hand formula)
    lo, hi = M.newcombe_auc_ci(1.0, 5, 15)
    v = lo * (1 - lo) / 75 * (1 + 9 * ((1 - lo) / (2 - lo) + lo / (1 + lo)))
    assert hi == 1.0 and (1 - lo) ** 2 == pytest.approx(1.959964**2 * v, rel=1e-6)


def test_meta_aucs_weight_of_a_perfect_site_is_that_of_its_size():
    res = M.meta_aucs([1.0, 0.95, 0.9, 0.8], [0.0, 0.002, 0.004, 0.008], [5, 5, 5, 5], [15, 15, 15, 15])
    w = res["weights"]
    assert w[0] == pytest.approx(w[1]) == pytest.approx(0.25)  # same size, same weight (old method: about 1/15)
    old = M.meta_aucs([1.0, 0.95, 0.9, 0.8], [0.0, 0.002, 0.004, 0.008], [5, 5, 5, 5], [15, 15, 15, 15], method="dl")
    assert old["weights"][0] < 0.5 * old["weights"][1]
    assert res["lo"] < res["estimate"] < res["hi"] and res["estimate"] > old["estimate"]


def test_meta_auc_differences_uses_every_site():
    res = M.meta_auc_differences(
        [0.0, 0.05, 0.1, -0.02], [0.0, 0.003, float("nan"), 0.002], [5, 8, 1, 6], [15, 20, 9, 12]
    )
    assert res["k"] == 4 and res["imputed"] == [0, 2] and res["lo"] < res["estimate"] < res["hi"]
    old = M.meta_auc_differences(
        [0.0, 0.05, 0.1, -0.02], [0.0, 0.003, float("nan"), 0.002], [5, 8, 1, 6], [15, 20, 9, 12], method="dl"
    )
    assert old["k"] == 2 and old["dropped"] == [0, 2]
