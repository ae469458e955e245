"""The centralized baseline: folds are the union of the sites' own folds, results are complete and resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tinysites import TINY_MODEL, TINY_TRAIN, make_site

from common.model import ModelConfig
from common.splits import assign_folds
from common.training import TrainConfig
from simulations.centralized import run_centralized


def _run(root, out, **kw):
    """The same small centralized run (2 folds, seed 7) each time it is asked for."""
    model, train = ModelConfig.from_dict(TINY_MODEL), TrainConfig.from_dict({**TINY_TRAIN, "epochs": 1})
    return run_centralized(root / "data", out, model, train, folds=2, seed=7, **kw)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("central")
    for i, name in enumerate(("site-a", "site-b", "site-c")):
        make_site(root / "data", name, n=10, n_malignant=4, seed=i)
    out = root / "out"
    res = _run(root, out)
    return root, out, res


def test_every_patient_scored_once_in_its_own_sites_fold(result):
    root, _, res = result
    oof = res["out_of_fold"]
    assert len(oof) == 30 and len({(r["site"], r["key"]) for r in oof}) == 30
    for site in ("site-a", "site-b", "site-c"):
        rows = [r for r in oof if r["site"] == site]
        folds = assign_folds([r["key"] for r in rows], [r["label"] for r in rows], k=2, seed=7)
        assert all(folds[r["key"]] == r["fold"] for r in rows)
    # a model never scores patients it trained on: each fold's training set excludes that fold
    assert [f["n_train"] for f in res["folds"]] == [30 - sum(r["fold"] == k for r in oof) for k in (0, 1)]


def test_results_files_hold_pooled_and_per_site_metrics(result):
    _, out, res = result
    saved = json.loads((out / "results.json").read_text())
    assert saved["synthetic_data"] is True
    pooled = saved["pooled"]
    c = pooled["confusion"]
    assert c["tp"] + c["fn"] == 12 and c["tn"] + c["fp"] == 18
    assert np.isclose(pooled["accuracy"]["value"], (c["tp"] + c["tn"]) / 30)
    assert set(saved["per_site"]) == {"site-a", "site-b", "site-c"}
    md = (out / "results.md").read_text()
    assert "Synthetic data" in md and "| Yeh et al." in md and "0.92" in md


def test_an_interrupted_run_resumes_from_saved_folds(result, caplog):
    root, out, res = result
    (out / "results.json").unlink()
    messages = []
    again = _run(root, out, progress=messages.append)
    assert all("reused" in m for m in messages) and len(messages) == 2
    assert again["out_of_fold"] == res["out_of_fold"]
