"""Bounded influence per site (server/strategy.InfluenceBound): census cap, update-norm bound, weight share cap."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.experiment import ExperimentConfig
from server.federation import run_training
from server.strategy import cap_shares, make_strategy
from tests.fakes import NORM, FakeGrid, bn_arrays, named, reply, start, train_metrics
from tests.tinysites import TINY_MODEL

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


def site(step: float = 0.01, n: int = 10, claim: float | None = None, scale: float = 1.0):
    """A site whose census says `n` patients; its update moves every float tensor by `step` × `scale` and its reply
    claims `claim` examples (default: n)."""

    def answer(msg):
        if msg.metadata.message_type == "query":
            return reply(msg, metrics={"num-examples": n})
        arrays = named(msg)
        for k, v in arrays.items():
            if v.dtype.kind == "f" and "running" not in k:
                arrays[k] = v + np.float32(step * scale)
        return reply(msg, arrays, train_metrics(claim if claim is not None else n))

    return answer


def experiment(**influence) -> ExperimentConfig:
    data = {"rounds": 1, "quorum": {"min_sites": 2, "join_timeout_s": 1, "round_timeout_s": 5}, "evaluate": "none"}
    if influence:
        data["influence"] = influence
    return ExperimentConfig.from_dict(data)


def test_a_count_above_the_census_is_rejected_and_cannot_overwrite_the_model(tmp_path):
    """The reported attack: a site with a dozen patients claims an enormous num-examples. Through run_training (the
    census is taken there) its reply is dropped with the reason; the honest sites' mean is the model."""
    exp = ExperimentConfig.from_dict({"rounds": 1, "model": TINY_MODEL, "evaluate": "none",
                                      "quorum": {"min_sites": 3, "join_timeout_s": 1, "round_timeout_s": 5}})  # fmt: skip
    grid = FakeGrid({1: site(0.01), 2: site(0.03), 3: site(5.0, n=12, claim=1e9)})
    summary = run_training(grid, exp, tmp_path)
    rec = summary["rounds"][0]
    assert "above the site's census total 12" in next(iter(rec["rejected"].values()))
    assert len(rec["accepted"]) == 2
    with np.load(tmp_path / "final_arrays.npz") as z:
        start_ = {k: v for k, v in named_initial(exp).items()}
        moved = z["fc.weight"] - start_["fc.weight"]
    np.testing.assert_allclose(moved, 0.02, atol=1e-6)  # the mean of the two honest steps, weights 10 and 10


def named_initial(exp):
    from server.federation import initial_arrays

    return initial_arrays(exp)


def test_an_update_beyond_the_ratio_is_scaled_back_and_recorded():
    exp = experiment(max_update_ratio=0.5)
    grid = FakeGrid({1: site(0.01), 2: site(0.01, scale=1e4)})  # a scaled (boosted) update
    strategy = make_strategy(exp, NORM, census={1: "honest", 2: "booster"})
    init = bn_arrays()
    start(strategy, grid, init, rounds=1)
    rec = strategy.history[0]
    assert set(rec.bounded) == {"booster"} and rec.bounded["booster"]["update_ratio"] > 0.5
    final = {k: v.numpy() for k, v in strategy.latest.items()}
    keys = [k for k in init if init[k].dtype.kind == "f" and "running" not in k]
    dist = np.sqrt(sum(((final[k] - init[k]) ** 2).sum() for k in keys))
    norm = np.sqrt(sum((init[k] ** 2).sum() for k in keys))
    # honest moves ~0.01 per entry; the booster is held to 0.5 × the global norm and weighs half
    assert dist <= 0.5 * 0.5 * norm + 0.01 * np.sqrt(sum(init[k].size for k in keys)) + 1e-4


def test_default_bound_leaves_ordinary_updates_alone():
    """Ordinary local training moves ResNet50 layer4+head by about 0.06 of its norm (quick plan, measured);
    the default ratio 1 never touches such updates."""
    grid = FakeGrid({1: site(0.001), 2: site(0.002)})
    strategy = make_strategy(experiment(), NORM, census={1: "a", 2: "b"})
    init = bn_arrays()
    start(strategy, grid, init, rounds=1)
    rec = strategy.history[0]
    assert rec.bounded == {} and set(rec.update_ratios) == {"a", "b"} and 0 < rec.update_ratios["a"] < 1
    np.testing.assert_allclose(strategy.latest["fc.weight"].numpy(), init["fc.weight"] + 0.0015, rtol=1e-5)


