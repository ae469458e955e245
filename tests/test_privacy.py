"""common/privacy.py: the site's privacy ledger (persistence across processes, merging, refusals, crash safety) and
the site's spend-rate policy (noise limit, per-experiment cap). Tamper detection: tests/test_ledger_tamper.py."""

from __future__ import annotations

import inspect
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from common import privacy as P
from common.privacy import (
    ALPHAS,
    ExperimentBudgetExceeded,
    LedgerError,
    NoiseLimitExceeded,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    epsilon_of,
    plan_noise,
)

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
SIGMA, Q, STEPS = 1.1, 0.125, 40


def new_ledger(tmp_path, name="ledger.json") -> PrivacyLedger:
    """A ledger in its own folder, its record in another (as beside the site's pseudonym secret)."""
    return PrivacyLedger(tmp_path / "privacy" / name, record=tmp_path / "keys" / f"{name}.record")


def _run(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, **kw)


def test_two_rounds_in_two_processes_equal_one_accountant(tmp_path):
    ledger = new_ledger(tmp_path)
    for r in (1, 2):
        proc = _run(
            f"""
            from common.privacy import PrivacyLedger
            ledger = PrivacyLedger({str(ledger.path)!r}, record={str(ledger.record)!r})
            ledger.charge({SIGMA!r}, {Q!r}, {STEPS}, "tenfold fold 0 round {r}")
            """
        )
        assert proc.wait(timeout=120) == 0
    one = RDPAccountant()
    for _ in range(2 * STEPS):
        one.step(noise_multiplier=SIGMA, sample_rate=Q)
    assert ledger.epsilon(DELTA) == pytest.approx(one.get_epsilon(DELTA, alphas=ALPHAS), rel=1e-12)
    # With Opacus' own orders too (the ledger's extra orders can only tighten the bound).
    assert ledger.epsilon(DELTA) <= one.get_epsilon(DELTA) + 1e-12
    assert [(e.sigma, e.q, e.steps) for e in ledger.history()] == [(SIGMA, Q, 2 * STEPS)]
    assert ledger.purposes() == {f"tenfold fold 0 round {r}": {"charges": 1, "steps": STEPS} for r in (1, 2)}


def test_over_budget_is_refused_and_leaves_the_ledger_byte_identical(tmp_path):
    ledger = new_ledger(tmp_path)
    ledger.charge(SIGMA, Q, STEPS, "local-only")
    before = ledger.path.read_bytes(), ledger.record.read_bytes()
    fits, eps_after = ledger.check(SIGMA, Q, 10 * STEPS, budget=2.0, delta=DELTA)
    assert not fits and eps_after > 2.0
    with pytest.raises(PrivacyBudgetExceeded, match="over the site's budget"):
        ledger.reserve(SIGMA, Q, 10 * STEPS, "final", budget=2.0, delta=DELTA, experiment=None)
    with pytest.raises(PrivacyBudgetExceeded):
        half = ledger.epsilon(DELTA) * 0.5
        ledger.plan("exp", Q, 100, budget=half, delta=DELTA, experiment_epsilon=half, max_noise_multiplier=100.0)
    assert (ledger.path.read_bytes(), ledger.record.read_bytes()) == before
    # A round that fits is recorded, and reported as the ε the check predicted.
    fits, predicted = ledger.check(SIGMA, Q, 1, budget=100.0, delta=DELTA)
    assert fits
    assert ledger.reserve(SIGMA, Q, 1, "final", budget=100.0, delta=DELTA, experiment=None) == pytest.approx(predicted)


def test_killed_writer_leaves_a_readable_ledger(tmp_path):
    ledger = new_ledger(tmp_path)
    proc = _run(
        f"""
        import sys
        from common.privacy import PrivacyLedger
        ledger = PrivacyLedger({str(ledger.path)!r}, record={str(ledger.record)!r})
        ledger.charge(1.0, 0.5, 3, "warm-up")
        print("ready", flush=True)
        while True:
            ledger.charge(1.0, 0.5, 3, "site-held-out X round 1")
        """,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.4)  # many rewrites in flight
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # Killed between any two writes (ledger, record) or in the middle of one: readable, record at most one behind.
    (entry,) = ledger.history()
    assert entry.steps % 3 == 0 and entry.steps >= 3
    assert sum(p["steps"] for p in ledger.purposes().values()) == entry.steps
    # The next process carries on (a temporary file left by the kill is cleaned under the lock).
    ledger.charge(1.0, 0.5, 3, "final")
    assert ledger.history()[0].steps == entry.steps + 3
    assert not list(tmp_path.rglob(".ledger.json*.tmp"))
    assert json.loads(ledger.record.read_text())["chain"] == json.loads(ledger.path.read_text())["chain"]


