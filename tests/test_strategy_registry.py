"""Strategies by name (server/strategies.py): parameters validated on load, every registered strategy's state
survives an interrupted run, robust aggregators judge the trained tensors while BatchNorm statistics stay averaged."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.errors import ConfigError
from server import checkpoint
from server import federation as F
from server.experiment import ExperimentConfig
from server.protocols import plan_units, train_local
from server.strategies import STRATEGIES
from server.strategy import NormAveraging, make_strategy
from tests.fakes import NORM, FakeGrid, bn_arrays, responder, start
from tests.fakes import training_experiment as experiment
from tests.tinysites import TINY_MODEL

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py

# Parameters that give each strategy state to lose (FedAvgM's momentum needs server_momentum > 0).
PARAMS = {
    "fedprox": {"proximal_mu": 0.1},
    "fedadam": {"eta": 0.05},
    "fedyogi": {"eta": 0.05},
    "fedavgm": {"server_momentum": 0.9, "server_learning_rate": 0.7},
    "fedtrimmedavg": {"beta": 0.34},
    "krum": {"num_malicious_nodes": 1},
}
SITES = {1: (0.1, 5), 2: (-0.2, 10), 3: (0.5, 20), 4: (0.05, 8)}  # node → (shift of its update, num-examples)


def test_every_registered_strategy_is_tested_here():
    assert set(STRATEGIES) == {
        "fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg", "krum"
    }  # fmt: skip


class Crash(Exception):
    pass


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_interrupted_and_resumed_run_ends_with_the_same_tensors(name, tmp_path, monkeypatch):
    monkeypatch.setattr(F, "initial_arrays", lambda exp: bn_arrays())  # a small model with BN statistics
    data = {"rounds": 4, "evaluate": "none", "strategy": {"name": name, **PARAMS.get(name, {})}}
    data["quorum"] = {"min_sites": 2, "join_timeout_s": 1, "round_timeout_s": 5}
    exp = ExperimentConfig.from_dict(data)

    def grid(crash_at: int | None = None) -> FakeGrid:
        def site(shift, n):
            base = responder(shift=shift, n=n)

            def answer(msg):
                train = msg.metadata.message_type == "train"
                if crash_at is not None and train and msg.content["config"]["server-round"] == crash_at:
                    raise Crash  # the coordinator dies while round `crash_at` is under way
                return base(msg)

            return answer

        return FakeGrid({node: site(*kw) for node, kw in SITES.items()})

    F.run_training(grid(), exp, tmp_path / "straight")
    with pytest.raises(Crash):
        F.run_training(grid(crash_at=3), exp, tmp_path / "resumed")
    ck = checkpoint.load(tmp_path / "resumed" / "checkpoint", exp.fingerprint())
    assert ck.round == 2
    if name in ("fedadam", "fedyogi", "fedavgm"):  # state that a fresh strategy would not have
        assert {"fedadam": "m_t", "fedyogi": "v_t", "fedavgm": "momentum_vector"}[name] in ck.strategy_state
    summary = F.run_training(grid(), exp, tmp_path / "resumed", resume=True)
    assert summary["resumed_after"] == 2 and [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]
    with (
        np.load(tmp_path / "straight" / "final_arrays.npz") as a,
        np.load(tmp_path / "resumed" / "final_arrays.npz") as b,
    ):
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
        moved = not np.array_equal(a["conv.weight"], bn_arrays()["conv.weight"])
    assert moved


def test_momentum_is_state_and_a_reset_would_show():
    """The test above has teeth: FedAvgM's momentum is gathered, and restoring nothing gives other tensors."""
    exp = experiment(rounds=3, strategy={"name": "fedavgm", "server_momentum": 0.9})
    sites = {n: responder(shift=s, n=k) for n, (s, k) in SITES.items()}
    straight = make_strategy(exp, NORM)
    start(straight, FakeGrid(sites), bn_arrays(), rounds=3)
    first = make_strategy(exp, NORM)
    start(first, FakeGrid(sites), bn_arrays(), rounds=2)
    saved = checkpoint.unflatten_state(checkpoint.flatten_state(first.strategy_state()))
    arrays = {k: v.numpy() for k, v in first.latest.items()}
    out = {}
    for restore in (True, False):
        again = make_strategy(exp, NORM, round_offset=2)
        if restore:
            again.load_strategy_state(saved)
        start(again, FakeGrid(sites), arrays, rounds=1)
        out[restore] = again.latest["conv.weight"].numpy()
    np.testing.assert_array_equal(out[True], straight.latest["conv.weight"].numpy())
    assert not np.array_equal(out[False], out[True])


