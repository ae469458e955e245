"""The site's privacy ledger: every DP training step ever taken on this site's data, and the budget checks over it.

One ledger per site (path from the site config, `privacy.ledger`), owner-only, outside the run: it outlives runs,
ClientApp processes and restarts, and covers every model released from the site's data (each tenfold fold model,
every site-held-out model, the local-only model, the final model). ε is always computed from the whole ledger, never
from a per-round PrivacyEngine, whose accountant would silently restart at zero (DESIGN.md, "known traps").

Format (JSON, `spinefed-privacy-ledger/1`): `entries` — the accountant history merged by (σ, q), one entry per distinct
pair with its steps summed (composition is commutative, so merging is exact, and it keeps `epsilon()` fast on long
histories: see bench/dp_overhead.py); `purposes` — how many charges and steps each purpose ("tenfold fold 3 round 2",
"final", ...) took (counts only, nothing per patient); `plans` — the noise multiplier fixed for each experiment.
Floats are written with `repr` precision, so (σ, q) read back bit-identical and keep merging across processes.

Durability: every change is a read-modify-write under an exclusive `flock` on `<ledger>.lock`, written with an
atomic replace (common/fileio.py), so concurrent processes serialise and a process killed at any moment leaves either
the old or the new complete file. A ledger that cannot be read fails closed: DP training is refused until site IT
restores it (a missing file is a fresh site with nothing spent).

Budget-splitting policy (`PrivacyLedger.plan`, deterministic): an experiment declares up front how many DP steps it
will take at this site in total (models × rounds × local steps); on its first round the site fixes one σ for the
whole experiment: the smallest σ (rounded up to 4 significant digits) such that the ledger so far plus all declared
steps at (σ, q) compose (RDP) to at most `spent + share × (budget − spent)`. The σ is stored under the experiment's
key and reused by every later round and process. Why: a fixed (σ, q) per experiment merges into one ledger entry,
the noise is computed once for the planned steps, the last declared round ends at or under the budget, and the
coordinator's declaration only trades noise for rounds: over-declaring wastes utility, under-declaring makes the
later rounds refused by `reserve`, which checks every round against the site's budget whatever the plan said.
A coordinator can never raise the budget: budget and δ come from the site config only.

Accountants: RDP (an upper bound, fast; what the checks and the reported ε use) and PRV (tighter, slower, for
reporting). References: Mironov 2017 (RDP), Mironov, Talwar, Zhang 2019 (sampled Gaussian), Gopi et al. 2021 (PRV).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy.optimize import brentq

from common.errors import SpineFedError
from common.fileio import atomic_write_bytes

try:  # POSIX advisory locks; elsewhere the atomic replace alone keeps the file readable
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

FORMAT = "spinefed-privacy-ledger/1"
ACCOUNTANTS = ("rdp", "prv")
# Opacus' orders plus higher ones: at small σ the optimal order is beyond 63 and the bound would be looser.
ALPHAS = [*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 192, 256]
MAX_SIGMA = 100.0  # beyond this the model is noise; refuse rather than release it


class PrivacyBudgetExceeded(SpineFedError):
    """The site's privacy budget does not allow this training. The message is safe to send to the coordinator."""


class LedgerError(SpineFedError):
    """The ledger cannot be read or is inconsistent; DP training is refused until site IT restores it."""


@dataclass(frozen=True)
class Entry:
    """Steps of the Poisson-subsampled Gaussian mechanism at one (noise multiplier σ, sample rate q)."""

    sigma: float
    q: float
    steps: int