def test_interrupted_atomic_write_keeps_the_old_ledger(tmp_path, monkeypatch):
    ledger = new_ledger(tmp_path)
    ledger.charge(SIGMA, Q, STEPS, "local-only")
    before = ledger.path.read_bytes()

    def crash(*_a, **_k):
        raise KeyboardInterrupt  # e.g. the process is stopped between writing and renaming

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ledger.charge(SIGMA, Q, STEPS, "final")
    monkeypatch.undo()
    assert ledger.path.read_bytes() == before
    assert ledger.history()[0].steps == STEPS


def test_hundreds_of_charges_merge_into_one_entry(tmp_path):
    ledger = new_ledger(tmp_path)
    for r in range(300):
        ledger.charge(SIGMA, Q, 2, f"tenfold fold {r % 10} round {r // 10}")
    hist = ledger.history()
    assert [(e.sigma, e.q, e.steps) for e in hist] == [(SIGMA, Q, 600)]
    assert len(json.loads(ledger.path.read_text())["entries"]) == 1
    assert sum(p["charges"] for p in ledger.purposes().values()) == 300
    assert ledger.epsilon(DELTA) == pytest.approx(epsilon_of([(SIGMA, Q, 600)], DELTA))


def test_ledger_is_owner_only_and_names_no_path_when_corrupt(tmp_path):
    ledger = new_ledger(tmp_path / "site")
    ledger.charge(SIGMA, Q, 1, "final")
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.record.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.lock_path.stat().st_mode) == 0o600
    ledger.path.write_text('{"format": "spinefed-privacy-ledger/2", "entries": [{"sigma": 1.0')
    with pytest.raises(LedgerError) as err:
        ledger.epsilon(DELTA)
    assert str(tmp_path) not in str(err.value) and "ledger.json" not in str(err.value)
    with pytest.raises(LedgerError):  # fails closed: no charge on top of an unreadable history
        ledger.reserve(SIGMA, Q, 1, "final", budget=100.0, delta=DELTA, experiment=None)


def test_plan_noise_meets_the_target_and_is_deterministic():
    sigma = plan_noise(3.0, DELTA, q=8 / 17, steps=60)
    assert epsilon_of([(sigma, 8 / 17, 60)], DELTA) <= 3.0
    assert epsilon_of([(sigma * 0.99, 8 / 17, 60)], DELTA) > 3.0  # close to the smallest σ
    assert 3 < sigma < 8  # DESIGN.md: 17 patients, ε = 3 over 60 steps needs σ ≈ 5
    assert plan_noise(3.0, DELTA, q=8 / 17, steps=60) == sigma
    prior = [(sigma, 8 / 17, 60)]
    with pytest.raises(PrivacyBudgetExceeded):  # nothing left at the target, even at σ = 100
        plan_noise(3.0, DELTA, q=8 / 17, steps=60, prior=prior, max_sigma=100.0)


def test_interrupted_record_write_leaves_the_ledger_one_change_ahead_and_is_repaired(tmp_path, monkeypatch):
    ledger = new_ledger(tmp_path)
    ledger.charge(SIGMA, Q, STEPS, "local-only")
    real = os.replace

    def crash_on_record(src, dst):
        if Path(dst) == ledger.record:
            raise KeyboardInterrupt  # stopped after the ledger's write, before the record's
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_record)
    with pytest.raises(KeyboardInterrupt):
        ledger.charge(SIGMA, Q, STEPS, "final")
    monkeypatch.undo()
    led, rec = json.loads(ledger.path.read_text()), json.loads(ledger.record.read_text())
    assert led["prev_chain"] == rec["chain"] and led["charges"] == rec["charges"] + 1
    # Accepted (the ledger only over-counts) and the record repaired from it.
    assert ledger.history()[0].steps == 2 * STEPS
    assert json.loads(ledger.record.read_text())["chain"] == led["chain"]
    assert ledger.status().state == "ok"


