"""The site's privacy ledger: every DP training step ever taken on this site's data, and the budget checks over it.

One ledger per site (`privacy.ledger` in site.yaml: a path the site chooses outside the cache, so that moving or
re-preparing the cache cannot touch it), owner-only, outside the run: it outlives runs, ClientApp processes and
restarts, and covers every model released from the site's data (each tenfold fold model, every site-held-out model,
the local-only model, the final model). ε is always computed from the whole ledger, never from a per-round
PrivacyEngine, whose accountant would silently restart at zero (DESIGN.md, "known traps").

Format (JSON, `spinefed-privacy-ledger/2`): `entries` — the accountant history merged by (σ, q), one entry per
distinct pair with its steps summed (composition is commutative, so merging is exact, and it keeps `epsilon()` fast
on long histories: see bench/dp_overhead.py); `purposes` — how many charges and steps each purpose ("tenfold fold 3
round 2", "final", ...) took (counts only, nothing per patient); `plans` — per experiment and sample rate, the noise
multiplier fixed for it, the steps it declared and the steps it has been charged; and the fields that make the ledger
tamper-evident: `ledger_id` (random, drawn when the ledger is created), `charges` (charges so far), `changes` (every
change: creation, plans, charges), `chain` = sha256(`prev_chain` ‖ canonical JSON of the last change), `prev_chain`,
and `last_change` (which carries a digest of the ledger's contents after it, so a hand edit of the numbers breaks the
chain). Floats are written with `repr` precision, so (σ, q) read back bit-identical and keep merging across processes.

The record (`privacy.ledger_record`, default beside the pseudonym secret, i.e. with the site's key material, away
from the ledger): a small file `{format, ledger_id, charges, changes, chain, updated}` that says which ledger the site
holds and how far its history has gone. Every read checks the ledger against it, and DP training is refused
(LedgerError) when
- the ledger is missing while a record exists (deleted, or a moved folder);
- the ledger was emptied (`{}`, an empty document) or replaced by another ledger (another or no `ledger_id`);
- the ledger was rolled back to an earlier copy (fewer charges or changes, or another chain than the record's);
- the record is missing while the ledger holds a history (record deleted, or `ledger_record` pointed elsewhere);
- a record exists but the ledger has no record fields (format 1, i.e. a copy from before the upgrade);
- the ledger's contents do not match its own chain (edited by hand), or either file cannot be read.
Both absent is a fresh site: deleting, or restoring, the ledger and its record *together* cannot be detected. Back
both up together (with the pseudonym secret) after every experiment, and restore them together. A format-1 ledger
without a record (a site that upgrades) is read as it is and migrated to format 2 by its next change.
LedgerError messages name no path (they may reach the coordinator); the site's log names both paths and the recovery:
restore the ledger and its record together from the last backup (deploy/SITE_IT.md). Never delete either to unblock.

Durability: every change is a read-modify-write under an exclusive `flock` on `<ledger>.lock` (reads take it too, so
they see ledger and record of the same change), each file written with an atomic replace (common/fileio.py): the
ledger first, then the record. A process killed between the two leaves the ledger exactly one change ahead of the
record (its `prev_chain` is the record's `chain`): that is accepted, and the record repaired from the ledger (the
ledger can only over-count, never under-count). A process killed at any other moment leaves the old or the new pair.

Spend-rate policy (`PrivacyLedger.plan`, deterministic; the site's, never the coordinator's): an experiment declares
up front how many DP steps it will take at this site (models × rounds × local steps); on its first round the site
fixes one σ for the whole experiment: the smallest σ (rounded up to 4 significant digits) such that
  (i)  the ledger so far plus the declared steps at (σ, q) compose (RDP) to at most the site's `epsilon_budget`, and
  (ii) the experiment's own steps alone (everything it was charged before at another q, plus the declared ones)
       compose to at most the site's per-experiment cap (`privacy.max_epsilon_per_experiment`, by default half the
       budget: PrivacyConfig.experiment_epsilon).
If that σ exceeds the site's `privacy.max_noise_multiplier` the experiment is refused (NoiseLimitExceeded, naming the σ
needed and the site's maximum) instead of training on noise; a spent budget is refused outright. The σ is stored
under the experiment's key and reused by every later round and process: a fixed (σ, q) merges into one ledger entry,
the noise is computed once for the declared steps, and the coordinator's declaration only trades noise for rounds.
`reserve` checks every round, before it trains, against the site's budget (the whole ledger) and against the
per-experiment cap (the steps the experiment was charged so far, tracked in its plan): an under-declaring coordinator
sees its extra rounds refused (ExperimentBudgetExceeded). On every refusal the ledger stays byte-identical. A
coordinator can never raise the budget, the cap or the noise limit: they come from the site config only. (A new
experiment id gets a new per-experiment allowance, never more than what the site's budget has left.)

Accountants: RDP (an upper bound, fast; what the checks and the reported ε use) and PRV (tighter, slower, for
reporting). References: Mironov 2017 (RDP), Mironov, Talwar, Zhang 2019 (sampled Gaussian), Gopi et al. 2021 (PRV).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
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

FORMAT = "spinefed-privacy-ledger/2"
OLD_FORMATS = ("spinefed-privacy-ledger/1",)  # read as they are without a record; migrated by the next change
RECORD_FORMAT = "spinefed-privacy-record/1"
GENESIS = "0" * 64  # prev_chain of a ledger's first change (its creation, which names its ledger_id)
RECOVERY = "restore the ledger and its record together from the last backup; see deploy/SITE_IT.md"
ACCOUNTANTS = ("rdp", "prv")
# Opacus' orders plus higher ones: at small σ the optimal order is beyond 63 and the bound would be looser.
ALPHAS = [*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 192, 256]
# Upper end of the root search for σ only (so that a refusal can say which σ would be needed). What trains is decided
# by the site's privacy.max_noise_multiplier, never by this constant.
SIGMA_SEARCH_LIMIT = 1e4


class PrivacyBudgetExceeded(SpineFedError):
    """The site's privacy policy does not allow this training. The message is safe to send to the coordinator."""


