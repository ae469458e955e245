"""`simulate run` end to end: two tiny sites under Flower's simulation engine (real SuperLink, Ray, FAB)."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import yaml

from simulations.run import _marked, add_arguments, run
from tests.tinysites import TINY_MODEL, TINY_TRAIN, make_site

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower")]


def test_two_site_simulation_completes_and_leaves_no_process(tmp_path):
    data = tmp_path / "data"
    make_site(data, "hospA", seed=1)
    make_site(data, "hospB", n=10, n_malignant=3, seed=2)
    plan = {"rounds": 2, "evaluate": "final", "model": TINY_MODEL, "train": TINY_TRAIN}
    plan["folds"] = {"k": 3, "seed": 0, "held_out": 0}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(plan))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["--data", str(data), "--out", str(out), "--experiment", str(tmp_path / "exp.yaml")])
    args.timeout = 600

    assert run(args) == 0

    summary = json.loads((out / "simulation.json").read_text())
    assert summary["status"] == "finished:completed"
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["1", "2"] and all(r["sites_ok"] == "2" for r in rows)
    fed = json.loads((out / "federation.json").read_text())
    assert {c["site"] for c in fed["census"]} == {"hospA", "hospB"}
    final = fed["final_evaluation"]
    assert set(final) == {"hospA", "hospB"}
    # Only fold 0 (held out from training) was scored: a third of each site's patients.
    assert final["hospA"]["num-examples"] == 4 and final["hospB"]["num-examples"] in (3, 4)
    assert (out / "checkpoint" / "checkpoint.json").is_file()
    assert _marked(summary["marker"]) == []  # no SuperLink, flwr-simulation or Ray process of this run is left


def test_tenfold_limited_to_two_folds_end_to_end(tmp_path):
    """The protocol runner under the real simulation engine: two of three folds, report rendered, nothing left."""
    data = tmp_path / "data"
    make_site(data, "hospA", seed=1)
    make_site(data, "hospB", n=10, n_malignant=3, seed=2)
    plan = {"protocol": "tenfold", "rounds": 1, "model": TINY_MODEL, "train": TINY_TRAIN, "min_cell": 2}
    plan.update({"folds": {"k": 3, "seed": 0}, "plan": {"max_folds": 2, "local_only": False}})
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(plan))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--experiment", str(tmp_path / "exp.yaml"), "--no-centralized"]
    args = parser.parse_args(argv)
    args.timeout = 600

    assert run(args) == 0

    results = json.loads((out / "results.json").read_text())
    assert set(results["units"]) == {"tenfold/fold-00", "tenfold/fold-01"}
    assert results["synthetic"] is True and set(results["sites"]) == {"hospA", "hospB"}
    assert results["protocols"]["tenfold"]["pooled"]["n"] == sum(
        n for i in results["units"].values() for n in i["tested"].values()
    )
    assert "Synthetic data" in (out / "report.md").read_text() and (out / "report.html").is_file()
    assert _marked(json.loads((out / "simulation.json").read_text())["marker"]) == []