def test_plan_is_fixed_on_first_use_and_fits_the_declared_steps(tmp_path):
    ledger = new_ledger(tmp_path)
    ledger.charge(2.0, 0.1, 50, "earlier experiment")
    policy = dict(experiment_epsilon=4.0, max_noise_multiplier=100.0)
    sigma = ledger.plan("exp-A", 0.25, planned_steps=40, budget=4.0, delta=DELTA, **policy)
    # A later round that declares fewer steps (or another budget) still gets the same σ.
    assert ledger.plan("exp-A", 0.25, planned_steps=4, budget=100.0, delta=DELTA, **policy) == sigma
    for r in range(10):  # the declared 40 steps, as 10 rounds of 4: all fit; the 11th does not
        ledger.reserve(sigma, 0.25, 4, f"tenfold round {r}", budget=4.0, delta=DELTA, experiment="exp-A")
    assert ledger.epsilon(DELTA) <= 4.0
    assert ledger.plans()["exp-A q=0.25"]["charged_steps"] == 40
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.reserve(sigma, 0.25, 4, "tenfold round 10", budget=4.0, delta=DELTA, experiment="exp-A")
    # A lower per-experiment cap means more noise for the same steps.
    other = new_ledger(tmp_path, "other.json")
    low = other.plan("exp", 0.25, 40, budget=4.0, delta=DELTA, experiment_epsilon=2.0, max_noise_multiplier=100.0)
    assert low > other.plan("exp2", 0.25, 40, budget=4.0, delta=DELTA, experiment_epsilon=4.0, max_noise_multiplier=100)


def test_sigma_is_the_smallest_meeting_the_budget_and_the_experiment_cap(tmp_path):
    ledger = new_ledger(tmp_path)
    ledger.charge(3.0, 0.2, 100, "earlier experiment")
    history = ledger.history()
    sigma = ledger.plan("exp", 0.25, 30, budget=8.0, delta=DELTA, experiment_epsilon=2.0, max_noise_multiplier=50.0)
    # (ii) binds here: the experiment's own 30 steps alone reach its cap of 2 (the ledger has room left under 8).
    assert epsilon_of([(sigma, 0.25, 30)], DELTA) <= 2.0 < epsilon_of([(sigma * 0.999, 0.25, 30)], DELTA)
    assert epsilon_of([*history, (sigma, 0.25, 30)], DELTA) <= 8.0
    # (i) binds when the ledger is nearly spent: whole ledger + planned steps within the budget.
    tight = epsilon_of(history, DELTA) + 0.5
    s2 = ledger.plan("exp2", 0.25, 30, budget=tight, delta=DELTA, experiment_epsilon=tight, max_noise_multiplier=50.0)
    assert epsilon_of([*history, (s2, 0.25, 30)], DELTA) <= tight
    assert epsilon_of([*history, (s2 * 0.999, 0.25, 30)], DELTA) > tight


def test_noise_above_the_site_maximum_is_refused_and_the_ledger_untouched(tmp_path):
    ledger = new_ledger(tmp_path)
    ledger.charge(SIGMA, Q, STEPS, "local-only")
    before = ledger.path.read_bytes(), ledger.record.read_bytes()
    with pytest.raises(NoiseLimitExceeded) as err:  # 5000 steps within ε 1: far more noise than σ 10
        ledger.plan("exp", Q, 5000, budget=8.0, delta=DELTA, experiment_epsilon=1.0, max_noise_multiplier=10.0)
    assert isinstance(err.value, PrivacyBudgetExceeded)  # callers that refuse on the parent class refuse this too
    msg = str(err.value)
    assert err.value.sigma_needed > 10.0 and f"σ = {err.value.sigma_needed:.4g}" in msg
    assert "at most 10" in msg and "planned rounds" in msg and str(tmp_path) not in msg
    assert (ledger.path.read_bytes(), ledger.record.read_bytes()) == before
    # The same steps within the site's maximum: trained (the plan is stored).
    assert ledger.plan("exp", Q, 50, budget=8.0, delta=DELTA, experiment_epsilon=1.0, max_noise_multiplier=10.0) <= 10
    # A fresh site refused at its first plan keeps no ledger and no record at all.
    fresh = new_ledger(tmp_path / "fresh")
    with pytest.raises(NoiseLimitExceeded):
        fresh.plan("exp", Q, 5000, budget=8.0, delta=DELTA, experiment_epsilon=1.0, max_noise_multiplier=10.0)
    assert not fresh.path.exists() and not fresh.record.exists()


