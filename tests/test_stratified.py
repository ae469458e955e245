"""Results by acquisition attribute (#24): the sites' strata with the minimum cell count (and its complement), the
coordinator's pooling and contrast, the verdict's wording with and without a true subgroup effect, the warnings
(worst site, too few malignant cases, extrapolation) and the report section."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from client import tasks
from client.evalstore import EvalStore, default_folder
from common import metrics as M
from common.acquisition import ATTRIBUTES, column, mix_of
from server import stratified as S
from server.replyfilter import strata_problem
from server.report import _stratified_blocks, _warning_blocks, to_markdown
from tests.tinysites import make_site


def _with_levels(site_yaml, levels: dict[str, list[str]]) -> None:
    """Add `acq-<name>` columns to a tiny site's index.csv (one level per usable patient, in row order)."""
    index = site_yaml.parent / "cache" / "index.csv"
    rows = list(csv.DictReader(index.open(newline="", encoding="utf-8")))
    ok = [r for r in rows if r["status"] == "ok"]
    for name, values in levels.items():
        assert len(values) == len(ok)
        for row, value in zip(ok, values, strict=True):
            row[column(name)] = value
    with index.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, list(rows[0]) + [column(n) for n in levels if column(n) not in rows[0]])
        writer.writeheader()
        writer.writerows(rows)


# ----- the site's strata -------------------------------------------------------------------------------------------
@pytest.fixture
def scored_site(tmp_path):
    """A site of 13 patients (5 malignant) with acquisition levels, all scored under tag "t" by one model."""
    yaml = make_site(tmp_path, "s1", n=13, n_malignant=5)
    _with_levels(
        yaml,
        {
            "field-strength": ["1.5 T"] * 10 + ["3 T"] * 3,  # 3 < 5: hidden, and 1.5 T with it (its complement)
            "t2-fat-suppression": ["no"] * 4 + ["yes"] * 3 + ["no"] * 4 + ["unknown"] * 2,  # yes + unknown = 5
            "manufacturer": ["Siemens"] * 7 + ["Dr Who's magnet!"] * 6,  # free text leaves as "other"
        },
    )
    site = tasks.open_site({"site-config": str(yaml)}, {})
    rng = np.random.default_rng(1)
    scores = np.clip(np.where(site.data.labels == 1, 0.7, 0.3) + rng.normal(0, 0.2, len(site.data)), 0, 1)
    store = EvalStore(default_folder(site.config.cache))
    store.record("t", site.data.keys, site.data.labels, scores, [0] * len(scores), "fold-00", 0.5)
    return site, store, scores


def test_tag_report_strata_suppress_small_levels_and_their_complement(scored_site):
    site, store, scores = scored_site
    agg, _ = tasks.tag_report(site, store, "t", {}, min_cell=5, strata=True)
    strata = agg["strata"]
    assert strata["min-cell"] == 5 and set(strata["attributes"]) == {"field-strength", "t2-fat-suppression",
                                                                     "manufacturer"}  # fmt: skip
    # 3 T has 3 patients: suppressed; 1.5 T (10) would then be total − 3 T: suppressed too, counts and AUC gone.
    assert strata["attributes"]["field-strength"] == {"1.5 T": {"suppressed": 1}, "3 T": {"suppressed": 1}}
    fs = strata["attributes"]["t2-fat-suppression"]
    # yes (3) and unknown (2) hidden: together 5, the floor, so "no" (8) may be shown.
    assert fs["yes"] == {"suppressed": 1} and fs["unknown"] == {"suppressed": 1}
    no = fs["no"]
    mask = np.array([i < 4 or 7 <= i < 11 for i in range(13)])
    labels = site.data.labels
    assert (no["n"], no["n-pos"], no["n-neg"]) == (8, int((labels[mask] == 1).sum()), int((labels[mask] == 0).sum()))
    calls = scores[mask] >= 0.5
    assert no["tp"] == int((calls & (labels[mask] == 1)).sum()) and no["tn"] == int(
        (~calls & (labels[mask] == 0)).sum()
    )
    auc, var = M.delong_auc(labels[mask], scores[mask])
    assert no["auc"] == pytest.approx(auc) and no["auc-var"] == pytest.approx(var)
    assert set(strata["attributes"]["manufacturer"]) == {"Siemens", "other"}  # no header text leaves the site
    assert strata_problem(agg) is None
    # Nothing of a suppressed level can be derived: shown levels hold at most total − floor patients.
    shown = sum(c["n"] for c in fs.values() if "n" in c)
    assert agg["n"] - shown >= 5