class NoiseLimitExceeded(PrivacyBudgetExceeded):
    """The experiment would need more noise than the site's `privacy.max_noise_multiplier` allows."""

    def __init__(self, message: str, sigma_needed: float = math.inf, max_sigma: float = math.nan):
        super().__init__(message)
        self.sigma_needed, self.max_sigma = sigma_needed, max_sigma


class ExperimentBudgetExceeded(PrivacyBudgetExceeded):
    """The experiment's own steps would cross the site's per-experiment ε (`privacy.max_epsilon_per_experiment`)."""


class LedgerError(SpineFedError):
    """The ledger cannot be read, or disagrees with its record; DP training is refused until site IT restores both.

    `reason`: a short code (missing, emptied, replaced, rolled-back, record-missing, old-format, edited, corrupt,
    unreadable, no-record). The message names no path (it may reach the coordinator); the site's log does.
    """

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason


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


@functools.lru_cache(maxsize=4096)
def _rdp_step(sigma: float, q: float) -> np.ndarray:
    """RDP curve of one step at (σ, q) (cached: a ledger holds few distinct pairs, and every check re-reads them)."""
    curve = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ALPHAS)
    curve.setflags(write=False)
    return curve


def _rdp(entries: list[Entry]) -> np.ndarray:
    """RDP curve over ALPHAS of the composition of `entries` (RDP adds up under composition; Opacus' compute_rdp
    multiplies the one-step curve by the steps in the same way)."""
    total = np.zeros(len(ALPHAS))
    for e in entries:
        total = total + _rdp_step(e.sigma, e.q) * e.steps
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
    target_epsilon: float,
    delta: float,
    q: float,
    steps: int,
    prior=(),
    max_sigma: float = SIGMA_SEARCH_LIMIT,
    min_sigma: float = 1.0,
) -> float:
    """Smallest σ (4 significant digits, rounded up) with ε_RDP(prior + (σ, q, steps)) <= target_epsilon.

    `prior`: what the ledger already holds (composition with it is exact under RDP). Raises PrivacyBudgetExceeded
    when even `max_sigma` does not fit (the prior alone is at or above the target, or the target is tiny).
    `min_sigma`: where the doubling search starts (a σ known to be too small speeds it up; the answer is the same
    up to the 4-digit rounding). Deterministic: the same arguments always give the same σ or the same refusal. This
    is arithmetic only: whether a σ is acceptable is the site's policy (PrivacyLedger.plan, max_noise_multiplier).
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
    start = hi = min(max(min_sigma, 1e-2), max_sigma)  # min_sigma: where the search starts (known too small)
    while eps(hi) > target_epsilon:
        hi = min(2 * hi, max_sigma)
    lo = hi / 2 if hi > start else 0.01
    if eps(lo) > target_epsilon:
        # Brent's method: ~8 evaluations (each ε costs ~0.1 s: RDP at fractional orders), far below the rounding.
        hi = brentq(lambda s: eps(s) - target_epsilon, lo, hi, xtol=1e-6, rtol=1e-6)
    else:  # σ < 0.01 would do: no meaningful privacy at this target, but within it
        hi = lo
    sigma = _round_up(hi)
    while eps(sigma) > target_epsilon:  # brentq may stop a hair below the root
        sigma = _round_up(sigma * 1.0001)
    return sigma


def plan_key(experiment: str, q: float) -> str:
    """The key of an experiment's plan at one sample rate (a new batch size gives a new q and so a new plan)."""
    return f"{experiment} q={float(q)!r}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _link(prev_chain: str, change: dict) -> str:
    """chain = sha256(prev_chain ‖ canonical JSON of the change)."""
    return hashlib.sha256((prev_chain + _canonical(change)).encode("ascii")).hexdigest()