def test_no_site_weighs_more_than_its_share():
    grid = FakeGrid({1: site(0.0, n=90), 2: site(0.01, n=5), 3: site(0.02, n=5)})
    strategy = make_strategy(experiment(max_site_share=0.5), NORM, census={1: "big", 2: "b", 3: "c"})
    init = bn_arrays()
    start(strategy, grid, init, rounds=1)
    rec = strategy.history[0]
    assert rec.bounded["big"]["weight"] == [90.0, 10.0]  # capped to half of the new total 10 + 5 + 5
    # weights 10, 5, 5: mean step (0 × 10 + 0.01 × 5 + 0.02 × 5) / 20
    np.testing.assert_allclose(strategy.latest["fc.weight"].numpy(), init["fc.weight"] + 0.0075, atol=1e-6)


@pytest.mark.parametrize(
    "weights", [[100, 10, 10, 10], [100, 100, 1, 1], [5, 5], [9, 1], [1, 1, 1], [3, 2, 1], [50, 40, 30, 20, 10]]
)
@pytest.mark.parametrize("share", [0.2, 0.3, 0.5, 0.9, 1.0])
def test_cap_shares_never_exceeds_the_share_and_keeps_the_order(weights, share):
    capped = cap_shares([float(w) for w in weights], share)
    total = sum(capped)
    if share * len(weights) > 1:
        assert max(capped) <= share * total * (1 + 1e-9)
    else:
        assert np.ptp(capped) <= 1e-9 * max(capped)  # infeasible (or exactly at 1/n): everyone equal
    assert all(c <= w + 1e-12 or share * len(weights) <= 1 for c, w in zip(capped, weights, strict=True))
    order = np.argsort(weights, kind="stable")
    assert np.all(np.diff(np.asarray(capped)[order]) >= -1e-12)
    if max(weights) <= share * sum(weights):
        assert capped == [float(w) for w in weights]


def test_influence_settings_are_validated_and_fingerprinted():
    base = experiment()
    assert (
        "influence" in base.to_dict()
        and base.fingerprint()
        == ExperimentConfig.from_dict(
            {"rounds": 1, "evaluate": "none", "quorum": {"min_sites": 2, "join_timeout_s": 1, "round_timeout_s": 5}}
        ).fingerprint()
    )
    assert experiment(max_site_share=0.3).fingerprint() != base.fingerprint()
    with pytest.raises(Exception, match="influence.max_site_share"):
        experiment(max_site_share=1.5)


def test_a_site_inflating_its_validation_histogram_cannot_set_the_threshold(tmp_path):
    """Through the real ClientApp: one site multiplies its validation histograms (which pick the pooled threshold)
    and its report counts by 1000. The coordinator drops both with the reason; the other sites' results stand."""
    from flwr.app import MetricRecord

    from server.protocols import run_protocol
    from tests.fakes import ClientGrid, protocol_experiment
    from tests.tinysites import make_site

    data = tmp_path / "data"
    sites = [
        make_site(data, "hospA", n=12, n_malignant=4, seed=1),
        make_site(data, "hospB", n=12, n_malignant=4, seed=2),
    ]

    class Inflating(ClientGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            for r in replies:
                if r.metadata.src_node_id != 2 or r.has_error():
                    continue
                if "metrics" in r.content.metric_records and "val-hist-pos" in r.content.metric_records["metrics"]:
                    m = dict(r.content.metric_records["metrics"])
                    m["val-hist-pos"] = [v * 1000 for v in m["val-hist-pos"]]
                    m["val-hist-neg"] = [v * 1000 for v in m["val-hist-neg"]]
                    m["val-examples"] = 1000.0
                    r.content["metrics"] = MetricRecord(m)
                if "report" in r.content.config_records:
                    rep = json.loads(str(r.content.config_records["report"]["report"]))
                    for t in rep["tags"].values():
                        t["n"] = t.get("n", 0) * 1000
                    r.content.config_records["report"]["report"] = json.dumps(rep)
            return replies

    grid = Inflating(sites)
    exp = protocol_experiment("tenfold", plan={"max_folds": 1, "local_only": False})
    results = run_protocol(grid, exp, tmp_path / "out")
    fold = results["units"]["tenfold/fold-00"]
    assert "above the site's census total 12" in fold["failed"]["hospB"]
    assert "hospB" not in fold["validation"]
    assert results["reports_missing"] == ["hospB"]