def test_budget_spent_is_refused_instead_of_training_on_noise(tmp_path):
    ledger = new_ledger(tmp_path)
    sigma = ledger.plan("exp", 0.25, 20, budget=2.0, delta=DELTA, experiment_epsilon=2.0, max_noise_multiplier=100.0)
    for r in range(5):
        ledger.reserve(sigma, 0.25, 4, f"round {r}", budget=2.0, delta=DELTA, experiment="exp")
    spent = ledger.epsilon(DELTA)
    assert 1.9 < spent <= 2.0
    before = ledger.path.read_bytes()
    # Exactly spent, or a sliver left that only σ ≈ 100 would fit: both refused, whatever the new experiment asks.
    with pytest.raises(PrivacyBudgetExceeded, match="spent"):
        ledger.plan("new", 0.25, 1, budget=spent, delta=DELTA, experiment_epsilon=spent, max_noise_multiplier=100.0)
    with pytest.raises(NoiseLimitExceeded):
        ledger.plan("new", 0.25, 20, budget=2.0, delta=DELTA, experiment_epsilon=2.0, max_noise_multiplier=10.0)
    assert ledger.path.read_bytes() == before


def test_per_experiment_cap_holds_over_all_planned_rounds_and_refuses_an_extra_one(tmp_path):
    ledger = new_ledger(tmp_path)
    policy = dict(budget=8.0, delta=DELTA, experiment_epsilon=2.0, max_noise_multiplier=10.0)
    sigma = ledger.plan("exp", 0.25, 6 * 4, **policy)  # declared: 6 rounds of 4 steps
    for r in range(6):
        ledger.reserve(sigma, 0.25, 4, f"round {r}", budget=8.0, delta=DELTA, experiment="exp", experiment_epsilon=2.0)
    own = epsilon_of([(sigma, 0.25, 24)], DELTA)
    assert own <= 2.0 and ledger.epsilon(DELTA) == pytest.approx(own)
    before = ledger.path.read_bytes(), ledger.record.read_bytes()
    # A 7th round (the coordinator under-declared planned-rounds) would cross the experiment's cap: refused, although
    # the site's budget of 8 has room for it.
    assert ledger.check(sigma, 0.25, 4, budget=8.0, delta=DELTA)[0]
    with pytest.raises(ExperimentBudgetExceeded, match="planned-rounds"):
        ledger.reserve(sigma, 0.25, 4, "round 6", budget=8.0, delta=DELTA, experiment="exp", experiment_epsilon=2.0)
    assert (ledger.path.read_bytes(), ledger.record.read_bytes()) == before
    # Another batch size (another q) is another plan of the same experiment: its steps count against the same cap.
    with pytest.raises(PrivacyBudgetExceeded):  # what is left of its cap would need σ far above 10
        ledger.plan("exp", 0.125, 8, **policy)
    # A new experiment gets its own allowance (the site's budget still binds).
    s2 = ledger.plan("exp-2", 0.25, 24, **policy)
    ledger.reserve(s2, 0.25, 4, "round 0", budget=8.0, delta=DELTA, experiment="exp-2", experiment_epsilon=2.0)


def test_budget_comes_from_the_site_only():
    """API shape: nothing a coordinator sends reaches the budget or the spend rate. The ledger checks take the budget,
    cap and noise limit as arguments that the DP trainer fills from the site's PrivacyConfig; start_dp_round has no
    budget, δ, clip, cap, noise-limit, share or dp parameter."""
    from common.dp_training import start_dp_round

    params = set(inspect.signature(start_dp_round).parameters)
    forbidden = {"epsilon_budget", "budget", "delta", "dp", "max_grad_norm", "share", "max_noise_multiplier"}
    assert not params & (forbidden | {"experiment_epsilon", "max_epsilon_per_experiment", "ledger", "ledger_record"})
    assert {"budget", "delta", "experiment", "experiment_epsilon"} <= set(
        inspect.signature(PrivacyLedger.reserve).parameters
    )
    plan = inspect.signature(PrivacyLedger.plan).parameters
    assert "share" not in plan and plan["max_noise_multiplier"].default is inspect.Parameter.empty
    assert plan["experiment_epsilon"].default is inspect.Parameter.empty
    assert not hasattr(P, "MAX_SIGMA")  # no hard-coded release limit: the site's max_noise_multiplier decides