def test_robust_aggregators_judge_trained_tensors_and_average_bn_statistics():
    sites = {1: responder(shift=0.1, n=5), 2: responder(shift=0.2, n=10), 3: responder(shift=50.0, n=100)}
    init = bn_arrays()
    weights = np.array([5, 10, 100]) / 115
    for name, kw in (("fedmedian", {}), ("fedtrimmedavg", {"beta": 0.34}), ("krum", {"num_malicious_nodes": 1})):
        strategy = make_strategy(experiment(rounds=1, strategy={"name": name, **kw}), NORM)
        start(strategy, FakeGrid(sites), init, rounds=1)
        got = {k: v.numpy() for k, v in strategy.latest.items()}
        # The hostile site (shift 50, most examples) does not move the trained tensors: examples are not weights.
        assert np.abs(got["conv.weight"] - init["conv.weight"]).max() < 0.25, name
        # BatchNorm statistics: the plain example-weighted mean of every accepted reply, hostile one included.
        mean = sum(w * init["bn.running_mean"].astype(np.float64) + w * s for w, s in zip(weights, (0.1, 0.2, 50.0)))
        np.testing.assert_allclose(got["bn.running_mean"], mean, rtol=1e-5)
        assert got["bn.num_batches_tracked"].dtype == np.int64 and got["bn.num_batches_tracked"].shape == ()
        assert len(strategy.history[0].accepted) == 3


def test_old_checkpoints_moments_are_read_and_norm_statistics_dropped():
    # Before: every exchanged tensor went through the server optimizer, BN statistics included.
    legacy = {
        f"{m}/{k}": np.full(np.shape(v), 0.01, np.float32) for k, v in bn_arrays().items() for m in ("m_t", "v_t")
    }
    state = checkpoint.unflatten_state(legacy)
    assert set(state) == {"m_t", "v_t"} and set(state["m_t"]) == set(bn_arrays())
    strategy = make_strategy(experiment(strategy={"name": "fedadam"}), NORM)
    strategy.load_strategy_state(state)
    assert set(strategy.m_t) == set(bn_arrays()) - set(NORM) and isinstance(strategy, NormAveraging)
    start(strategy, FakeGrid({1: responder(shift=0.1), 2: responder(shift=0.2)}), bn_arrays(), rounds=1)


def test_state_round_trips_and_unknown_types_are_refused():
    state = {
        "a": np.arange(3.0),
        "d": {"x": np.ones(2)},
        "l": [np.zeros(1), np.ones(2)],
        "r": ArrayRecord({"w": Array(np.full(2, 3.0))}),
        "s": True,
        "n": None,
        "e": [],
    }
    back = checkpoint.unflatten_state(checkpoint.flatten_state(state))
    assert set(back) == {"a", "d", "l", "r", "s", "e"} and back["s"] is True and back["e"] == []
    assert [v.tolist() for v in back["l"]] == [[0.0], [1.0, 1.0]] and back["r"]["w"].numpy().tolist() == [3.0, 3.0]
    with pytest.raises(TypeError, match="'odd'"):
        checkpoint.flatten_state({"odd": object()})