def test_report_query_stratifies_only_the_requested_tags(scored_site):
    site, store, scores = scored_site
    store.record("u", site.data.keys, site.data.labels, scores, [0] * len(scores), "fold-00", 0.5)
    rep = tasks.report(site, {"tags": {"t": {}, "u": {}}, "strata": ["t"], "min-cell": 2})
    assert "strata" in rep["tags"]["t"] and "strata" not in rep["tags"]["u"]
    assert rep["tags"]["t"]["strata"]["min-cell"] == 5  # the site's floor, not the experiment's lower request
    json.dumps(rep)  # travels as JSON in a ConfigRecord


def test_the_coordinator_refuses_strata_that_leak_or_do_not_add_up(scored_site):
    site, store, _ = scored_site
    agg, _ = tasks.tag_report(site, store, "t", {}, min_cell=5, strata=True)
    small = json.loads(json.dumps(agg))
    cell = small["strata"]["attributes"]["t2-fat-suppression"]["no"]
    small["strata"]["attributes"]["t2-fat-suppression"]["yes"] = {**cell, "n": 3, "n-pos": 1, "n-neg": 2, "tp": 1,
                                                                  "fn": 0, "tn": 2, "fp": 0}  # fmt: skip
    assert "minimum cell count" in strata_problem(small)
    bad = json.loads(json.dumps(agg))
    bad["strata"]["attributes"]["t2-fat-suppression"]["no"]["tp"] += 1
    assert "do not add up" in strata_problem(bad)
    listed = json.loads(json.dumps(agg))
    listed["strata"]["attributes"]["t2-fat-suppression"]["no"]["auc"] = [0.5]
    assert "out of range" in strata_problem(listed)
    named = json.loads(json.dumps(agg))
    named["strata"]["attributes"]["manufacturer"]["PATIENT^JOHN|1953"] = {"suppressed": 1}
    assert "bin name" in strata_problem(named)


# ----- pooling and the verdict -------------------------------------------------------------------------------------
def _cell(n_pos, n_neg, auc, sens=0.8, spec=0.85):
    tp, tn = round(sens * n_pos), round(spec * n_neg)
    var = max(M.hanley_mcneil_var(auc, n_pos, n_neg), 1e-6)
    return {"n": n_pos + n_neg, "n-pos": n_pos, "n-neg": n_neg, "tp": tp, "fn": n_pos - tp, "tn": tn,
            "fp": n_neg - tn, "auc": auc, "auc-var": var}  # fmt: skip


def _reports(fs_sites: dict[str, float], other_auc: dict[str, float], extra=None) -> dict[str, dict]:
    """Site → tag report with strata: every site has fat-suppressed T2 'no' (AUC other_auc[site]); the sites in
    fs_sites also have 'yes' (AUC fs_sites[site]) and 3 T with exactly the same patients."""
    out = {}
    for site, auc in other_auc.items():
        attrs = {"t2-fat-suppression": {"no": _cell(8, 22, auc)}, "field-strength": {"1.5 T": _cell(8, 22, auc)}}
        if site in fs_sites:
            attrs["t2-fat-suppression"]["yes"] = _cell(6, 14, fs_sites[site])
            attrs["field-strength"]["3 T"] = _cell(6, 14, fs_sites[site])
        attrs.update((extra or {}).get(site, {}))
        n = sum(c["n"] for c in attrs["t2-fat-suppression"].values() if "n" in c)
        out[site] = {"n": n, "strata": {"min-cell": 5, "attributes": attrs}}
    return out


SITES = {f"site{i:02d}": a for i, a in enumerate([0.91, 0.88, 0.93, 0.9, 0.86, 0.92, 0.89, 0.9], start=1)}


def test_a_true_subgroup_effect_is_named_with_an_interval_that_excludes_zero():
    block = S.stratify(_reports({"site07": 0.62, "site03": 0.6}, SITES))
    fs = block["attributes"]["t2-fat-suppression"]
    assert fs["reference"] == "no" and fs["levels"]["yes"]["sites"] == ["site03", "site07"]
    yes = fs["levels"]["yes"]
    assert yes["n"] == 40 and yes["n_pos"] == 12 and yes["sensitivity"]["k"] == 2 * round(0.8 * 6)
    assert (
        yes["auc"]["k"] == 2 and yes["auc"]["lo"] < yes["auc"]["estimate"] < 0.7 < yes["auc"]["hi"]
    )  # t on 1 df: wide
    c = fs["contrast"]["levels"]["yes"]
    assert c["hi"] < 0 and c["lo"] < c["difference"] < c["hi"] and c["p"] < 0.05
    assert block["largest_drop"]["level"] in ("yes", "3 T")
    text = block["verdict"]
    assert "largest drop" in text and "interval excludes 0" in text
    assert "Fat-suppressed T2" in text or "Field strength" in text
    # 3 T and fat suppression share their patients here: the report says their effects cannot be told apart.
    assert "cannot be told apart" in text and block["confounded"]


