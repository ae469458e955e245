"""Tests for server/aggregates.py's statistics: the paired verdict uses every site, per-site AUC intervals."""

import math

from server import aggregates as A


def _cmp(n_pos, n_neg, auc_a, auc_b, var):
    n = n_pos + n_neg
    row = {"n": n, "n-pos": n_pos, "n-neg": n_neg, "auc_a": auc_a, "auc_b": auc_b}
    row.update({"auc-diff": auc_a - auc_b if auc_a >= 0 else 0.0, "auc-diff-var": var})
    for suffix in ("", "-pos", "-neg"):
        row.update({f"b{suffix}": 1, f"c{suffix}": 0})
    return row


def test_paired_contrast_uses_sites_of_zero_variance_and_names_the_ones_it_cannot_use():
    comparisons = {
        "a": _cmp(5, 15, 1.0, 1.0, 0.0),  # both perfect: paired DeLong variance 0, still used
        "b": _cmp(6, 20, 0.9, 0.8, 0.004),
        "c": _cmp(4, 10, 0.95, 0.85, 0.006),
        "d": _cmp(0, 8, -1.0, -1.0, -1.0),  # no malignant patient: no AUC
        "e": {},  # did not run both protocols
    }
    res = A.paired_contrast(comparisons, "tenfold", "site-held-out")
    assert res["auc"]["k"] == 3 and res["auc"]["sites"] == ["a", "b", "c"] and res["auc"]["imputed_sites"] == ["a"]
    assert set(res["excluded"]) == {"d", "e"} and "malignant" in res["excluded"]["d"]
    assert res["auc"]["lo"] < res["auc"]["estimate"] < res["auc"]["hi"]
    text = A.verdict(res)
    assert "d (no malignant" in text and "e (no patients" in text


def test_site_metrics_never_gives_a_zero_width_auc_interval():
    rep = {"tp": 5, "fp": 0, "tn": 15, "fn": 0, "n": 20, "n-pos": 5, "n-neg": 15, "auc": 1.0, "auc-var": 0.0}
    rep.update({"brier-sum": 0.5, "folds": [0, 1, 2]})
    m = A.site_metrics(rep)
    assert m["auc"]["hi"] - m["auc"]["lo"] > 0.1 and m["auc"]["method"].startswith("Newcombe") and m["n_folds"] == 3
    assert m["sensitivity"]["hi"] == 1.0 and m["specificity"]["method"] == "Wilson score"
    empty = A.site_metrics({**rep, "n-pos": 0, "tp": 0, "fn": 0, "auc": -1.0, "auc-var": -1.0})
    assert math.isnan(empty["auc"]["value"]) and empty["auc"]["note"] == "no malignant patients"
