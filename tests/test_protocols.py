"""The protocol runner against an in-process grid whose nodes are the real ClientApp on tiny sites.

Every message the coordinator sends is recorded (who got what), and the sites' own usage logs say which keys each
message trained, validated and tested on: the tests check the protocol's invariants on what actually happened.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.evalstore import EvalStore, default_folder
from common.config import load_site_config
from server.protocols import ProtocolError, plan_units, run_protocol
from tests.fakes import ClientGrid
from tests.fakes import protocol_experiment as experiment
from tests.tinysites import make_site

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


@pytest.fixture()
def three_sites(tmp_path):
    data = tmp_path / "data"
    a = make_site(data, "hospA", n=12, n_malignant=4, seed=1, readers="readers.csv")
    # A reader who calls the first 6 patients malignant (4 malignant + 2 benign): the site's reader CSV.
    rows = [f"hospA-k{i:03d},{'malignant' if i < 6 else 'benign'}" for i in range(12)]
    (a.parent / "readers.csv").write_text("key,reader_call\n" + "\n".join(rows) + "\n")
    return [
        a,
        make_site(data, "hospB", n=10, n_malignant=4, seed=2),
        make_site(data, "hospC", n=9, n_malignant=4, seed=3),
    ]


def usage(site_yaml) -> list[dict]:
    return EvalStore(default_folder(load_site_config(site_yaml).cache)).usage()


def test_plan_units_cover_the_protocols():
    exp = experiment("all", plan={"max_folds": 2, "max_held_out": 1})
    names = [u.name for u in plan_units(exp, ["a", "b", "c"], "t")]
    assert names == ["tenfold/fold-00", "tenfold/fold-01", "site-held-out/a", "local/a", "local/b", "local/c", "final"]
    sho = plan_units(exp.with_(protocol="site-held-out"), ["a", "b", "c"], "t")
    assert sho[0].train_sites == ("b", "c") and sho[0].test == {"a": "all"}


def test_all_protocol_invariants_on_what_the_sites_did(three_sites, tmp_path):
    exp = experiment("all", plan={"max_folds": 2, "max_held_out": 2, "final_model": False})
    grid = ClientGrid(three_sites)
    out = tmp_path / "out"
    results = run_protocol(grid, exp, out, synthetic=True, quick=True)
    names = {1: "hospA", 2: "hospB", 3: "hospC"}

    # Site-held-out: the held-out site got no training message for its unit (checked on the messages).
    for held in ("hospA", "hospB"):
        unit = f"site-held-out/{held}"
        got = {names[n] for n, kind, cfg in grid.log if kind == "train" and cfg.get("unit") == unit}
        assert got == {"hospA", "hospB", "hospC"} - {held}
        tested = {
            names[n]
            for n, kind, cfg in grid.log
            if kind == "evaluate" and cfg.get("unit") == unit and cfg["subset"] != "none"
        }
        assert tested == {held}

    # No patient in train and test of the same fold, nor in the validation split, per the sites' own usage logs.
    for site in three_sites:
        log = usage(site)
        counts = results["membership"]["per_site"][site.parent.name]
        for fold in (0, 1):
            unit = f"tenfold/fold-{fold:02d}"
            train = {k for e in log if e["unit"] == unit and e["kind"] == "train" for k in e["keys"]}
            val = {
                k
                for e in log
                if e["unit"] == unit and e["kind"] in ("train", "validate")
                for k in e.get("val_keys", e["keys"] if e["kind"] == "validate" else [])
            }
            test = {k for e in log if e["unit"] == unit and e["kind"] == "test" for k in e["keys"]}
            # Per-key membership: a small site's fold or validation split may be empty; the counts say so.
            assert train and len(test) == counts["fold-pos"][fold] + counts["fold-neg"][fold]
            assert len(val) == counts["val-pos"][fold] + counts["val-neg"][fold]
            assert not train & test and not val & test and not train & val
        # Folds 0 and 1 tested disjoint patients.
        t0 = {k for e in log if e["unit"] == "tenfold/fold-00" and e["kind"] == "test" for k in e["keys"]}
        t1 = {k for e in log if e["unit"] == "tenfold/fold-01" and e["kind"] == "test" for k in e["keys"]}
        assert not t0 & t1

    # Threshold: chosen from validation histograms only; the evaluation messages carried no threshold (−1) and
    # the unit's threshold is recorded with its validation sites.
    per_site = results["membership"]["per_site"]
    for name, info in results["units"].items():
        if info["kind"] in ("tenfold", "site-held-out"):
            fold = int(name[-2:]) if info["kind"] == "tenfold" else None

            def n_val(c, fold=fold):
                return (
                    c["val-pos"][fold] + c["val-neg"][fold] if fold is not None else c["all-pos"][1] + c["all-neg"][1]
                )

            assert set(info["validation"]) == {s for s in info["train_sites"] if n_val(per_site[s])}
            assert 0.0 <= info["threshold"] <= 1.0
    assert all(cfg["threshold"] == -1.0 for _, kind, cfg in grid.log if kind == "evaluate")

    # The report: results and files.
    ten = results["protocols"]["tenfold"]
    tested = [n for u, i in results["units"].items() if u.startswith("tenfold/") for n in i["tested"].values()]
    assert ten["pooled"]["n"] == sum(tested) > 0  # each out-of-fold patient once, reported once at the end
    assert set(results["protocols"]["local-only"]["matrix"]) == {"hospA", "hospB", "hospC"}
    assert "tenfold_vs_site_held_out" in results["contrasts"] and results["verdict"]
    # Reader comparison computed at hospA: only counts came back (b, c), over its out-of-fold patients.
    readers = results["readers"]["tenfold"]
    assert set(readers["per_site"]) == {"hospA"} and readers["mcnemar"]["b"] + readers["mcnemar"]["c"] <= readers["n"]
    assert readers["n"] == results["protocols"]["tenfold"]["per_site"]["hospA"]["n"]
    assert (out / "report.md").is_file() and "base64," in (out / "report.html").read_text()
    assert json.loads((out / "results.json").read_text())["protocol"] == "all"


def test_validation_scores_do_not_change_with_test_labels(three_sites, tmp_path):
    """No threshold sees test data: flipping the labels of fold 0 patients leaves the fold-0 threshold unchanged."""
    exp = experiment("tenfold", plan={"max_folds": 1, "local_only": False})
    a = run_protocol(ClientGrid(three_sites), exp, tmp_path / "a")["units"]["tenfold/fold-00"]["threshold"]
    # Scramble the test fold's scores' labels at every site: the threshold must not move.
    import csv

    from client.tasks import fold_of, open_site

    for y in three_sites:
        site = open_site({"site-config": str(y)}, {})
        folds = fold_of(site, 3, 0)
        test_keys = {k for k, f in zip(site.data.keys, folds, strict=True) if f == 0}
        index = load_site_config(y).cache / "index.csv"
        rows = list(csv.DictReader(index.open()))
        for r in rows:
            if r["key"] in test_keys:  # the stacks stay; only what a peeking threshold could use changes
                np.save(load_site_config(y).cache / r["file"], np.zeros((6, 32, 32), np.float32))
    b = run_protocol(ClientGrid(three_sites), exp, tmp_path / "b")["units"]["tenfold/fold-00"]["threshold"]
    assert a == b


def test_resume_skips_finished_units(three_sites, tmp_path):
    exp = experiment("tenfold", plan={"max_folds": 2, "local_only": False})
    out = tmp_path / "out"
    # census, membership, fold 0 train + eval + the secure sum's reveal step, mid fold 1
    crashing = ClientGrid(three_sites, fail_after=3 + 3 + 3 + 3 + 3 + 2)
    with pytest.raises(KeyboardInterrupt):
        run_protocol(crashing, exp, out)
    progress = json.loads((out / "protocol" / "progress.json").read_text())
    assert list(progress["units"]) == ["tenfold/fold-00"]
    with pytest.raises(ProtocolError, match="resume"):
        run_protocol(ClientGrid(three_sites), exp, out)
    grid = ClientGrid(three_sites)
    results = run_protocol(grid, exp, out, resume=True)
    units = {cfg.get("unit") for _, kind, cfg in grid.log if kind in ("train", "evaluate")}
    assert units == {"tenfold/fold-01"}
    assert set(results["units"]) == {"tenfold/fold-00", "tenfold/fold-01"}
    assert results["provenance"]["evaluation_tag"].endswith(progress["nonce"])


def test_local_only_models_travel_in_the_wire_precision_and_stay_float32_at_the_coordinator(three_sites, tmp_path):
    from server.protocols import train_local
    from server.wire import read_packed

    class WireGrid(ClientGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            self.sent = [read_packed(m.content.array_records["arrays"]) for m in messages]
            self.replies = super().send_and_receive(messages, timeout=timeout)
            return self.replies

    def floats(arrays) -> set:
        return {str(a.dtype) for a in arrays.values() if a.dtype.kind == "f"}

    exp = experiment("all", transfer_dtype="float16", plan={"max_folds": 1, "max_held_out": 1})
    units = [u for u in plan_units(exp, ["hospA", "hospB", "hospC"], "t") if u.kind == "local"]
    grid = WireGrid(three_sites)
    models = train_local(grid, units, {"hospA": 1, "hospB": 2, "hospC": 3}, tmp_path, resume=False)
    assert len(grid.sent) == 3 and all(floats(s) == {"float16"} for s in grid.sent)
    assert all(floats(read_packed(r.content.array_records["arrays"])) == {"float16"} for r in grid.replies)
    assert set(models) == {"hospA", "hospB", "hospC"}
    assert all(floats(m) == {"float32"} and all(np.isfinite(a).all() for a in m.values()) for m in models.values())


def test_a_site_without_a_class_among_its_training_patients_sits_the_unit_out_and_the_report_says_why(tmp_path):
    """Per-key membership balances classes only in expectation: hospC (3 malignant of 9) has no malignant inner-train
    patient when fold 0 is held out. It sits out that unit's training (still scoring its held-out patients) and its
    local-only model, with the reason in results.json and the report; never silently."""
    data = tmp_path / "data"
    sites = [
        make_site(data, "hospA", n=12, n_malignant=4, seed=1),
        make_site(data, "hospC", n=9, n_malignant=3, seed=3),
    ]
    exp = experiment("tenfold", plan={"max_folds": 1, "local_only": True})
    grid = ClientGrid(sites)
    out = tmp_path / "out"
    results = run_protocol(grid, exp, out)
    sat = results["membership"]["sat_out"]
    assert set(sat) == {"tenfold/fold-00", "local/hospC"} and set(sat["tenfold/fold-00"]) == {"hospC"}
    assert "no malignant training patient" in sat["tenfold/fold-00"]["hospC"]
    fold0 = results["units"]["tenfold/fold-00"]
    assert fold0["trained_sites"] == ["hospA"] and "hospC" in fold0["tested"]
    trained = {node for node, kind, cfg in grid.log if kind == "train" and cfg.get("unit") == "tenfold/fold-00"}
    assert trained == {1}  # hospC (node 2) got no training message for that unit
    assert results["units"]["local/hospC"]["failed"]["hospC"].startswith("no malignant")
    counts = results["membership"]["per_site"]["hospC"]
    assert sum(counts["fold-pos"]) == 3 and counts["train-pos"][0] == 0
    report = (out / "report.md").read_text()
    assert "Patient membership and class balance" in report and "sat out" in report


def _exact_input(site_yaml, run: str, sum_id: str) -> np.ndarray:
    """What a site put into a summation (its own record: the test reads the site's state, the coordinator cannot)."""
    from client.securesum import SiteSums

    record = SiteSums(default_folder(load_site_config(site_yaml).cache), run)._load(sum_id)
    return np.asarray(record["vector"], dtype=np.int64)


def test_thresholds_and_report_histograms_come_from_secure_sums_of_exact_histograms(three_sites, tmp_path):
    from common import metrics as M
    from common.replies import SECURESUM
    from server.aggregates import youden_from_histograms

    exp = experiment("tenfold", plan={"max_folds": 1, "local_only": False})
    grid = ClientGrid(three_sites)
    results = run_protocol(grid, exp, tmp_path / "out")
    run = results["provenance"]["evaluation_tag"]
    unit = results["units"]["tenfold/fold-00"]
    pooling = unit["threshold_choice"]["pooling"]
    assert pooling["pooling"] == "secure sum" and pooling["participants"] == ["hospA", "hospB", "hospC"]
    # The threshold is the Youden threshold of the exact sum of the sites' validation histograms.
    exact = sum(_exact_input(s, run, "tenfold/fold-00/validation") for s in three_sites)
    assert exact.size == 2 * M.N_VALIDATION_BINS and exact.sum() == sum(unit["validation"].values())
    assert unit["threshold"] == youden_from_histograms(exact[:1000], exact[1000:])["threshold"]
    # What travelled: masked bytes in a ConfigRecord; the MetricRecords (which Flower averages) carried zeros.
    evals = [r for r in grid.replies if r.metadata.message_type == "evaluate"]
    assert len(evals) == 3
    for reply in evals:
        assert isinstance(reply.content.config_records[SECURESUM]["masked"], bytes)
        metrics = reply.content.metric_records["metrics"]
        assert not any(metrics["val-hist-pos"]) and not any(metrics["val-hist-neg"]) and metrics["val-examples"] > 0
    # The report's pooled-histogram AUC is that of the exact pooled out-of-fold scores.
    ten = results["protocols"]["tenfold"]
    assert ten["pooling"]["pooling"] == "secure sum" and len(ten["pooling"]["participants"]) == 3
    ys, ss = zip(*[EvalStore(default_folder(load_site_config(s).cache)).arrays(unit["tag"])[1:3] for s in three_sites])
    hp, hn = M.score_histogram(np.concatenate(ys), np.concatenate(ss))
    assert ten["pooled"]["auc_histogram"] == pytest.approx(M.histogram_auc(hp, hn), abs=1e-12)
    assert "secure sum" in (tmp_path / "out" / "report.md").read_text()


def test_a_site_lost_mid_summation_leaves_a_secure_sum_over_the_others_and_a_site_that_opts_out_is_named(tmp_path):
    data = tmp_path / "data"
    sites = [make_site(data, f"hosp{c}", n=12, n_malignant=5, seed=i) for i, c in enumerate("ABCD")]
    exp = experiment("tenfold", plan={"max_folds": 1, "local_only": False})  # all four have validation patients
    # hospD's evaluation reply never arrives (its vector for attempt 1 is lost): attempt 2 runs over the other three.
    grid = ClientGrid(sites, drop=lambda node, cfg: node == 4 and cfg.get("unit") == "tenfold/fold-00")
    results = run_protocol(grid, exp, tmp_path / "out")
    pooling = results["units"]["tenfold/fold-00"]["threshold_choice"]["pooling"]
    assert pooling["pooling"] == "secure sum" and pooling["attempts"] == 2, pooling
    assert pooling["participants"] == ["hospA", "hospB", "hospC"] and "hospD" in pooling["dropped"]

    # A site with privacy.secure_pooling off: with only two others left, no secure sum; the report says who and why.
    sites2 = [make_site(tmp_path / "d2", f"hosp{c}", n=12, n_malignant=5, seed=i) for i, c in enumerate("AB")]
    sites2.append(make_site(tmp_path / "d2", "hospC", n=12, n_malignant=5, seed=2, privacy={"secure_pooling": False}))
    results = run_protocol(ClientGrid(sites2), exp, tmp_path / "out2")
    pooling = results["units"]["tenfold/fold-00"]["threshold_choice"]["pooling"]
    assert pooling["pooling"] == "per-site suppressed"
    assert "secure pooling is off" in pooling["clear_sites"]["hospC"]
    assert "at least 3" in pooling["clear_sites"]["hospA"]
    assert "secure pooling is off" in (tmp_path / "out2" / "report.md").read_text()


def test_repeated_tenfold_runs_its_repeats_on_other_fold_splits_and_reports_the_spread(three_sites, tmp_path):
    """The registry's proof: server/repeated_tenfold.py plus one registration line gives a protocol that plans,
    trains, pools and reports (results block, spread, report section) with nothing else changed."""
    exp = experiment("repeated-tenfold", plan={"max_folds": 1, "repeats": 2, "local_only": False})
    grid = ClientGrid(three_sites)
    out = tmp_path / "out"
    results = run_protocol(grid, exp, out)
    assert set(results["units"]) == {"repeated-tenfold/rep-01/fold-00", "repeated-tenfold/rep-02/fold-00"}
    block = results["protocols"]["repeated-tenfold"]
    assert [r["fold_seed"] for r in block["repeats"]] == [0, 1] and block["spread"]["auc_random_effects"]["k"] <= 2
    assert block["pooled"]["n"] == block["repeats"][0]["n"] > 0
    # Each repeat held out a fold drawn from its own seed: the patients tested differ between the repeats.
    tested = {
        unit: {
            k
            for site in three_sites
            for e in usage(site)
            if e["unit"] == unit and e["kind"] == "test"
            for k in e["keys"]
        }
        for unit in results["units"]
    }
    assert tested["repeated-tenfold/rep-01/fold-00"] != tested["repeated-tenfold/rep-02/fold-00"]
    # Membership was asked for each fold seed (sit-outs and secure sums use the repeat's own split).
    seeds = {cfg.get("fold-seed") for _, kind, cfg in grid.log if kind == "query" and cfg.get("action") == "membership"}
    assert seeds == {0, 1}
    report = (out / "report.md").read_text()
    assert "repeated tenfold (2 repeats" in report and "Spread between the repeats" in report


def test_the_report_renders_every_protocol_block_it_is_given():
    from server.report import _protocols

    results = {"protocols": {"mystery": {"pooled": {"n": 1}}, "tenfold": {"pooled": {"n": 2}}, "empty": {}}}
    assert [name for name, _ in _protocols(results)] == ["tenfold", "mystery"]