def test_no_subgroup_effect_says_no_evidence_of_a_difference():
    block = S.stratify(_reports({"site07": 0.9, "site03": 0.88}, SITES))
    c = block["attributes"]["t2-fat-suppression"]["contrast"]["levels"]["yes"]
    assert c["lo"] < 0 < c["hi"]
    assert block["verdict"].startswith("No evidence of a difference in AUC")
    assert "absence of evidence" in block["verdict"]


def _shifted(specs: dict[str, float]) -> dict[str, dict]:
    """Eight sites, all ranking equally well (AUC 0.9); the sites in `specs` also have fat-suppressed T2 patients
    whose scores shifted upwards: every malignant case found, specificity specs[site]."""
    out = {}
    for site, auc in SITES.items():
        fs = {"no": _cell(8, 22, auc, sens=0.75, spec=0.95)}
        if site in specs:
            fs["yes"] = _cell(6, 14, 0.9, sens=1.0, spec=specs[site])
        n = sum(c["n"] for c in fs.values())
        out[site] = {"n": n, "strata": {"min-cell": 5, "attributes": {"t2-fat-suppression": fs}}}
    return out


def test_a_threshold_that_fails_at_one_level_is_named_at_the_operating_point_though_the_auc_holds():
    block = S.stratify(_shifted({"site04": 0.1, "site07": 0.3, "site03": 0.2}))
    fs = block["attributes"]["t2-fat-suppression"]
    assert fs["contrast"]["levels"]["yes"]["lo"] < 0 < fs["contrast"]["levels"]["yes"]["hi"]  # ranking: no drop
    j = fs["contrast_j"]["levels"]["yes"]
    # J per cell: 'yes' ≈ 0.93 + 0.2 − 1, 'no' ≈ 0.72 + 0.93 − 1: a drop of about 0.5, its interval below 0
    assert -0.7 < j["difference"] < -0.3 and j["hi"] < 0 and j["p"] < 0.05
    assert block["largest_j_drop"]["attribute"] == "t2-fat-suppression"
    text = block["verdict"]
    assert text.startswith("No evidence of a difference in AUC")
    assert "At the operating point" in text and "Fat-suppressed T2" in text and "interval excludes 0" in text
    assert "sensitivity 1.00, specificity 0.19 against sensitivity 0.75, specificity 0.95" in text  # 8/42; 42/44
    assert "3 sites (site03, site04, site07)" in text
    report_md = to_markdown(_stratified_blocks({"stratified": {"site-held-out": block}}))
    assert "Youden's J difference" in report_md and f"{j['difference']:+.3f} ({j['lo']:+.3f}" in report_md


def test_the_same_threshold_at_every_level_gives_no_operating_point_drop_that_excludes_zero():
    reports = _shifted({})
    for site in ("site03", "site04", "site07"):  # same operating point in the fat-suppressed patients
        reports[site]["strata"]["attributes"]["t2-fat-suppression"]["yes"] = _cell(6, 14, 0.9, sens=0.75, spec=0.95)
    block = S.stratify(reports)
    j = block["attributes"]["t2-fat-suppression"]["contrast_j"]["levels"]["yes"]
    assert j["lo"] < 0 < j["hi"]
    assert "interval excludes 0" not in block["verdict"]


def test_a_smaller_drop_whose_interval_excludes_zero_is_not_hidden_behind_the_largest_one():
    extra = {}
    for i, (site, auc) in enumerate(SITES.items()):
        wide = {">0.9 mm": _cell(8, 22, [0.45, 0.85][i])} if i < 2 else {"0.6-0.9 mm": _cell(8, 22, auc)}
        tight = {"3.5-4.5 mm": _cell(40, 100, 0.9)} if i < 5 else {"<3.5 mm": _cell(40, 100, 0.8)}
        extra[site] = {"pixel-spacing": wide, "slice-thickness": tight}
    block = S.stratify(_reports({}, SITES, extra))
    drop = block["largest_drop"]
    assert drop["attribute"] == "pixel-spacing" and drop["lo"] < 0 < drop["hi"]
    text = block["verdict"]
    assert "No evidence" not in text and "has an interval that includes 0" in text
    assert "with an interval that excludes 0: Slice thickness = `<3.5 mm`" in text