def _validate_mechanism(sigma: float, q: float, steps: int) -> tuple[float, float, int]:
    sigma, q = float(sigma), float(q)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise multiplier must be a finite number > 0, got {sigma!r}")
    if not (math.isfinite(q) and 0 < q <= 1):
        raise ValueError(f"sample rate must be in (0, 1], got {q!r}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return sigma, q, int(steps)


def merge(history) -> list[Entry]:
    """Merge (σ, q, steps) triples by (σ, q), summing steps; sorted, zero-step entries dropped."""
    steps: dict[tuple[float, float], int] = {}
    for item in history:
        sigma, q, n = item if not isinstance(item, Entry) else (item.sigma, item.q, item.steps)
        sigma, q, n = _validate_mechanism(sigma, q, n)
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return [Entry(s, q, n) for (s, q), n in sorted(steps.items()) if n > 0]


def _rdp(entries: list[Entry]) -> np.ndarray:
    """RDP curve over ALPHAS of the composition of `entries` (RDP adds up under composition)."""
    total = np.zeros(len(ALPHAS))
    for e in entries:
        total = total + rdp_analysis.compute_rdp(q=e.q, noise_multiplier=e.sigma, steps=e.steps, orders=ALPHAS)
    return total


def _eps_from_rdp(rdp: np.ndarray, delta: float) -> float:
    if not np.any(rdp):
        return 0.0
    with warnings.catch_warnings():
        # "Optimal order is the largest/smallest alpha": the bound holds all the same (only less tight).
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def epsilon_of(history, delta: float, accountant: str = "rdp") -> float:
    """ε at δ of a history of (σ, q, steps), merged first. RDP: upper bound, fast. PRV: tighter upper bound, slower."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant: expected one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    entries = merge(history)
    if not entries:
        return 0.0
    if accountant == "rdp":
        return _eps_from_rdp(_rdp(entries), delta)
    acc = PRVAccountant()
    acc.history = [(e.sigma, e.q, e.steps) for e in entries]
    return float(acc.get_epsilon(delta=delta))


def _round_up(x: float, digits: int = 4) -> float:
    """x rounded up to `digits` significant digits (a larger σ only lowers ε)."""
    if x <= 0:
        return x
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale - 1e-9) / scale


def plan_noise(
    target_epsilon: float, delta: float, q: float, steps: int, prior=(), max_sigma: float = MAX_SIGMA
) -> float:
    """Smallest σ (4 significant digits, rounded up) with ε_RDP(prior + (σ, q, steps)) <= target_epsilon.

    `prior`: what the ledger already holds (composition with it is exact under RDP). Raises PrivacyBudgetExceeded
    when even `max_sigma` does not fit (the prior alone is at or above the target, or the target is tiny).
    Deterministic: the same arguments always give the same σ or the same refusal.
    """
    _validate_mechanism(1.0, q, steps)
    if steps == 0:
        raise ValueError("plan_noise: planned steps must be >= 1")
    prior_rdp = _rdp(merge(prior))

    def eps(sigma: float) -> float:
        return _eps_from_rdp(prior_rdp + _rdp([Entry(sigma, q, steps)]), delta)

    if eps(max_sigma) > target_epsilon:
        raise PrivacyBudgetExceeded(
            f"privacy budget: the remaining budget cannot cover {steps} planned steps "
            f"(ε target {target_epsilon:.3g}, already spent {_eps_from_rdp(prior_rdp, delta):.3g}, "
            f"even σ = {max_sigma:g} would exceed it)"
        )
    hi = 1.0
    while eps(hi) > target_epsilon:
        hi = min(2 * hi, max_sigma)
    lo = hi / 2 if hi > 1.0 else 0.01
    if eps(lo) > target_epsilon:
        # Brent's method: ~8 evaluations (each ε costs ~0.1 s: RDP at fractional orders), far below the rounding.
        hi = brentq(lambda s: eps(s) - target_epsilon, lo, hi, xtol=1e-6, rtol=1e-6)
    else:  # σ < 0.01 would do: no meaningful privacy at this target, but within it
        hi = lo
    sigma = _round_up(hi)
    while eps(sigma) > target_epsilon:  # brentq may stop a hair below the root
        sigma = _round_up(sigma * 1.0001)
    return sigma


class PrivacyLedger:
    """The site's persistent privacy ledger (see the module docstring). Every method re-reads the file, so
    charges made by other processes are always seen; writes are locked and atomic, the file owner-only (0600)."""

    def __init__(self, path: Path | str):
        if path is None:
            raise LedgerError("privacy.ledger: no ledger path configured")
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    # -- reading -------------------------------------------------------------------------------------------------
    def _read(self) -> dict:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {"format": FORMAT, "entries": [], "purposes": {}, "plans": {}, "charges": 0}
        except OSError as exc:
            log.error("privacy ledger %s unreadable: %s", self.path, exc)
            raise LedgerError(f"the site's privacy ledger is unreadable ({exc.__class__.__name__})") from None
        try:
            state = json.loads(raw.decode("utf-8"))
            if state.get("format") != FORMAT:
                raise ValueError(f"format {state.get('format')!r}")
            state["entries"] = [
                {"sigma": e.sigma, "q": e.q, "steps": e.steps}
                for e in merge((d["sigma"], d["q"], d["steps"]) for d in state["entries"])
            ]
            state.setdefault("purposes", {})
            state.setdefault("plans", {})
            state.setdefault("charges", 0)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Paths stay in the site's log; the message may reach the coordinator.
            log.error("privacy ledger %s is corrupt: %s", self.path, exc)
            raise LedgerError(
                "the site's privacy ledger is corrupt; DP training is refused until site IT restores it"
            ) from None
        return state

    def history(self) -> list[Entry]:
        """The merged history, one Entry per distinct (σ, q)."""
        return [Entry(d["sigma"], d["q"], d["steps"]) for d in self._read()["entries"]]

    def purposes(self) -> dict[str, dict[str, int]]:
        """{purpose: {"charges": n, "steps": n}}."""
        return self._read()["purposes"]

    def plans(self) -> dict[str, dict]:
        return self._read()["plans"]

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """ε spent so far at δ, over every model ever trained on this site's data."""
        return epsilon_of(self.history(), delta, accountant)

    def check(
        self, planned_sigma: float, planned_q: float, planned_steps: int, budget: float, delta: float
    ) -> tuple[bool, float]:
        """Would `planned_steps` more steps at (σ, q) stay within `budget`? → (fits, ε after), RDP (an upper bound)."""
        planned = _validate_mechanism(planned_sigma, planned_q, planned_steps)
        eps_after = epsilon_of([*self.history(), planned], delta, "rdp")
        return eps_after <= budget, eps_after

    # -- writing -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_stale_temporaries()
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _remove_stale_temporaries(self) -> None:
        # A process killed between writing the temporary file and renaming it leaves one behind; under the lock no
        # writer is active, so any left over is garbage.
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _write(self, state: dict) -> None:
        state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = json.dumps(state, indent=1, sort_keys=True, allow_nan=False) + "\n"
        atomic_write_bytes(self.path, data.encode("utf-8"), mode=0o600)

    @staticmethod
    def _add(state: dict, sigma: float, q: float, steps: int, purpose: str) -> None:
        entries = merge([*((d["sigma"], d["q"], d["steps"]) for d in state["entries"]), (sigma, q, steps)])
        state["entries"] = [{"sigma": e.sigma, "q": e.q, "steps": e.steps} for e in entries]
        p = state["purposes"].setdefault(purpose, {"charges": 0, "steps": 0})
        p["charges"] += 1
        p["steps"] += steps
        state["charges"] = state.get("charges", 0) + 1

    @staticmethod
    def _purpose(purpose: str) -> str:
        if not isinstance(purpose, str) or not purpose.strip() or len(purpose) > 200:
            raise ValueError("purpose: a non-empty string of at most 200 characters (e.g. 'tenfold fold 3 round 2')")
        return " ".join(purpose.split())

    def charge(self, sigma: float, q: float, steps: int, purpose: str) -> float:
        """Record `steps` taken at (σ, q) for `purpose`, unconditionally (the privacy is spent once training ran).

        Returns the number of steps now recorded at (σ, q).
        """
        sigma, q, steps = _validate_mechanism(sigma, q, steps)
        purpose = self._purpose(purpose)
        with self._locked():
            state = self._read()
            self._add(state, sigma, q, steps, purpose)
            self._write(state)
        log.info("privacy ledger: charged %d step(s) at sigma=%g q=%g for %s", steps, sigma, q, purpose)
        return next(d["steps"] for d in state["entries"] if d["sigma"] == sigma and d["q"] == q)

    def reserve(self, sigma: float, q: float, steps: int, purpose: str, budget: float, delta: float) -> float:
        """Check and charge in one locked transaction, before training: → ε after (RDP).

        Over budget: PrivacyBudgetExceeded, and the file is not touched (byte-identical). Charging before the steps
        are taken is conservative: a round that dies half-way stays counted in full, never under-counted, and two
        processes of the same site can never both pass the check on the same remaining budget.
        """
        sigma, q, steps = _validate_mechanism(sigma, q, steps)
        purpose = self._purpose(purpose)
        with self._locked():
            state = self._read()
            history = [(d["sigma"], d["q"], d["steps"]) for d in state["entries"]]
            eps_after = epsilon_of([*history, (sigma, q, steps)], delta, "rdp")
            if eps_after > budget:
                spent = epsilon_of(history, delta, "rdp")
                raise PrivacyBudgetExceeded(
                    f"privacy budget: this round would bring ε to {eps_after:.3g} over the site's budget "
                    f"{budget:.3g} (spent {spent:.3g} at δ = {delta:g}); the site does not train"
                )
            self._add(state, sigma, q, steps, purpose)
            self._write(state)
        log.info(
            "privacy ledger: reserved %d step(s) at sigma=%g q=%g for %s (ε → %.3f)",
            steps,
            sigma,
            q,
            purpose,
            eps_after,
        )
        return eps_after

    def plan(
        self,
        experiment: str,
        q: float,
        planned_steps: int,
        budget: float,
        delta: float,
        share: float = 1.0,
        max_sigma: float = MAX_SIGMA,
    ) -> float:
        """The experiment's noise multiplier: fixed on first use (policy in the module docstring), reused after.

        `experiment`: a stable key of the experiment (e.g. its config hash); a new batch size gives a new q and so a
        new plan. `share` in (0, 1]: the fraction of the remaining budget this experiment may use (site policy).
        Raises PrivacyBudgetExceeded when nothing fits; the file is then left untouched.
        """
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        _validate_mechanism(1.0, q, planned_steps)
        key = f"{experiment} q={float(q)!r}"
        with self._locked():
            state = self._read()
            known = state["plans"].get(key)
            if known is not None:
                return float(known["sigma"])
            history = [(d["sigma"], d["q"], d["steps"]) for d in state["entries"]]
            spent = epsilon_of(history, delta, "rdp")
            if spent >= budget:
                raise PrivacyBudgetExceeded(
                    f"privacy budget spent: ε {spent:.3g} of the site's {budget:.3g} at δ = {delta:g}; the site does "
                    "not train"
                )
            target = spent + share * (budget - spent)
            sigma = plan_noise(target, delta, q, planned_steps, prior=history, max_sigma=max_sigma)
            state["plans"][key] = {
                "sigma": sigma,
                "q": float(q),
                "planned_steps": int(planned_steps),
                "target_epsilon": target,
                "delta": delta,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self._write(state)
        log.info(
            "privacy plan %s: sigma=%g for %d step(s) at q=%g (ε target %.3f)", key, sigma, planned_steps, q, target
        )
        return sigma