@pytest.mark.parametrize(
    ("strategy", "match"),
    [
        ({"name": "fedtrimmedavg", "beta": 0.5}, r"strategy\.beta': expected a number in \[0.0, 0.5\)"),
        ({"name": "krum", "num_malicious_nodes": 1.5}, r"strategy\.num_malicious_nodes': expected an integer"),
        ({"name": "krum", "num_malicious_nodes": -1}, r"strategy\.num_malicious_nodes'"),
        ({"name": "fedavg", "server_momentum": 0.9}, r"strategy\.server_momentum'.*a parameter of fedavgm"),
        ({"name": "fedavgm", "momentum": 0.9}, r"strategy\.momentum'.*an unknown key"),
        ({"name": "bulyan"}, r"strategy\.name': expected one of fedavg, .*krum"),
    ],
)
def test_strategy_parameters_are_validated_with_the_file_and_key(tmp_path, strategy, match):
    with pytest.raises(ConfigError, match=match) as err:
        ExperimentConfig.from_dict({"strategy": strategy}, tmp_path / "experiment.yaml")
    assert str(tmp_path / "experiment.yaml") in str(err.value)


def test_new_parameters_are_recorded_and_old_experiments_keep_their_fingerprint():
    old = ExperimentConfig.from_dict({"strategy": {"name": "fedadam", "eta": 0.05}, "model": {"arch": "resnet18"}})
    # Computed before the registry existed: the same experiment is still the same experiment (checkpoints, tags).
    assert old.fingerprint() == "3de05522723eddfbb0ee9d86f5eb1123315cdadad7e23a7f7e5bd4af6e5c51b7"
    assert ExperimentConfig.from_dict({}).fingerprint() == (
        "544f2e1568e686ca27680be456f7d4abdef74701126c55125ae11b4f7ab75e5d"
    )
    assert set(old.to_dict()["strategy"]) == {"name", "fedbn", "proximal_mu", "eta", "beta_1", "beta_2", "tau"}
    krum = ExperimentConfig.from_dict({"strategy": {"name": "krum"}})
    assert krum.to_dict()["strategy"]["num_malicious_nodes"] == 0  # defaults are written down (provenance)
    again = ExperimentConfig.from_dict(krum.to_dict())
    assert again.fingerprint() == krum.fingerprint()
    momentum = ExperimentConfig.from_dict({"strategy": {"name": "fedavgm", "server_momentum": 0.9}})
    assert momentum.fingerprint() != ExperimentConfig.from_dict({"strategy": {"name": "fedavgm"}}).fingerprint()


def test_protocol_runner_and_rounds_drop_the_same_replies_for_the_same_reasons(tmp_path, caplog):
    """One reply filter (server/replyfilter.py): the local-only baseline's messages and a strategy round agree."""
    bad = {"nan": responder(nan=True), "extra": responder(extra_key=True), "shape": responder(bad_shape=True)}
    sites = {"good": responder(shift=0.1), **bad}
    nodes = {name: i + 1 for i, name in enumerate(sites)}
    grid = FakeGrid({nodes[name]: answer for name, answer in sites.items()})
    data = {"protocol": "all", "rounds": 1, "model": {**TINY_MODEL, "trainable": "head"}}
    data["quorum"] = {"min_sites": 1, "join_timeout_s": 1, "round_timeout_s": 5}
    exp = ExperimentConfig.from_dict(data)
    units = [u for u in plan_units(exp, list(sites), "t") if u.kind == "local"]
    with caplog.at_level("WARNING", logger="flwr.spinefed.protocols"):
        models = train_local(grid, units, nodes, tmp_path, resume=False)
    assert set(models) == {"good"}
    local = {r.getMessage().split("site ", 1)[1].split(" dropped: ")[0]: r.getMessage().split(" dropped: ")[1]
             for r in caplog.records if "dropped" in r.getMessage()}  # fmt: skip
    strategy = make_strategy(experiment(rounds=1), [], census={n: s for s, n in nodes.items()})
    start(strategy, FakeGrid({nodes[name]: answer for name, answer in sites.items()}), F.initial_arrays(exp), 1)
    assert strategy.history[0].rejected == local and set(local) == set(bad)