def test_a_level_carried_by_one_site_is_said_to_be_confounded_with_that_site():
    block = S.stratify(_reports({"site07": 0.6}, SITES))
    fs = block["attributes"]["t2-fat-suppression"]
    assert fs["single_site"] == {"yes": "site07"}
    assert "only at 1 site (site07)" in block["verdict"]
    assert "the attribute's effect cannot be told from that site's effect" in block["verdict"]


def test_a_larger_drop_at_one_site_alone_is_not_named_as_the_attribute_with_the_largest_drop():
    lone = {"manufacturer": {"Siemens": _cell(8, 22, 0.9), "Philips": _cell(3, 5, 0.5)}}
    extra = {s: {"manufacturer": {"Siemens": _cell(8, 22, a)}} for s, a in SITES.items()} | {"site08": lone}
    block = S.stratify(_reports({"site07": 0.7, "site03": 0.72}, SITES, extra))
    assert block["largest_drop"]["level"] in ("yes", "3 T") and block["largest_drop"]["n_sites"] == 2
    assert block["single_site_drop"]["attribute"] == "manufacturer"
    assert "Scanner manufacturer = `Philips`" in block["verdict"] and "carried by site08 alone" in block["verdict"]


def test_levels_that_share_sites_with_the_named_drop_are_listed():
    extra = {s: {"manufacturer": {"Siemens": _cell(8, 22, a)}} for s, a in SITES.items()}
    extra["site07"] = {"manufacturer": {"Philips": _cell(8, 22, 0.9)}}
    extra["site05"] = {"manufacturer": {"Philips": _cell(8, 22, 0.9)}}
    block = S.stratify(_reports({"site07": 0.62, "site03": 0.6}, SITES, extra))
    assert S.overlaps(block, "t2-fat-suppression", "yes") == [("manufacturer", "Philips", ["site07"])]
    assert "shares sites with Scanner manufacturer = `Philips` (site07)" in block["verdict"]


def test_a_level_without_an_interval_does_not_hide_one_with_an_interval():
    """Three sites, one vendor each (no residual df: no interval) and two field strengths (one df): the verdict
    tests the field strength rather than giving up on the vendor's lower AUC."""
    reports = {}
    for site, vendor, tesla, auc in (
        ("a", "Siemens", "1.5 T", 0.9),
        ("b", "GE", "1.5 T", 0.88),
        ("c", "Philips", "3 T", 0.6),
    ):
        attrs = {"manufacturer": {vendor: _cell(8, 22, auc)}, "field-strength": {tesla: _cell(8, 22, auc)}}
        reports[site] = {"n": 30, "strata": {"min-cell": 5, "attributes": attrs}}
    block = S.stratify(reports)
    assert math.isnan(block["attributes"]["manufacturer"]["contrast"]["levels"]["Philips"]["lo"])
    assert block["largest_drop"]["attribute"] == "field-strength" and not block["verdict"].startswith("No test")
    assert "Scanner manufacturer = `Philips` and Field strength = `3 T` occur in the same patients" in block["verdict"]


def test_suppressed_cells_are_left_out_of_the_sums_and_named():
    extra = {"site05": {"t2-fat-suppression": {"no": _cell(8, 22, 0.86), "yes": {"suppressed": 1}}}}
    block = S.stratify(_reports({"site07": 0.6, "site03": 0.62}, SITES, extra))
    yes = block["attributes"]["t2-fat-suppression"]["levels"]["yes"]
    assert yes["suppressed_sites"] == ["site05"] and yes["n"] == 40 and "site05" not in yes["sites"]
    md = to_markdown(_stratified_blocks({"stratified": {"site-held-out": block}, "protocols": {}}))
    assert "Where the model fails to generalize: results by acquisition" in md
    assert "suppressed (< 5) at site05" in md
    assert "| Fat-suppressed T2 | `yes` |" in md and "reference" in md


def test_attributes_known_nowhere_give_no_strata_and_say_so():
    block = S.stratify({"a": {"n": 10}, "b": {"n": 12}})
    assert block["attributes"] == {} and block["verdict"].startswith("No acquisition attribute has two or more")


