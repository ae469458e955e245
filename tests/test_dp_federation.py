"""Differential privacy in the federation: DP sites in rounds, ε through the reply schema, the ledger across rounds and
processes, refusals as privacy-safe Error replies, and a coordinator that cannot loosen a site's privacy.

Tiny sites (resnet18 at 32 px, trainable head over frozen BatchNorm), the real ClientApp called in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from client import tasks
from client.app import app as client_app
from common.model import ModelConfig, build_model, get_exchange_arrays
from common.privacy import PrivacyLedger, epsilon_of
from common.replies import TRAIN_KEYS
from server.experiment import ExperimentConfig
from server.federation import run_training
from server.protocols import plan_units, planned_rounds, run_protocol
from tests.fakes import ClientGrid, context, message
from tests.tinysites import TINY_MODEL, TINY_TRAIN, make_site

DP_MODEL = {**TINY_MODEL, "trainable": "head"}  # BatchNorm frozen under DP: a partial subset is required


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        yield


def dp_site(root, name="hospDP", budget=8.0, seed=1, n=12, **kw):
    ledger = root / f"{name}-ledger.json"
    return make_site(root, name, n=n, seed=seed, privacy={"dp": True, "epsilon_budget": budget, "ledger": ledger}, **kw)


def ledger_of(site_yaml) -> PrivacyLedger:
    from common.config import load_site_config

    return PrivacyLedger(load_site_config(site_yaml).privacy.ledger)


@pytest.fixture(scope="module")
def head_arrays():
    torch.manual_seed(0)
    return dict(get_exchange_arrays(build_model(ModelConfig.from_dict(DP_MODEL)), "head"))


def train_msg(arrays, rnd=1, **cfg):
    base = {"model": json.dumps(DP_MODEL), "k": 3, "fold-seed": 0, "held-out": 0, "unit": "tenfold/fold-00"}
    base.update({"experiment-id": "exp-test", "planned-rounds": 2, "server-round": rnd})
    return message("train", {**base, **cfg}, arrays)


def metrics(reply):
    return dict(reply.content.metric_records["metrics"])


def test_dp_site_replies_the_same_schema_with_epsilon(tmp_path, head_arrays):
    dp, plain = dp_site(tmp_path), make_site(tmp_path, "hospB", n=10, seed=2)
    m_dp = metrics(client_app(train_msg(head_arrays), context(dp)))
    m_plain = metrics(client_app(train_msg(head_arrays), context(plain)))
    assert set(m_dp) == set(m_plain) == TRAIN_KEYS  # the schema never varies
    assert m_dp["dp"] == 1 and 0 < m_dp["epsilon"] <= 8.0
    assert m_plain["dp"] == 0 and m_plain["epsilon"] == -1.0
    assert m_dp["train-loss"] == -1.0 and m_plain["train-loss"] >= 0  # a DP site withholds its training loss
    # The ε reported is the ledger's, and the ledger holds one merged entry for the experiment.
    (entry,) = ledger_of(dp).history()
    assert m_dp["epsilon"] == pytest.approx(epsilon_of([entry], 1e-5))


def test_epsilon_accumulates_across_rounds_and_processes(tmp_path, head_arrays):
    """Round 1 in another process, round 2 here: ε after both equals ε of both rounds in one accountant."""
    site = dp_site(tmp_path)
    script = f"""
