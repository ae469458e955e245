"""Robust strategy, quorum and checkpoint/resume against a fake Grid (no processes, no training)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from flwr.app import Array, MetricRecord, RecordDict

from server import checkpoint
from server.experiment import ExperimentConfig
from server.federation import initial_arrays, run_training
from server.quorum import QuorumNotReached
from server.strategy import make_strategy
from tests.fakes import NORM, FakeGrid, bn_arrays, named, responder, start, train_metrics
from tests.fakes import training_experiment as experiment
from tests.tinysites import TINY_MODEL

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


def test_fedadam_keeps_bn_variances_finite_and_positive():
    exp = experiment(strategy={"name": "fedadam", "eta": 0.5}, rounds=4)
    # Sites shrink their variances sharply each round: Adam's steps on them would overshoot below zero.
    grid = FakeGrid({1: responder(shift=-0.5, n=5), 2: responder(shift=-0.4, n=15)})
    stock = make_strategy(exp, norm_keys=[])  # BN statistics through the optimizer: the trap (Flower #1060)
    start(stock, grid, bn_arrays(), rounds=1)
    assert not (stock.latest["bn.running_var"].numpy() > 0).all()
    strategy = make_strategy(exp, NORM)
    start(strategy, grid, bn_arrays(), rounds=4)
    final = {k: v.numpy() for k, v in strategy.latest.items()}
    assert np.isfinite(final["bn.running_var"]).all() and (final["bn.running_var"] > 0).all()
    assert final["bn.num_batches_tracked"].dtype == np.int64 and final["bn.num_batches_tracked"].shape == ()
    state = strategy.strategy_state()
    assert "conv.weight" in state["m_t"] and "bn.running_var" not in state["m_t"]  # BN statistics: not optimized
    # The weights did move through the server optimizer (FedAdam active) while BN stats were plainly averaged.
    assert not np.allclose(final["conv.weight"], bn_arrays()["conv.weight"])


def test_bad_replies_are_filtered_and_the_round_completes():
    # The good site moves every toy weight by 1, about the toy model's own norm: above the default update bound.
    exp = experiment(rounds=1, influence={"max_update_ratio": 100.0})
    grid = FakeGrid(
        {
            1: responder(shift=1.0),
            2: responder(nan=True),
            3: responder(extra_key=True),
            4: responder(missing_key=True),
            5: responder(bad_shape=True),
            6: responder(error="refused: no labelled patients"),
            7: responder(truncated=True),
        }
    )
    census = {1: "good", 2: "nan", 3: "extra", 4: "missing", 5: "shape", 6: "refuses", 7: "truncated"}
    strategy = make_strategy(exp, NORM, census=census)
    init = bn_arrays()
    start(strategy, grid, init, rounds=1)
    rec = strategy.history[0]
    assert list(rec.accepted) == ["good"]
    assert set(rec.rejected) == {"nan", "extra", "missing", "shape", "truncated"}
    assert "NaN" in rec.rejected["nan"] and "extra ['my-extra']" in rec.rejected["extra"]
    assert "describes more bytes than were sent" in rec.rejected["truncated"]
    assert rec.failed == {"refuses": "refused: no labelled patients"}
    final = strategy.latest["fc.weight"].numpy()
    np.testing.assert_allclose(final, init["fc.weight"] + 1.0, rtol=1e-6)


def test_all_failed_round_keeps_weights_and_says_so():
    exp = experiment(rounds=1)
    grid = FakeGrid({1: responder(error="x"), 2: responder(nan=True)})
    strategy = make_strategy(exp, NORM)
    init = bn_arrays()
    start(strategy, grid, init, rounds=1)
    assert strategy.history[0].all_failed
    np.testing.assert_array_equal(strategy.latest["fc.weight"].numpy(), init["fc.weight"])


def test_dead_site_does_not_hang_the_next_round():
    exp = experiment(rounds=2)  # join deadline 1 s, round deadline 2 s
    grid = FakeGrid({1: responder(), 2: responder(), 3: responder(dead=True)}, connected=[1, 2, 3])
    strategy = make_strategy(exp, NORM, expected_sites=4)  # a fourth site never connects at all
    t0 = time.monotonic()
    start(strategy, grid, bn_arrays(), rounds=2)
    assert time.monotonic() - t0 < 12
    assert [len(r.accepted) for r in strategy.history] == [2, 2]
    assert strategy.history[0].missing == ["node-3"]


def test_quorum_not_reached_stops_instead_of_waiting_forever():
    exp = experiment(quorum={"min_sites": 3, "join_timeout_s": 0.5, "round_timeout_s": 1})
    strategy = make_strategy(exp, NORM)
    with pytest.raises(QuorumNotReached, match="only 2 site"):
        start(strategy, FakeGrid({1: responder(), 2: responder()}), bn_arrays())


def test_evaluation_sums_counts_and_histograms_and_keeps_sites():
    exp = experiment(rounds=1, evaluate="final")
    grid = FakeGrid({1: responder(n=10), 2: responder(n=20)})
    strategy = make_strategy(exp, NORM)
    start(strategy, grid, bn_arrays(), rounds=1)
    rec = strategy.history[0]
    assert set(rec.evaluation) == {"node-1", "node-2"}
    s = rec.evaluation_summary
    assert s["num-examples"] == 30 and s["n-pos"] == 6 and s["n-neg"] == 24
    assert s["hist-pos"][-1] == 6.0 and s["hist-neg"][0] == 24.0 and "auc" not in s


def test_resume_continues_at_the_right_round_with_checkpointed_tensors(tmp_path):
    data = {"rounds": 2, "model": TINY_MODEL, "evaluate": "none"}
    data["quorum"] = {"min_sites": 2, "join_timeout_s": 1, "round_timeout_s": 5}
    exp = ExperimentConfig.from_dict(data)
    grid = FakeGrid({1: responder(shift=0.1), 2: responder(shift=0.3)})
    run_training(grid, exp, tmp_path)
    ck = checkpoint.load(tmp_path / "checkpoint", exp.fingerprint())
    assert ck.round == 2
    with pytest.raises(checkpoint.CheckpointError):
        run_training(grid, exp, tmp_path)  # no silent restart over a checkpoint

    exp3 = exp.with_(rounds=3)
    seen = []
    base = responder(shift=0.1)

    def recording(msg):
        if msg.metadata.message_type == "train":
            seen.append((msg.content.config_records["config"]["server-round"], named(msg)))
        return base(msg)

    grid.responders[1] = recording
    summary = run_training(grid, exp3, tmp_path, resume=True)
    assert [r for r, _ in seen] == [3]
    for key, value in ck.global_arrays.items():
        np.testing.assert_array_equal(seen[0][1][key], value)
    assert summary["resumed_after"] == 2 and [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    rows = (tmp_path / "rounds.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[-1].startswith("3,")
    with pytest.raises(checkpoint.CheckpointError, match="another experiment"):
        run_training(grid, exp3.with_(lr=0.5), tmp_path, resume=True)
    assert json.loads((tmp_path / "federation.json").read_text())["all_failed_rounds"] == []


def test_initial_arrays_are_the_same_at_every_call():
    exp = ExperimentConfig.from_dict({"model": {**TINY_MODEL, "trainable": "head"}})
    a, b = initial_arrays(exp), initial_arrays(exp)
    assert list(a) == ["fc.weight", "fc.bias"] and all(np.array_equal(a[k], b[k]) for k in a)


def test_fedprox_sends_its_mu_and_fingerprint_ignores_rounds_and_quorum():
    exp = experiment(rounds=1, strategy={"name": "fedprox", "proximal_mu": 0.1})
    grid = FakeGrid({1: responder(), 2: responder()})
    start(make_strategy(exp, NORM), grid, bn_arrays(), rounds=1)
    sent = [cfg for _, kind, cfg in grid.log if kind == "train"]
    assert len(sent) == 2 and all(c["proximal-mu"] == pytest.approx(0.1) and c["server-round"] == 1 for c in sent)
    assert exp.fingerprint() == exp.with_(rounds=9, quorum=exp.quorum.__class__(min_sites=5)).fingerprint()
    assert exp.fingerprint() != exp.with_(lr=0.5).fingerprint()


def test_every_fold_of_an_experiment_shares_one_evaluation_tag():
    from server.federation import evaluation_tag, round_configs

    exp = ExperimentConfig.from_dict({"folds": {"k": 10, "held_out": 0}, "protocol": "tenfold"})
    other = exp.with_(folds=exp.folds.__class__(k=10, held_out=7))
    assert evaluation_tag(exp) == evaluation_tag(other) != evaluation_tag(exp.with_(seed=3))
    _, ev = round_configs(exp, report=False)
    assert ev["subset"] == "held-out" and ev["report"] == 0 and ev["tag"] == evaluation_tag(exp)


def float_bytes(record) -> int:
    return sum(a.numpy().nbytes for a in record.values() if np.dtype(a.dtype).kind == "f")


def test_fp16_transfer_aggregates_in_fp32_within_fp16_rounding():
    grid_kw = {1: (0.1, 5), 2: (-0.2, 15)}
    results, sent, replied = {}, {}, {}
    for dtype in ("float32", "float16"):
        sent[dtype], replied[dtype] = [], []

        def recording(shift, n, dtype=dtype):
            base = responder(shift=shift, n=n, packed=False)

            def answer(msg):
                if msg.metadata.message_type == "train":
                    sent[dtype].append(named(msg))
                out = base(msg)
                if msg.metadata.message_type == "train":  # before the server turns it into float32 in place
                    replied[dtype].append(float_bytes(out.content.array_records["arrays"]))
                return out

            return answer

        grid = FakeGrid({node: recording(*kw) for node, kw in grid_kw.items()})
        strategy = make_strategy(experiment(rounds=1, transfer_dtype=dtype), NORM)
        start(strategy, grid, bn_arrays(), rounds=1)
        assert list(strategy.history[0].accepted) == ["node-1", "node-2"]
        results[dtype] = {k: v.numpy() for k, v in strategy.latest.items()}
    # On the wire: float tensors in float16, the batch counter untouched; float payload exactly halved.
    wire = sent["float16"][0]
    assert all(v.dtype == np.float16 for k, v in wire.items() if k != "bn.num_batches_tracked")
    assert wire["bn.num_batches_tracked"].dtype == np.int64
    assert replied["float16"] and all(b16 * 2 == b32 for b16, b32 in zip(replied["float16"], replied["float32"]))
    # Aggregated and kept in float32, within float16 rounding (relative 2^-11 per value, twice: down and up).
    for key, ref in results["float32"].items():
        got = results["float16"][key]
        assert got.dtype == ref.dtype and got.shape == ref.shape
        if ref.dtype.kind == "f":
            np.testing.assert_allclose(got, ref, rtol=2e-3, atol=1e-3)
        else:
            np.testing.assert_array_equal(got, ref)


def test_fp16_transfer_rejects_other_wire_dtypes_and_refuses_overflow(tmp_path):
    exp = experiment(rounds=1, transfer_dtype="float16")
    base = responder(shift=0.1, packed=False)

    def fp32_site(msg):  # an out-of-date site replying float32 in a float16 experiment
        out = base(msg)
        if msg.metadata.message_type == "train":
            arrays = out.content.array_records["arrays"]
            for k, a in list(arrays.items()):
                if np.dtype(a.dtype).kind == "f":
                    arrays[k] = Array(a.numpy().astype(np.float32))
        return out

    strategy = make_strategy(exp, NORM, census={1: "fp16", 2: "fp32"})
    start(strategy, FakeGrid({1: base, 2: fp32_site}), bn_arrays(), rounds=1)
    rec = strategy.history[0]
    assert list(rec.accepted) == ["fp16"] and "sent as float32" in rec.rejected["fp32"]
    assert strategy.latest["fc.weight"].dtype == "float32"
    # A global tensor beyond the float16 range: refused before anything is sent, never sent as inf.
    from common.transfer import TransferOverflow

    big = bn_arrays() | {"fc.weight": np.full((1, 4), 1e6, np.float32)}
    grid = FakeGrid({1: base, 2: base})
    with pytest.raises(TransferOverflow, match="fc.weight"):
        start(make_strategy(exp, NORM), grid, big, rounds=1)
    assert not [m for m in grid.log if m[1] == "train"]


def test_fp16_experiment_key_is_validated_fingerprinted_and_sent(tmp_path):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="transfer_dtype"):
        ExperimentConfig.from_dict({"transfer_dtype": "bfloat16"}, tmp_path / "experiment.yaml")
    default, fp32 = ExperimentConfig.from_dict({}), ExperimentConfig.from_dict({"transfer_dtype": "float32"})
    fp16 = ExperimentConfig.from_dict({"transfer_dtype": "float16"})
    assert default.fingerprint() == fp32.fingerprint() != fp16.fingerprint()
    # Through run_training (tiny model): the instruction names the wire dtype, the checkpoint stays float32.
    data = {"rounds": 1, "model": TINY_MODEL, "evaluate": "none", "transfer_dtype": "float16"}
    data["quorum"] = {"min_sites": 2, "join_timeout_s": 1, "round_timeout_s": 5}
    exp = ExperimentConfig.from_dict(data)
    grid = FakeGrid({1: responder(shift=0.1), 2: responder(shift=0.3)})
    run_training(grid, exp, tmp_path)
    assert {cfg["transfer-dtype"] for _, kind, cfg in grid.log if kind == "train"} == {"float16"}
    ck = checkpoint.load(tmp_path / "checkpoint", exp.fingerprint())
    assert {v.dtype for v in ck.global_arrays.values()} <= {np.dtype(np.float32), np.dtype(np.int64)}


def test_train_loss_mean_leaves_out_sites_that_withhold_it():
    from server.strategy import sum_metrics

    def rec(loss, n, dp):
        return RecordDict({"metrics": MetricRecord(train_metrics(n, **{"train-loss": loss, "dp": dp}))})

    mixed = sum_metrics([rec(0.4, 10, 0), rec(-1.0, 30, 1), rec(0.8, 30, 0)], "num-examples")
    assert mixed["train-loss"] == pytest.approx((0.4 * 10 + 0.8 * 30) / 40)  # the DP site's −1 is not a loss
    assert mixed["num-examples"] == 70 and mixed["dp"] == 1
    assert sum_metrics([rec(-1.0, 30, 1)], "num-examples")["train-loss"] == -1.0  # none reported: still "withheld"