def test_meta_regression_with_an_intercept_only_is_the_random_effects_summary():
    y = [0.1, 0.5, 0.9, 1.4, 0.2]
    v = [0.05, 0.08, 0.04, 0.1, 0.06]
    fit = M.meta_regression(y, v, np.ones((5, 1)))
    re = M.random_effects_meta(y, v)
    assert fit["coef"][0] == pytest.approx(re["estimate"]) and fit["tau2"] == pytest.approx(re["tau2"])
    two = M.meta_regression(y + [3.0, 3.2], v + [0.05, 0.05], np.c_[np.ones(7), [0] * 5 + [1, 1]])
    assert two["lo"][1] > 0 and two["p_value"][1] < 0.05 and two["df"] == 5


# ----- warnings ----------------------------------------------------------------------------------------------------
def _site(auc, n_pos=8, n_neg=22):
    var = M.hanley_mcneil_var(auc, n_pos, n_neg)
    return {"auc": M.auc_interval(auc, var, n_pos, n_neg), "n_pos": n_pos, "n_neg": n_neg}


def test_worst_site_is_named_with_its_interval_and_the_others_prediction_interval():
    per_site = {s: _site(a) for s, a in SITES.items()}
    per_site["site07"] = _site(0.4)  # 8 malignant, 22 benign: below even what a site of this size would show
    w = S.worst_site_warning({"per_site": per_site})
    assert w["site"] == "site07" and w["position"] == "below" and w["k_others"] == 7
    assert w["auc"]["value"] < w["observed_lo"] < w["pi_lo"]
    assert "Worst site: site07" in w["text"] and "lies below" in w["text"] and "prediction interval" in w["text"]
    assert w["pi_lo"] > 0.55
    per_site["site07"] = _site(0.55)  # below the prediction interval, not below the interval for its size
    assert S.worst_site_warning({"per_site": per_site})["position"] == "below-point"
    per_site["site07"] = _site(0.84)
    inside = S.worst_site_warning({"per_site": per_site})
    assert inside["position"] == "inside" and "lies inside" in inside["text"]
    # Below the interval for a new site's true AUC, but measured on 2 malignant / 6 benign patients: not called worse.
    per_site["site07"] = _site(0.75, n_pos=2, n_neg=6)
    small = S.worst_site_warning({"per_site": per_site})
    assert small["auc"]["value"] < small["pi_lo"] and small["observed_lo"] < 0.75 < small["pi_lo"]
    assert small["position"] == "below-point" and "not clearly worse" in small["text"]
    assert "2 malignant, 6 benign" in small["text"]


def test_too_few_malignant_cases_are_flagged_for_sites_and_subgroups():
    protocols = {
        "site-held-out": {"label": "federated site-held-out", "per_site": {"a": _site(0.9, 4), "b": _site(0.9, 12)}}
    }
    block = S.stratify(_reports({"site07": 0.6}, SITES))
    out = S.few_malignant_warnings(protocols, {"site-held-out": block})
    texts = [w["text"] for w in out]
    assert any(
        "too few malignant cases to estimate sensitivity" in t and "a (4)" in t and "b (" not in t for t in texts
    )
    assert any("by acquisition" in t and "Fat-suppressed T2 = `yes` (6)" in t for t in texts)
    assert all(w["min_malignant"] == S.MIN_MALIGNANT == 10 for w in out)


def test_extrapolation_from_census_counts():
    census = {
        "site07": {"acq/t2-fat-suppression/yes": 12, "acq/t2-fat-suppression/no": 7, "acq/field-strength/3 T": 19},
        "site01": {"acq/t2-fat-suppression/no": 20, "acq/field-strength/1.5 T": 20},
        "site02": {"acq/t2-fat-suppression/no": 18, "acq/field-strength/1.5 T": 15, "acq/field-strength/3 T": -1},
        "site03": {"acq/t2-fat-suppression/no": 18},  # no field-strength counts: no claim about field strength
    }
    levels = {s: mix_of(c) for s, c in census.items()}
    out = S.extrapolation_warnings(levels, {"site07": ["site01", "site02"]})
    kinds = {w["kind"]: w for w in out}
    assert "no training site had Fat-suppressed T2 = `yes`" in kinds["extrapolation"]["text"]
    assert "Field strength" not in kinds["extrapolation"]["text"]
    assert kinds["thin-support"]["sites"] == ["site02"] and "suppressed census count" in kinds["thin-support"]["text"]
    unknown = S.extrapolation_warnings(levels, {"site07": ["site01", "site03"]})
    assert [w["levels"] for w in unknown] == [[["t2-fat-suppression", "yes"]]]


