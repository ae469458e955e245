"""The starting model's evaluation (round 0) and the per-round TensorBoard scalars of run_training, on a fake Grid."""

from __future__ import annotations

import builtins
import json
import logging

import numpy as np
import pytest

from common.replies import EVALUATE_FIRST, EVALUATION
from server import checkpoint
from server.aggregates import histogram_brier, improvement
from server.experiment import ExperimentConfig
from server.federation import run_training
from tests.fakes import FakeGrid, eval_metrics, responder
from tests.tinysites import TINY_MODEL

pytest.importorskip("tensorboard", reason="the tensorboard extra is part of the test extra")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


def experiment(**kw) -> ExperimentConfig:
    data = {
        "rounds": 2,
        "model": {**TINY_MODEL, "trainable": "head"},
        "evaluate": "final",
        "folds": {"k": 3, "held_out": 0},
    }
    data["quorum"] = {"min_sites": 2, "join_timeout_s": 1, "round_timeout_s": 5}
    return ExperimentConfig.from_dict({**data, **kw})


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _evaluate_first(cfg: dict) -> dict | None:
    return json.loads(cfg[EVALUATE_FIRST]) if EVALUATE_FIRST in cfg else None


def test_initial_model_is_scored_on_the_final_subset_on_receipt_by_round_ones_training(tmp_path):
    grid = FakeGrid({1: responder(shift=0.1), 2: responder(shift=0.2)})
    summary = run_training(grid, experiment(), tmp_path)

    kinds = [(kind, cfg.get("server-round")) for _, kind, cfg in grid.log if kind != "query"]
    assert kinds == [("train", 1)] * 2 + [("train", 2)] * 2 + [("evaluate", 2)] * 2  # no message of its own
    firsts = [_evaluate_first(cfg) for _, kind, cfg in grid.log if kind == "train"]
    first, last = firsts[0], grid.log[-1][2]
    assert firsts[1] == first and firsts[2:] == [None, None]
    assert first["server-round"] == 0 and first["subset"] == last["subset"] == "held-out"
    assert first["tag"] == last["tag"] + "-initial"
    saved = json.loads((tmp_path / "federation.json").read_text())
    assert set(saved["initial_evaluation"]["evaluation"]) == {"node-1", "node-2"} == set(summary["final_evaluation"])
    gain = saved["improvement"]
    assert gain["subset"] == "held-out" and gain["round"] == 2 and gain["n"] == {"initial": 20, "final": 20}
    assert gain["pooled_auc"]["change"] == 0.0 and set(gain["site_auc"]) == {"node-1", "node-2"}


def test_a_site_that_evaluates_without_training_gets_the_initial_model_in_an_evaluate_message(tmp_path):
    grid = FakeGrid({1: responder(), 2: responder()})
    exp = experiment(quorum={"min_sites": 1, "join_timeout_s": 1, "round_timeout_s": 5})
    summary = run_training(grid, exp, tmp_path, train_nodes={1})
    kinds = [(node, kind, cfg.get("server-round")) for node, kind, cfg in grid.log if kind != "query"]
    assert kinds[:2] == [(1, "evaluate", 0), (2, "evaluate", 0)] and (2, "train", 1) not in kinds
    assert all(_evaluate_first(cfg) is None for _, kind, cfg in grid.log if kind == "train")
    assert set(summary["initial_evaluation"]["evaluation"]) == {"node-1", "node-2"}


def test_every_round_evaluation_rides_on_the_next_rounds_training_and_completes_each_round_in_order(tmp_path):
    def scored_by_round(base):  # each evaluation says which round's model it scored (in its `seconds`)
        def answer(msg):
            out, cfg = base(msg), msg.content.config_records.get("config", {})
            if msg.metadata.message_type == "evaluate":
                out.content["metrics"]["seconds"] = float(cfg["server-round"])
            elif EVALUATION in out.content:
                out.content[EVALUATION]["seconds"] = float(_evaluate_first(dict(cfg))["server-round"])
            return out

        return answer

    def without_evaluation(msg):  # a site on an older release: trains, ignores evaluate-first
        out = responder()(msg)
        if EVALUATION in out.content:
            del out.content[EVALUATION]
        return out

    grid = FakeGrid({1: scored_by_round(responder()), 2: without_evaluation})
    summary = run_training(grid, experiment(rounds=3, evaluate="every-round"), tmp_path)

    sent = [(kind, cfg.get("server-round"), (_evaluate_first(cfg) or {}).get("server-round")) for _, kind, cfg in grid.log]
    assert [m for m in sent if m[0] != "query"] == [
        *[("train", 1, 0)] * 2,
        *[("train", 2, 1)] * 2,
        *[("train", 3, 2)] * 2,
        *[("evaluate", 3, None)] * 2,
    ]
    assert summary["initial_evaluation"]["evaluation"]["node-1"]["seconds"] == 0.0
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert r["evaluation"]["node-1"]["seconds"] == r["round"]  # round r's model, not the one it started from
        assert len(r["accepted"]) == 2  # node-2's training still counts
    assert all("no evaluation" in r["rejected"]["node-2 (evaluate)"] for r in rounds[:2])
    assert "node-2" in rounds[2]["evaluation"]  # the last round is evaluated by evaluate messages
    assert "no evaluation" in summary["initial_evaluation"]["failed"]["node-2"]
    assert [int(row.split(",")[0]) for row in (tmp_path / "rounds.csv").read_text().splitlines()[1:]] == [1, 2, 3]
    assert checkpoint.load(tmp_path / "checkpoint").round == 3