import json, torch, numpy as np
from client import tasks
from common.model import ModelConfig, build_model, get_exchange_arrays
torch.manual_seed(0)
model = {DP_MODEL!r}
arrays = dict(get_exchange_arrays(build_model(ModelConfig.from_dict(model)), "head"))
cfg = dict(model=model, train={TINY_TRAIN!r}, seed=0, k=3, **{{"fold-seed": 0, "held-out": 0}}, epochs=1, lr=1e-3)
cfg.update({{"proximal-mu": 0.0, "server-round": 1, "experiment-id": "exp-test", "planned-rounds": 2, "unit": "u"}})
site = tasks.open_site({{"site-config": {str(site)!r}}}, {{}})
print(json.dumps(tasks.train(site, arrays, cfg)[1]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    eps1 = json.loads(proc.stdout.strip().splitlines()[-1])["epsilon"]
    m2 = metrics(client_app(train_msg(head_arrays, rnd=2), context(site)))
    (entry,) = ledger_of(site).history()  # one (σ, q): the plan made in the first process was reused
    assert entry.steps == 2 * m2["steps"]
    assert m2["epsilon"] > eps1 > 0
    assert m2["epsilon"] == pytest.approx(epsilon_of([(entry.sigma, entry.q, entry.steps)], 1e-5))
    assert m2["epsilon"] <= 8.0  # the declared two rounds fit the site's budget


def test_coordinator_cannot_raise_the_budget_or_switch_dp_off(tmp_path, head_arrays):
    site = dp_site(tmp_path, budget=8.0)
    loosen = {"dp": 0, "epsilon_budget": 1000.0, "epsilon-budget": 1000.0, "delta": 0.5, "max-grad-norm": 1e6}
    loosen["privacy"] = json.dumps({"dp": False, "epsilon_budget": 1000.0})
    for rnd in (1, 2):  # the two declared rounds: still DP, still the site's budget
        m = metrics(client_app(train_msg(head_arrays, rnd=rnd, **loosen), context(site)))
        assert m["dp"] == 1 and 0 < m["epsilon"] <= 8.0
    before = ledger_of(site).path.read_bytes()
    # Budget spent: a third round is refused however the instruction asks, and the ledger is untouched.
    with pytest.raises(tasks.SiteRefusal, match="privacy budget") as err:
        client_app(train_msg(head_arrays, rnd=3, **loosen), context(site))
    assert ledger_of(site).path.read_bytes() == before
    assert str(tmp_path) not in str(err.value) and "PATIENT" not in str(err.value)
    # A new experiment id cannot reopen the budget either: its plan is over what the ledger already holds, so it
    # is refused or (with a sliver of budget left) trains under so much noise that the total stays within it.
    try:
        m = metrics(client_app(train_msg(head_arrays, rnd=1, **{**loosen, "experiment-id": "other"}), context(site)))
        assert m["dp"] == 1 and m["epsilon"] <= 8.0
    except tasks.SiteRefusal as exc:
        assert "privacy budget" in str(exc)
    assert ledger_of(site).epsilon(1e-5) <= 8.0


def test_dp_site_refuses_a_model_it_cannot_train_privately(tmp_path, head_arrays):
    site = dp_site(tmp_path)
    with pytest.raises(tasks.SiteRefusal, match="BatchNorm frozen") as err:
        client_app(train_msg(head_arrays, model=json.dumps(TINY_MODEL)), context(site))  # trainable all + BN
    assert str(tmp_path) not in str(err.value)
    assert not ledger_of(site).path.exists()  # refused before anything was planned or charged
    with pytest.raises(tasks.SiteRefusal, match="planned-rounds"):
        client_app(train_msg(head_arrays, **{"planned-rounds": 0}), context(site))


class FlowerGrid(ClientGrid):
    """ClientGrid whose ClientApp exceptions become Error replies, formatted as Flower's ClientApp runner does
    (flwr/supernode/runtime/run_clientapp.py): what a coordinator really receives from a refusing site."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            try:
                replies += super().send_and_receive([msg], timeout=timeout)
            except Exception as exc:  # Flower's ClientApp runner: every exception becomes an Error reply
                reason = str(type(exc)) + ":<'" + str(exc) + "'>"
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg))
        return replies


def dp_experiment(**kw) -> ExperimentConfig:
    data = {"protocol": "train", "rounds": 2, "model": DP_MODEL, "train": TINY_TRAIN, "evaluate": "none"}
    data["quorum"] = {"min_sites": 1, "join_timeout_s": 1, "round_timeout_s": 60}
    data.update(kw)
    return ExperimentConfig.from_dict(data)


def test_round_over_budget_is_refused_and_the_round_goes_on(tmp_path):
    """An under-declaring coordinator (1 planned round, 2 run): the DP site's σ fits one round only; round 2 is
    refused with an Error reply that names no path or patient, and aggregates the other site alone."""
    dp, plain = dp_site(tmp_path, budget=3.0), make_site(tmp_path, "hospB", n=10, seed=2)
    grid = FlowerGrid([dp, plain])
    summary = run_training(grid, dp_experiment(), tmp_path / "out", planned_rounds={"hospDP": 1, "hospB": 1})
    r1, r2 = summary["rounds"]
    assert set(r1["accepted"]) == {"hospDP", "hospB"} and r1["accepted"]["hospDP"]["dp"] == 1
    assert set(r2["accepted"]) == {"hospB"} and not r2["all_failed"]
    reason = r2["failed"]["hospDP"]
    assert "privacy budget" in reason and str(tmp_path) not in reason and "PATIENT" not in reason
    assert all(c["planned-rounds"] == 1 for n, kind, c in grid.log if kind == "train")
    assert {c["experiment-id"] for n, kind, c in grid.log if kind == "train"} == {summary["fingerprint"]}
    priv = summary["privacy"]
    assert priv["hospDP"]["dp"] and priv["hospDP"]["dp_rounds"] == 1 and priv["hospDP"]["refused_rounds"] == 1
    assert 0 < priv["hospDP"]["epsilon"] <= 3.0 and priv["hospB"]["epsilon"] == -1.0
    rows = (tmp_path / "out" / "rounds.csv").read_text().splitlines()
    assert len(rows) == 3 and all(float(r.split(",")[9]) >= 0 for r in rows[1:])  # train_loss: sites that sent one


def test_planned_rounds_count_every_model_on_a_site():
    exp = ExperimentConfig.from_dict({"protocol": "all", "rounds": 2, "folds": {"k": 3}})
    units = plan_units(exp.with_(plan=exp.plan.__class__(max_held_out=2)), ["a", "b", "c"], "t")
    # 3 folds + site-held-out units a, b (c trains in both, a and b in one) + local + final, 2 rounds each.
    assert planned_rounds(units, ["a", "b", "c"]) == {"a": 2 * 6, "b": 2 * 6, "c": 2 * 7}


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_protocol_with_a_dp_site_reports_epsilon_per_site(tmp_path):
    dp, plain = dp_site(tmp_path, budget=8.0), make_site(tmp_path, "hospB", n=10, seed=2)
    exp = dp_experiment(protocol="tenfold", rounds=1, folds={"k": 3, "seed": 0}, min_cell=2)
    exp = exp.with_(plan=exp.plan.__class__(max_folds=2, local_only=True, final_model=False))
    grid = FlowerGrid([dp, plain])
    results = run_protocol(grid, exp, tmp_path / "out", synthetic=True, quick=True)
    trains = [c for n, kind, c in grid.log if kind == "train" and n == 1]
    assert len(trains) == 3 and {c["planned-rounds"] for c in trains} == {3}  # 2 folds + local-only, 1 round each
    assert len({c["experiment-id"] for c in trains}) == 1
    priv = results["privacy"]["per_site"]
    assert priv["hospDP"]["dp"] and priv["hospDP"]["dp_rounds"] == 3 and priv["hospDP"]["refused_rounds"] == 0
    assert 0 < priv["hospDP"]["epsilon"] <= 8.0 and not priv["hospB"]["dp"]
    eps_by_unit = [results["privacy"]["per_unit"][u]["hospDP"] for u in ("tenfold/fold-00", "tenfold/fold-01")]
    assert eps_by_unit[0] < eps_by_unit[1] <= priv["hospDP"]["epsilon"]  # one ledger across the units
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Differential privacy at the sites" in report and "Outside DP (exact, from the data)" in report
    assert "not cover the coordinator's evaluation queries" in report  # the threat model, stated
    assert f"{priv['hospDP']['epsilon']:.3g}" in report
    assert priv["hospDP"]["delta"] == 1e-5 and "δ = 1e-05" in report and priv["hospB"]["delta"] == -1.0


def test_sweep_reports_each_sites_noise_and_whether_the_default_policy_would_train(tmp_path):
    from common.privacy import PrivacyLedger
    from simulations.run import sweep_noise

    ledgers = tmp_path / "ledgers"
    for site, steps in (("few", 5), ("many", 400)):
        ledger = PrivacyLedger(ledgers / f"{site}.json", ledgers / f"{site}-record.json")
        ledger.plan("exp", 0.5, steps, 3.0, 1e-5, experiment_epsilon=3.0, max_noise_multiplier=100.0)
    out = sweep_noise(ledgers, 3.0)
    assert set(out["sigma"]) == {"few", "many"} and out["sigma"]["few"] < out["sigma"]["many"]
    assert out["default_policy"]["few"].startswith("trains at σ")
    assert out["default_policy"]["many"].startswith("refuses: needs σ")  # 400 steps at ε 1.5 need σ > 10