def test_warnings_render_first_and_plain_in_html():
    block = S.stratify(_reports({"site07": 0.6}, SITES))
    results = {"protocols": {"site-held-out": {"label": "federated site-held-out",
               "per_site": {**{s: _site(a) for s, a in SITES.items()}, "site07": _site(0.55)}}},
               "stratified": {"site-held-out": block}}  # fmt: skip
    results["warnings"] = S.warnings(results, {}, {})
    md = to_markdown(_warning_blocks(results))
    assert md.startswith("## Warnings") and "> **Worst site: site07" in md and "fewer than 10 malignant" in md


# ----- end to end: real ClientApp sites, results.json and the report -----------------------------------------------
@pytest.mark.usefixtures("task_identity")
def test_results_json_and_report_carry_the_stratified_results_and_warnings(tmp_path):
    from server.protocols import run_protocol
    from tests.fakes import ClientGrid
    from tests.fakes import protocol_experiment as experiment

    data = tmp_path / "data"
    sites = []
    for i in range(3):
        yaml = make_site(data, f"h{i}", n=10, n_malignant=4, seed=i, privacy={"min_cell": 2})
        _with_levels(yaml, {"t2-fat-suppression": ["yes" if i == 0 else "no"] * 10, "field-strength": ["1.5 T"] * 10})
        sites.append(yaml)
    exp = experiment("all", plan={"max_folds": 1, "max_held_out": 3, "final_model": False, "local_only": False})
    out = tmp_path / "out"
    run_protocol(ClientGrid(sites), exp, out, synthetic=True, quick=True)
    results = json.loads((out / "results.json").read_text())
    assert set(results["stratified"]) == {"tenfold", "site-held-out"}
    sho = results["stratified"]["site-held-out"]
    fs = sho["attributes"]["t2-fat-suppression"]
    assert fs["reference"] == "no" and fs["levels"]["yes"]["sites"] == ["h0"] and fs["single_site"] == {"yes": "h0"}
    assert fs["levels"]["yes"]["n"] == 10 and fs["levels"]["no"]["n"] == 20
    assert "field-strength" in sho["not_stratified"]  # one level only
    kinds = [w["kind"] for w in results["warnings"]]
    assert "worst-site" in kinds and "few-malignant" in kinds
    # From the census (each site's acquisition mix): h0 held out is the only fat-suppressed site.
    extrapolation = [w for w in results["warnings"] if w["kind"] == "extrapolation"]
    assert [w["site"] for w in extrapolation] == ["h0"] and extrapolation[0]["levels"] == [
        ["t2-fat-suppression", "yes"]
    ]
    md = (out / "report.md").read_text()
    assert "## Warnings" in md and md.index("## Warnings") < md.index("## Results in the paper's format")
    assert "## Where the model fails to generalize: results by acquisition" in md
    assert "only at 1 site (h0)" in md and "no training site had Fat-suppressed T2 = `yes`" in md
    html = (out / "report.html").read_text()
    assert "<code>yes</code>" in html and "`" not in html
    # A stored run's conclusions are re-derived under this release's rules, and the report rendered again.
    verdict = sho["verdict"]
    results["stratified"]["site-held-out"]["verdict"] = "stale wording"
    (out / "results.json").write_text(json.dumps(results))
    assert S.main([str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["stratified"]["site-held-out"]["verdict"] == verdict
    assert "stale wording" not in (out / "report.md").read_text()
    assert not any(math.isnan(x) for x in [fs["levels"]["yes"]["n"]])


def test_simulate_prepares_again_a_cache_made_before_the_acquisition_columns(tmp_path):
    from common.config import load_site_config
    from simulations.run import _needs_prepare

    yaml = make_site(tmp_path, "old", n=6, n_malignant=2)
    cfg = load_site_config(yaml)
    # a cache handed over without its data (no manifest: nothing to prepare from) is used as it is
    assert not cfg.manifest.is_file() and not _needs_prepare(cfg)
    cfg.manifest.parent.mkdir(parents=True, exist_ok=True)
    cfg.manifest.write_text("patient_id,label\n")
    assert _needs_prepare(cfg)  # the data is there: prepare again, and the columns come
    _with_levels(yaml, {name: ["unknown"] * 6 for name in ATTRIBUTES})
    assert not _needs_prepare(cfg)
    (cfg.cache / "index.csv").unlink()
    assert _needs_prepare(cfg)