def test_resume_keeps_the_first_runs_initial_evaluation_and_does_not_score_again(tmp_path):
    grid = FakeGrid({1: responder(), 2: responder()})
    exp = experiment()
    first = run_training(grid, exp, tmp_path)["initial_evaluation"]
    assert checkpoint.load(tmp_path / "checkpoint").meta["initial_evaluation"]["subset"] == "held-out"
    grid.log.clear()
    summary = run_training(grid, exp.with_(rounds=3), tmp_path, resume=True)
    assert [cfg["server-round"] for _, kind, cfg in grid.log if kind == "evaluate"] == [3, 3]
    assert summary["initial_evaluation"] == first and summary["improvement"]["round"] == 3


def test_no_initial_evaluation_when_the_experiment_evaluates_nothing(tmp_path):
    grid = FakeGrid({1: responder(), 2: responder()})
    summary = run_training(grid, experiment(evaluate="none"), tmp_path)
    assert all(kind != "evaluate" for _, kind, _ in grid.log)
    assert summary["initial_evaluation"] == {} and summary["improvement"] == {}


def test_improvement_compares_the_same_patients_before_and_after():
    bins = 100
    before = eval_metrics(10) | {"auc": 0.5, "hist-pos": [0.0] * 50 + [3.0] + [0.0] * 49}
    before["hist-neg"] = [0.0] * 50 + [7.0] + [0.0] * 49
    after = eval_metrics(10) | {"auc": 1.0}
    assert len(before["hist-pos"]) == bins
    out = improvement({"evaluation": {"a": before}, "summary": before}, {"evaluation": {"a": after}, "summary": after})
    assert out["pooled_auc"]["initial"] == pytest.approx(0.5) and out["pooled_auc"]["final"] == pytest.approx(1.0)
    assert out["brier"]["initial"] == pytest.approx(0.495**2 * 3 / 10 + 0.505**2 * 7 / 10)
    assert out["brier"]["change"] < 0 and out["site_auc"]["a"]["change"] == pytest.approx(0.5)
    assert np.isnan(histogram_brier([0.0] * bins, [0.0] * bins))


def test_tensorboard_scalars_per_round_with_the_initial_model_at_step_zero(tmp_path):
    grid = FakeGrid({1: responder(n=10), 2: responder(n=20)})
    run_training(grid, experiment(), tmp_path)

    found = scalars(tmp_path / "tensorboard")
    for tag in ("sites/ok", "sites/sent", "sites/failed", "round/seconds", "train/loss", "train/examples"):
        assert [step for step, _ in found[tag]] == [1, 2], tag
    assert found["sites/ok"][-1][1] == 2 and found["train/examples"][0][1] == 30
    assert [s for s, _ in found["train/loss/node-1"]] == [1, 2]
    assert found["transfer/mb_per_site_each_way"][0][1] == pytest.approx(513 * 4 / 1e6)  # resnet18 head, float32
    # Evaluation: the starting model at step 0, the final one at the last round (evaluate: final).
    assert [s for s, _ in found["eval/pooled_auc"]] == [0, 2] and [s for s, _ in found["eval/auc/node-2"]] == [0, 2]
    assert found["eval/examples"][0][1] == 30


def test_without_tensorboard_one_info_line_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with caplog.at_level(logging.INFO, logger="flwr.spinefed.tensorboard"):
        summary = run_training(FakeGrid({1: responder(), 2: responder()}), experiment(rounds=1), tmp_path)
    assert [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()] == [
        "TensorBoard not installed (pip install 'spinefed[tensorboard]'): per-round scalars in rounds.csv only"
    ]
    assert not (tmp_path / "tensorboard").exists() and len(summary["rounds"]) == 1