_CONTENT = ("ledger_id", "charges", "changes", "entries", "purposes", "plans")


def _digest(state: dict) -> str:
    """Digest of what the ledger says (carried by each change, so the chain covers the numbers too)."""
    return hashlib.sha256(_canonical({k: state[k] for k in _CONTENT}).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class LedgerStatus:
    """What `PrivacyLedger.status()` found (for `client check`).

    state: "ok" (ledger and record agree), "fresh" (neither exists: nothing spent), "unverified" (no record
    configured, or a format-1 ledger not yet migrated), "refused" (LedgerError: `reason`, `message`).
    """

    state: str
    reason: str = ""
    message: str = ""
    ledger_id: str | None = None
    charges: int = 0
    changes: int = 0
    history: list[Entry] = field(default_factory=list)
    plans: dict = field(default_factory=dict)
    note: str = ""


class PrivacyLedger:
    """The site's persistent privacy ledger and its record (see the module docstring).

    `record`: the site's ledger record (PrivacyConfig.ledger_record). Without one (None) the ledger can be read for
    inspection (unverified) but never written: every charge, reservation and plan raises LedgerError. Every method
    re-reads both files under the lock, so charges made by other processes are always seen; writes are atomic, both
    files owner-only (0600).
    """

    def __init__(self, path: Path | str, record: Path | str | None = None):
        if path is None:
            raise LedgerError("privacy.ledger: no ledger path configured", reason="no-ledger")
        self.path = Path(path)
        self.record = None if record is None else Path(record)
        if self.record is not None and self.record.resolve() == self.path.resolve():
            raise LedgerError("privacy.ledger_record: the record must be another file than the ledger", "no-record")
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    # -- failing closed ----------------------------------------------------------------------------------------------
    def _fail(self, reason: str, message: str) -> LedgerError:
        """A LedgerError whose message is safe for the coordinator; the paths and the recovery go to the site's log."""
        log.error(
            "privacy ledger refused (%s): %s. Ledger: %s; record: %s. Recovery: %s. Never delete either file to "
            "unblock training: that resets the site's privacy budget.",
            reason,
            message,
            self.path,
            self.record,
            RECOVERY,
        )
        return LedgerError(
            f"privacy ledger: {message}; DP training is refused until site IT restores the ledger and its record "
            "together from backup",
            reason,
        )

    # -- reading -----------------------------------------------------------------------------------------------------
    def _read_json(self, path: Path, what: str) -> dict | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fail("unreadable", f"the {what} is unreadable ({exc.__class__.__name__})") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            log.error("privacy %s %s is not valid JSON: %s", what, path, exc)
            raise self._fail("corrupt", f"the {what} is corrupt (not valid JSON)") from None
        if not isinstance(data, dict):
            raise self._fail("corrupt", f"the {what} is corrupt (not a JSON object)")
        return data

    def _read_record(self) -> dict | None:
        if self.record is None:
            return None
        rec = self._read_json(self.record, "ledger record")
        if rec is None:
            return None
        try:
            if rec.get("format") != RECORD_FORMAT:
                raise ValueError(f"format {rec.get('format')!r}")
            for k in ("charges", "changes"):
                if isinstance(rec[k], bool) or not isinstance(rec[k], int) or rec[k] < 0:
                    raise ValueError(k)
            if not isinstance(rec["ledger_id"], str) or not isinstance(rec["chain"], str):
                raise ValueError("ledger_id/chain")
        except (KeyError, ValueError) as exc:
            log.error("privacy ledger record %s is corrupt: %s", self.record, exc)
            raise self._fail("corrupt", "the ledger record is corrupt") from None
        return rec

    def _fresh(self) -> dict:
        return {
            "format": FORMAT,
            "ledger_id": secrets.token_hex(16),
            "charges": 0,
            "changes": 0,
            "chain": GENESIS,
            "prev_chain": None,
            "last_change": None,
            "entries": [],
            "purposes": {},
            "plans": {},
            "_status": "fresh",
        }

    @staticmethod
    def _normalise(state: dict) -> None:
        """Entries merged and sorted, plans with their experiment and charged steps (format-1 plans lack them)."""
        state["entries"] = [
            {"sigma": e.sigma, "q": e.q, "steps": e.steps}
            for e in merge((d["sigma"], d["q"], d["steps"]) for d in state["entries"])
        ]
        if not isinstance(state["purposes"], dict) or not isinstance(state["plans"], dict):
            raise TypeError("purposes/plans")
        for key, p in state["plans"].items():
            if not isinstance(p, dict):
                raise TypeError("plan")
            p.setdefault("experiment", key.rsplit(" q=", 1)[0])
            # A format-1 plan did not count its steps: assume it used all it declared (never under-count).
            p.setdefault("charged_steps", int(p.get("planned_steps", 0)))

    def _load(self, repair: bool = False) -> dict:
        """Read and verify ledger and record; → state (with `_status`). Raises LedgerError (fails closed).

        repair (under the exclusive lock only): a record one change behind the ledger (a writer killed between the two
        writes), or missing beside a ledger that holds nothing but its creation, is rewritten from the ledger.
        """
        record = self._read_record()
        state = self._read_json(self.path, "ledger")
        if state is None:
            if record is not None:
                raise self._fail(
                    "missing",
                    f"the ledger is missing while the site's ledger record shows {record['charges']} charge(s) "
                    f"({record['changes']} change(s))",
                )
            return self._fresh()
        fmt = state.get("format")
        if fmt in OLD_FORMATS:
            if record is not None:
                raise self._fail(
                    "old-format",
                    f"the ledger is in the old format ({fmt}, without record fields) but the site keeps a ledger "
                    "record: it was replaced or restored from a copy made before the upgrade",
                )
            try:
                state.setdefault("purposes", {})
                state.setdefault("plans", {})
                state.setdefault("charges", 0)
                self._normalise(state)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("privacy ledger %s is corrupt: %s", self.path, exc)
                raise self._fail("corrupt", "the ledger is corrupt") from None
            state.update(ledger_id=None, changes=0, chain=GENESIS, prev_chain=None, last_change=None)
            state["_status"], state["_from_format"] = "old-format", fmt
            return state
        if fmt != FORMAT:
            if record is not None:
                raise self._fail(
                    "emptied",
                    "the ledger was emptied or replaced: it is not a ledger of this format, and the site's record "
                    f"shows {record['charges']} charge(s)",
                )
            raise self._fail("corrupt", f"the ledger is corrupt (format {str(fmt)[:40]!r})")
        if not all(k in state for k in ("ledger_id", "charges", "changes", "chain", "prev_chain", "last_change")):
            if record is not None:
                raise self._fail(
                    "emptied",
                    "the ledger was emptied or replaced: it has no ledger id or hash chain, and the site's record "
                    f"shows {record['charges']} charge(s)",
                )
            raise self._fail("no-record-fields", "the ledger has no ledger id or hash chain (not written by spinefed)")
        try:
            state.setdefault("purposes", {})
            state.setdefault("plans", {})
            self._normalise(state)
            last = state["last_change"]
            intact = (
                isinstance(last, dict)
                and isinstance(state["prev_chain"], str)
                and _link(state["prev_chain"], last) == state["chain"]
                and last.get("state") == _digest(state)
                and last.get("n") == state["changes"]
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("privacy ledger %s is corrupt: %s", self.path, exc)
            raise self._fail("corrupt", "the ledger is corrupt") from None
        if not intact:
            raise self._fail("edited", "the ledger's contents do not match its own hash chain (edited by hand?)")
        state["_status"] = "ok"
        if self.record is None:
            state["_status"] = "unverified"
            return state
        if record is None:
            if state["changes"] == 1 and last.get("kind") in ("create", "migrate"):
                # Killed between creating (or migrating) the ledger and writing the record: nothing was charged
                # since, and the ledger is the whole truth.
                state["_status"] = "record-behind"
            else:
                raise self._fail(
                    "record-missing",
                    f"the site's ledger record is missing while the ledger holds {state['charges']} charge(s) "
                    f"({state['changes']} change(s)): the record was deleted or privacy.ledger_record moved",
                )
        elif record["ledger_id"] != state["ledger_id"]:
            raise self._fail(
                "replaced", "the ledger was replaced by another ledger (its ledger id is not the one the record holds)"
            )
        elif state["chain"] == record["chain"]:
            if (state["charges"], state["changes"]) != (record["charges"], record["changes"]):
                raise self._fail("edited", "the ledger's counters do not match its record")
        elif (
            state["prev_chain"] == record["chain"]
            and state["changes"] == record["changes"] + 1
            and state["charges"] - record["charges"] in (0, 1)
        ):
            state["_status"] = "record-behind"  # killed between the ledger's write and the record's
        elif state["charges"] < record["charges"] or state["changes"] < record["changes"]:
            raise self._fail(
                "rolled-back",
                f"the ledger was rolled back to an earlier copy: it holds {state['charges']} charge(s) "
                f"({state['changes']} change(s)), the site's record {record['charges']} ({record['changes']})",
            )
        else:
            raise self._fail(
                "rolled-back",
                f"the ledger's history is not the one the site's record holds ({state['charges']} charge(s) in the "
                f"ledger, {record['charges']} in the record): rolled back, replaced, or the record restored alone",
            )
        if state["_status"] == "record-behind" and repair:
            log.warning(
                "privacy ledger %s: its record %s was one change behind (a process stopped between the two writes); "
                "record repaired from the ledger",
                self.path,
                self.record,
            )
            self._write_record(state)
            state["_status"] = "repaired"
        return state

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[dict]:
        """The verified state, read under the lock (repairing a record one change behind)."""
        with contextlib.ExitStack() as stack:
            locked = False
            if self.path.parent.is_dir():  # no ledger folder: nothing to lock, nothing to race with
                with contextlib.suppress(OSError):  # e.g. `client check` by a user who may read but not lock
                    stack.enter_context(self._locked())
                    locked = True
            yield self._load(repair=locked and self.record is not None)

    def status(self) -> LedgerStatus:
        """The ledger's state for `client check`; never raises LedgerError (a refusal is a state)."""
        try:
            with self._snapshot() as s:
                pass
        except LedgerError as exc:
            return LedgerStatus("refused", reason=exc.reason, message=str(exc))
        st = s["_status"]
        note = {
            "repaired": "the record was one change behind (a process stopped between the two writes): repaired",
            "old-format": f"ledger in the old format {s.get('_from_format')}: migrated to {FORMAT} by its next change",
            "unverified": "no ledger record configured: the ledger cannot be checked, and DP training is refused",
        }.get(st, "")
        state = {"fresh": "fresh", "old-format": "unverified", "unverified": "unverified"}.get(st, "ok")
        return LedgerStatus(
            state,
            ledger_id=s["ledger_id"] if st != "fresh" else None,
            charges=s["charges"],
            changes=s["changes"],
            history=[Entry(d["sigma"], d["q"], d["steps"]) for d in s["entries"]],
            plans=s["plans"],
            note=note,
        )

    def history(self) -> list[Entry]:
        """The merged history, one Entry per distinct (σ, q)."""
        with self._snapshot() as s:
            return [Entry(d["sigma"], d["q"], d["steps"]) for d in s["entries"]]

    def purposes(self) -> dict[str, dict[str, int]]:
        """{purpose: {"charges": n, "steps": n}}."""
        with self._snapshot() as s:
            return s["purposes"]

    def plans(self) -> dict[str, dict]:
        with self._snapshot() as s:
            return s["plans"]

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

    # -- writing -----------------------------------------------------------------------------------------------------
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
        # A process killed between writing a temporary file and renaming it leaves one behind; under the lock no
        # writer is active, so any left over is garbage.
        for target in (self.path, self.record):
            if target is None or not target.parent.is_dir():
                continue
            for tmp in target.parent.glob(f".{target.name}.*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _write_record(self, state: dict) -> None:
        rec = {
            "format": RECORD_FORMAT,
            "ledger_id": state["ledger_id"],
            "charges": state["charges"],
            "changes": state["changes"],
            "chain": state["chain"],
            "updated": _now(),
        }
        atomic_write_bytes(self.record, (json.dumps(rec, indent=1, sort_keys=True) + "\n").encode("utf-8"), 0o600)

    def _store(self, state: dict) -> None:
        """Ledger first, then record (a crash in between leaves the ledger one change ahead: accepted, repaired)."""
        state["updated"] = _now()
        out = {k: v for k, v in state.items() if not k.startswith("_")}
        data = json.dumps(out, indent=1, sort_keys=True, allow_nan=False) + "\n"
        atomic_write_bytes(self.path, data.encode("utf-8"), mode=0o600)
        self._write_record(state)

    @staticmethod
    def _advance(state: dict, change: dict) -> None:
        """Append `change` (already applied to the contents) to the hash chain."""
        state["changes"] += 1
        change = {**change, "n": state["changes"], "at": _now(), "state": _digest(state)}
        state["prev_chain"], state["chain"] = state["chain"], _link(state["chain"], change)
        state["last_change"] = change

    def _commit(self, state: dict, change: dict, apply) -> None:
        """Under the lock: create or migrate the ledger if needed, apply one change, write ledger then record."""
        if self.record is None:
            raise self._fail("no-record", "no ledger record is configured (privacy.ledger_record)")
        status = state["_status"]
        if status in ("fresh", "old-format"):
            if status == "fresh":
                state["created"] = _now()
                first = {"kind": "create", "ledger_id": state["ledger_id"]}
            else:
                state["ledger_id"] = secrets.token_hex(16)
                state["format"] = FORMAT
                first = {"kind": "migrate", "from": state["_from_format"], "ledger_id": state["ledger_id"]}
                log.warning("privacy ledger %s: migrated from %s to %s", self.path, state["_from_format"], FORMAT)
            self._advance(state, first)
            self._store(state)
        apply(state)
        self._advance(state, change)
        self._store(state)
        state["_status"] = "ok"

    @staticmethod
    def _add(state: dict, sigma: float, q: float, steps: int, purpose: str, key: str | None) -> None:
        entries = merge([*((d["sigma"], d["q"], d["steps"]) for d in state["entries"]), (sigma, q, steps)])
        state["entries"] = [{"sigma": e.sigma, "q": e.q, "steps": e.steps} for e in entries]
        p = state["purposes"].setdefault(purpose, {"charges": 0, "steps": 0})
        p["charges"] += 1
        p["steps"] += steps
        state["charges"] = state.get("charges", 0) + 1
        if key is not None and key in state["plans"]:
            state["plans"][key]["charged_steps"] += steps

    @staticmethod
    def _purpose(purpose: str) -> str:
        if not isinstance(purpose, str) or not purpose.strip() or len(purpose) > 200:
            raise ValueError("purpose: a non-empty string of at most 200 characters (e.g. 'tenfold fold 3 round 2')")
        return " ".join(purpose.split())

    def _charge_in(self, state: dict, sigma: float, q: float, steps: int, purpose: str, key: str | None) -> None:
        change = {"kind": "charge", "sigma": sigma, "q": q, "steps": steps, "purpose": purpose, "plan": key}
        self._commit(state, change, lambda s: self._add(s, sigma, q, steps, purpose, key))

    def charge(self, sigma: float, q: float, steps: int, purpose: str, *, experiment: str | None = None) -> int:
        """Record `steps` taken at (σ, q) for `purpose`, unconditionally (the privacy is spent once training ran);
        with `experiment`, the steps also count against its plan at q. Returns the steps now recorded at (σ, q)."""
        sigma, q, steps = _validate_mechanism(sigma, q, steps)
        purpose = self._purpose(purpose)
        key = None if experiment is None else plan_key(experiment, q)
        with self._locked():
            state = self._load(repair=True)
            self._charge_in(state, sigma, q, steps, purpose, key)
        log.info("privacy ledger: charged %d step(s) at sigma=%g q=%g for %s", steps, sigma, q, purpose)
        return next(d["steps"] for d in state["entries"] if d["sigma"] == sigma and d["q"] == q)

    @staticmethod
    def _experiment_history(state: dict, experiment: str) -> list[tuple[float, float, int]]:
        return [
            (p["sigma"], p["q"], p["charged_steps"])
            for p in state["plans"].values()
            if p["experiment"] == experiment and p["charged_steps"] > 0
        ]

    def _admit(
        self,
        state: dict,
        sigma: float,
        q: float,
        steps: int,
        budget: float,
        delta: float,
        experiment: str | None,
        experiment_epsilon: float | None,
    ) -> tuple[float, str | None]:
        """Raise PrivacyBudgetExceeded unless `steps` more at (σ, q) fit the site's budget and the experiment's cap;
        → (ε of the whole ledger after, RDP; the plan's key)."""
        history = [(d["sigma"], d["q"], d["steps"]) for d in state["entries"]]
        eps_after = epsilon_of([*history, (sigma, q, steps)], delta, "rdp")
        if eps_after > budget:
            spent = epsilon_of(history, delta, "rdp")
            raise PrivacyBudgetExceeded(
                f"privacy budget: this round would bring ε to {eps_after:.3g} over the site's budget "
                f"{budget:.3g} (spent {spent:.3g} at δ = {delta:g}); the site does not train"
            )
        if experiment is None:
            return eps_after, None
        key = plan_key(experiment, q)
        plan = state["plans"].get(key)
        if plan is None or plan["sigma"] != sigma:
            raise ValueError(f"no plan for this experiment at σ = {sigma:g}, q = {q:g}: call plan() first")
        cap = plan.get("experiment_epsilon", math.inf)
        cap = cap if experiment_epsilon is None else min(cap, experiment_epsilon)
        exp_after = epsilon_of([*self._experiment_history(state, experiment), (sigma, q, steps)], delta, "rdp")
        if exp_after > cap:
            raise ExperimentBudgetExceeded(
                f"privacy budget: this round would bring this experiment's own ε at this site to {exp_after:.3g}, "
                f"over the site's per-experiment limit {cap:.3g} at δ = {delta:g} (the experiment declared "
                f"{plan['planned_steps']} DP step(s) here, has taken {plan['charged_steps']}, this round needs "
                f"{steps}): the coordinator runs more rounds than it declared in planned-rounds; the site does not train"
            )
        return eps_after, key

    def admit(
        self,
        sigma: float,
        q: float,
        steps: int,
        budget: float,
        delta: float,
        *,
        experiment: str | None,
        experiment_epsilon: float | None = None,
    ) -> float:
        """Would this round be admitted by `reserve`? → ε after (RDP); raises as `reserve` would; writes nothing."""
        sigma, q, steps = _validate_mechanism(sigma, q, steps)
        with self._snapshot() as state:
            eps_after, _ = self._admit(state, sigma, q, steps, budget, delta, experiment, experiment_epsilon)
        return eps_after

    def reserve(
        self,
        sigma: float,
        q: float,
        steps: int,
        purpose: str,
        budget: float,
        delta: float,
        *,
        experiment: str | None,
        experiment_epsilon: float | None = None,
    ) -> float:
        """Check and charge in one locked transaction, before training: → ε after (RDP).

        Refused (the file untouched, byte-identical) with PrivacyBudgetExceeded when the round would bring the whole
        ledger over `budget`, or with ExperimentBudgetExceeded when it would bring the experiment's own charged steps
        (all its plans) over its per-experiment ε (the cap stored in its plan, or `experiment_epsilon` if lower).
        `experiment`: the experiment id given to `plan` (the plan at q must exist with this σ); None only for steps
        outside any experiment (tools, benchmarks), checked against the site's budget alone. Charging before the
        steps are taken is conservative: a round that dies half-way stays counted in full, never under-counted, and
        two processes of the same site can never both pass the check on the same remaining budget.
        """
        sigma, q, steps = _validate_mechanism(sigma, q, steps)
        purpose = self._purpose(purpose)
        with self._locked():
            state = self._load(repair=True)
            eps_after, key = self._admit(state, sigma, q, steps, budget, delta, experiment, experiment_epsilon)
            self._charge_in(state, sigma, q, steps, purpose, key)
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
        *,
        experiment_epsilon: float,
        max_noise_multiplier: float,
    ) -> float:
        """The experiment's noise multiplier: fixed on first use by the site's policy (module docstring), reused after.

        `experiment`: a stable key of the experiment (e.g. its config hash); a new batch size gives a new q and so a
        new plan (the experiment's steps under its other plans still count against its cap). `experiment_epsilon`:
        the site's per-experiment cap (PrivacyConfig.experiment_epsilon); `max_noise_multiplier`: the most noise the
        site trains with. Raises PrivacyBudgetExceeded (budget spent), ExperimentBudgetExceeded (the experiment's cap
        spent) or NoiseLimitExceeded (the σ needed exceeds the site's maximum); the file is then left untouched.
        """
        _validate_mechanism(1.0, q, planned_steps)
        if planned_steps < 1:
            raise ValueError("plan: planned steps must be >= 1")
        if not (experiment_epsilon > 0 and max_noise_multiplier > 0):
            raise ValueError("plan: experiment_epsilon and max_noise_multiplier must be > 0")
        key = plan_key(experiment, q)
        with self._locked():
            state = self._load(repair=True)
            known = state["plans"].get(key)
            if known is not None:
                return float(known["sigma"])
            history = [(d["sigma"], d["q"], d["steps"]) for d in state["entries"]]
            spent = epsilon_of(history, delta, "rdp")
            if spent >= budget:
                raise PrivacyBudgetExceeded(
                    f"privacy budget spent: ε {spent:.3g} of the site's {budget:.3g} at δ = {delta:g}; the site "
                    "trains no more with differential privacy"
                )
            own = self._experiment_history(state, experiment)
            own_spent = epsilon_of(own, delta, "rdp")
            if own_spent >= experiment_epsilon:
                raise ExperimentBudgetExceeded(
                    f"privacy budget: this experiment has spent ε {own_spent:.3g} at this site, its per-experiment "
                    f"limit is {experiment_epsilon:.3g} at δ = {delta:g}; the site does not train"
                )
            sigma = _site_sigma(
                q, planned_steps, delta, budget, history, spent, experiment_epsilon, own, max_noise_multiplier
            )
            plan = {
                "experiment": experiment,
                "sigma": sigma,
                "q": float(q),
                "planned_steps": int(planned_steps),
                "charged_steps": 0,
                "budget": float(budget),
                "experiment_epsilon": float(experiment_epsilon),
                "max_noise_multiplier": float(max_noise_multiplier),
                "delta": delta,
                "created": _now(),
            }
            change = {"kind": "plan", "key": key, "sigma": sigma, "q": float(q), "planned_steps": int(planned_steps)}
            self._commit(state, change, lambda s: s["plans"].__setitem__(key, plan))
        log.info(
            "privacy plan %s: sigma=%g for %d step(s) at q=%g (site budget %g, per-experiment cap %g)",
            key,
            sigma,
            planned_steps,
            q,
            budget,
            experiment_epsilon,
        )
        return sigma


def _site_sigma(q, steps, delta, budget, history, spent, cap, own, max_sigma) -> float:
    """The smallest σ meeting (i) ledger + planned <= budget and (ii) experiment's own + planned <= cap, or
    NoiseLimitExceeded naming the σ needed when that is above the site's maximum."""
    fits = epsilon_of([*history, (max_sigma, q, steps)], delta) <= budget
    fits = fits and epsilon_of([*own, (max_sigma, q, steps)], delta) <= cap
    if fits:  # max_sigma meets both: the larger of the two smallest σ does too (ε falls as σ grows)
        # The experiment's steps are part of the ledger's, so when the cap is at least the budget (i) implies (ii),
        # and when the ledger holds nothing but this experiment's steps the lower target decides alone.
        if cap >= budget:
            sigma = plan_noise(budget, delta, q, steps, prior=history, max_sigma=max_sigma)
        elif merge(own) == merge(history):
            sigma = plan_noise(cap, delta, q, steps, prior=own, max_sigma=max_sigma)
        else:
            sigma = max(
                plan_noise(budget, delta, q, steps, prior=history, max_sigma=max_sigma),
                plan_noise(cap, delta, q, steps, prior=own, max_sigma=max_sigma),
            )
        return min(sigma, max_sigma)  # rounding up to 4 digits never takes it past the site's maximum
    needed, limits = 0.0, []
    for target, prior, what in (
        (budget, history, f"the site's budget ε {budget:.3g} (spent {spent:.3g})"),
        (cap, own, f"the site's per-experiment limit ε {cap:.3g}"),
    ):
        try:
            s = plan_noise(target, delta, q, steps, prior=prior, min_sigma=max_sigma)
        except PrivacyBudgetExceeded:
            s = math.inf
        if s > max_sigma:
            limits.append(what)
        needed = max(needed, s)
    shown = f"σ = {needed:.4g}" if math.isfinite(needed) else f"σ above {SIGMA_SEARCH_LIMIT:g}"
    raise NoiseLimitExceeded(
        f"privacy budget: this experiment's {steps} planned DP step(s) at this site (sample rate {q:.3g}) would need "
        f"noise multiplier {shown} to stay within {' and '.join(limits)} at δ = {delta:g}; this site trains with σ "
        f"at most {max_sigma:g}. The coordinator can declare fewer planned rounds, fewer local epochs or fewer models "
        "at this site (a larger batch does not help: it raises the σ needed); the site does not train",
        sigma_needed=needed,
        max_sigma=max_sigma,
    )
