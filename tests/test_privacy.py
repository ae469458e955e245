"""common/privacy.py: the site's privacy ledger (persistence across processes, merging, refusals, crash safety)."""

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
from common.privacy import ALPHAS, LedgerError, PrivacyBudgetExceeded, PrivacyLedger, epsilon_of, plan_noise

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
SIGMA, Q, STEPS = 1.1, 0.125, 40


def _run(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, **kw)


def test_two_rounds_in_two_processes_equal_one_accountant(tmp_path):
    path = tmp_path / "ledger.json"
    for r in (1, 2):
        proc = _run(
            f"""
            from common.privacy import PrivacyLedger
            PrivacyLedger({str(path)!r}).charge({SIGMA!r}, {Q!r}, {STEPS}, "tenfold fold 0 round {r}")
            """
        )
        assert proc.wait(timeout=120) == 0
    one = RDPAccountant()
    for _ in range(2 * STEPS):
        one.step(noise_multiplier=SIGMA, sample_rate=Q)
    ledger = PrivacyLedger(path)
    assert ledger.epsilon(DELTA) == pytest.approx(one.get_epsilon(DELTA, alphas=ALPHAS), rel=1e-12)
    # With Opacus' own orders too (the ledger's extra orders can only tighten the bound).
    assert ledger.epsilon(DELTA) <= one.get_epsilon(DELTA) + 1e-12
    assert [(e.sigma, e.q, e.steps) for e in ledger.history()] == [(SIGMA, Q, 2 * STEPS)]
    assert ledger.purposes() == {f"tenfold fold 0 round {r}": {"charges": 1, "steps": STEPS} for r in (1, 2)}


def test_over_budget_is_refused_and_leaves_the_ledger_byte_identical(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.charge(SIGMA, Q, STEPS, "local-only")
    before = ledger.path.read_bytes()
    fits, eps_after = ledger.check(SIGMA, Q, 10 * STEPS, budget=2.0, delta=DELTA)
    assert not fits and eps_after > 2.0
    with pytest.raises(PrivacyBudgetExceeded, match="over the site's budget"):
        ledger.reserve(SIGMA, Q, 10 * STEPS, "final", budget=2.0, delta=DELTA)
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.plan("exp", Q, 100, budget=ledger.epsilon(DELTA) * 0.5, delta=DELTA)
    assert ledger.path.read_bytes() == before
    # A round that fits is recorded, and reported as the ε the check predicted.
    fits, predicted = ledger.check(SIGMA, Q, 1, budget=100.0, delta=DELTA)
    assert fits and ledger.reserve(SIGMA, Q, 1, "final", budget=100.0, delta=DELTA) == pytest.approx(predicted)


def test_killed_writer_leaves_a_readable_ledger(tmp_path):
    path = tmp_path / "ledger.json"
    proc = _run(
        f"""
        import sys
        from common.privacy import PrivacyLedger
        ledger = PrivacyLedger({str(path)!r})
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
    ledger = PrivacyLedger(path)
    (entry,) = ledger.history()
    assert entry.steps % 3 == 0 and entry.steps >= 3
    assert sum(p["steps"] for p in ledger.purposes().values()) == entry.steps
    # The next process carries on (a temporary file left by the kill is cleaned under the lock).
    ledger.charge(1.0, 0.5, 3, "final")
    assert ledger.history()[0].steps == entry.steps + 3
    assert not list(tmp_path.glob(".ledger.json.*.tmp"))


def test_interrupted_atomic_write_keeps_the_old_ledger(tmp_path, monkeypatch):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
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
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    for r in range(300):
        ledger.charge(SIGMA, Q, 2, f"tenfold fold {r % 10} round {r // 10}")
    hist = ledger.history()
    assert [(e.sigma, e.q, e.steps) for e in hist] == [(SIGMA, Q, 600)]
    assert len(json.loads(ledger.path.read_text())["entries"]) == 1
    assert sum(p["charges"] for p in ledger.purposes().values()) == 300
    assert ledger.epsilon(DELTA) == pytest.approx(epsilon_of([(SIGMA, Q, 600)], DELTA))


def test_ledger_is_owner_only_and_names_no_path_when_corrupt(tmp_path):
    ledger = PrivacyLedger(tmp_path / "site" / "ledger.json")
    ledger.charge(SIGMA, Q, 1, "final")
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.lock_path.stat().st_mode) == 0o600
    ledger.path.write_text('{"format": "spinefed-privacy-ledger/1", "entries": [{"sigma": 1.0')
    with pytest.raises(LedgerError) as err:
        ledger.epsilon(DELTA)
    assert str(tmp_path) not in str(err.value) and "ledger.json" not in str(err.value)
    with pytest.raises(LedgerError):  # fails closed: no charge on top of an unreadable history
        ledger.reserve(SIGMA, Q, 1, "final", budget=100.0, delta=DELTA)


def test_plan_noise_meets_the_target_and_is_deterministic():
    sigma = plan_noise(3.0, DELTA, q=8 / 17, steps=60)
    assert epsilon_of([(sigma, 8 / 17, 60)], DELTA) <= 3.0
    assert epsilon_of([(sigma * 0.99, 8 / 17, 60)], DELTA) > 3.0  # close to the smallest σ
    assert 3 < sigma < 8  # DESIGN.md: 17 patients, ε = 3 over 60 steps needs σ ≈ 5
    assert plan_noise(3.0, DELTA, q=8 / 17, steps=60) == sigma
    prior = [(sigma, 8 / 17, 60)]
    with pytest.raises(PrivacyBudgetExceeded):
        plan_noise(3.0, DELTA, q=8 / 17, steps=60, prior=prior)


def test_plan_is_fixed_on_first_use_and_fits_the_declared_steps(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.charge(2.0, 0.1, 50, "earlier experiment")
    sigma = ledger.plan("exp-A", 0.25, planned_steps=40, budget=4.0, delta=DELTA)
    # A later round that declares fewer steps (or another budget) still gets the same σ.
    assert ledger.plan("exp-A", 0.25, planned_steps=4, budget=100.0, delta=DELTA) == sigma
    for r in range(10):  # the declared 40 steps, as 10 rounds of 4: all fit; the 11th does not
        ledger.reserve(sigma, 0.25, 4, f"tenfold round {r}", budget=4.0, delta=DELTA)
    assert ledger.epsilon(DELTA) <= 4.0
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.reserve(sigma, 0.25, 4, "tenfold round 10", budget=4.0, delta=DELTA)
    # share: an experiment may be limited to part of what remains.
    other = PrivacyLedger(tmp_path / "other.json")
    assert other.plan("exp", 0.25, 40, budget=4.0, delta=DELTA, share=0.5) > other.plan(
        "exp2", 0.25, 40, budget=4.0, delta=DELTA
    )


def test_budget_comes_from_the_site_only():
    """API shape: nothing a coordinator sends reaches the budget. The ledger checks take the budget as an argument
    that the DP trainer fills from the site's PrivacyConfig; start_dp_round has no budget, δ, clip or dp parameter."""
    from common.dp_training import start_dp_round

    params = set(inspect.signature(start_dp_round).parameters)
    assert not params & {"epsilon_budget", "budget", "delta", "dp", "max_grad_norm"}
    assert {"budget", "delta"} <= set(inspect.signature(PrivacyLedger.reserve).parameters)
    assert P.MAX_SIGMA >= 10
