"""Patient-level splits computed at each site: tenfold assignment, the inner validation split, site-held-out plans.

Each site assigns its own patients from the federation's shared seed; the server sends only ``FoldPlan`` values (k,
seed) and a fold number, and never sees keys.

Membership is per patient: a patient's fold and whether it is an inner-validation patient are functions of its own
pseudonym key and the seed only (a SHA-256 of seed and key read as a uniform number in [0, 1)), never of rank, row
order, labels or the other patients. Adding or removing one patient therefore moves no other patient in any model
(every fold model, inner validation, site-held-out, local-only, final): the neighbouring-dataset assumption of
DP-SGD holds per patient, and results stay comparable when a manifest grows. The price: folds and classes are
balanced only in expectation (a fold's size is binomial), so sites report per-fold class counts (`membership_counts`)
and a unit in which a site has no training patient of one class is sat out explicitly. One rule for DP and non-DP
runs alike. SHA-256 (not ``hash``): the same on every machine and Python version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

UNLABELLED = -1


def uniform(purpose: str, seed: int, key: Hashable) -> float:
    """A seed-dependent, platform-independent number in [0, 1) for one patient (first 64 bits of SHA-256)."""
    digest = hashlib.sha256(f"spinefed/{purpose}/{seed}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fold_of_key(key: Hashable, k: int, seed: int) -> int:
    """The tenfold fold (0..k−1) of one patient: a function of its key and the seed only."""
    return min(int(uniform("fold", seed, key) * k), k - 1)


def is_validation(key: Hashable, fraction: float, seed: int) -> bool:
    """Whether a training patient is in the inner validation split: its key and the seed only, whatever it trains in."""
    return uniform("inner-validation", seed, key) < fraction


def _normalise_label(label) -> int:
    if label is None or (isinstance(label, float) and np.isnan(label)):
        return UNLABELLED
    value = int(label)
    if value not in (0, 1, UNLABELLED):
        raise ValueError(f"labels must be 0, 1, -1 or None, got {label!r}")
    return value


def assign_folds(keys: Sequence[Hashable], labels: Sequence, k: int = 10, seed: int = 0) -> dict:
    """Assign one site's labelled patients to folds 0..k−1: ``{key: fold}``, each by `fold_of_key`.

    Unlabelled patients (label −1 or None) are left out: they can be neither trained on nor evaluated. Folds may be
    empty at small sites, and class counts per fold vary (binomially): callers must accept both.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    if len(keys) != len(labels):
        raise ValueError("keys and labels must have the same length")
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate patient keys")
    return {
        key: fold_of_key(key, k, seed)
        for key, label in zip(keys, labels, strict=True)
        if _normalise_label(label) != UNLABELLED
    }


def fold_indices(folds: dict, keys: Sequence[Hashable], fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``keys`` of the training patients (other folds) and the test patients (this fold).

    Keys absent from ``folds`` (unlabelled) are in neither.
    """
    train = [i for i, key in enumerate(keys) if key in folds and folds[key] != fold]
    test = [i for i, key in enumerate(keys) if key in folds and folds[key] == fold]
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def inner_split(
    indices: Sequence, keys: Sequence[Hashable], fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split training patients into inner-train and validation (threshold and any other choice is made there).

    ``indices`` are the training patients (never the held-out fold) and ``keys`` their pseudonym keys, aligned. A
    patient is a validation patient when `is_validation(key)`: about `fraction` of them, whatever the unit, so
    validation patients are never trained on in any unit that uses the same seed. Returns sorted index arrays.
    """
    idx = list(indices)
    if len(idx) != len(keys):
        raise ValueError("indices and keys must have the same length")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    flags = [is_validation(key, fraction, seed) for key in keys]
    dtype = np.asarray(idx).dtype if idx else np.int64
    train = np.sort(np.asarray([i for i, v in zip(idx, flags, strict=True) if not v], dtype=dtype))
    val = np.sort(np.asarray([i for i, v in zip(idx, flags, strict=True) if v], dtype=dtype))
    return train, val


def inner_split_indices(
    indices: np.ndarray, keys: Sequence[Hashable], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(inner-train, validation) of a site's training patients `indices`, `keys` being all its keys by index: the one
    rule for fit and the site's tasks. Fraction 0: everyone trains, in the given order, and no one validates here."""
    if fraction <= 0:
        return indices, indices[:0]
    train, val = inner_split(indices, [keys[i] for i in indices], fraction=fraction, seed=seed)
    return np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)


def membership_counts(
    keys: Sequence[Hashable], labels: Sequence, k: int, fold_seed: int, fraction: float, split_seed: int
) -> dict[str, list[int]]:
    """Class counts of every unit's parts at one site (counts only: what a site may report).

    Per fold f (lists of length k): `fold-pos/neg` the held-out fold f, `train-pos/neg` the inner-train patients and
    `val-pos/neg` the inner-validation patients of the model that holds f out. `all-*` (lists of length 3: inner-train,
    validation, total) are the same for a model trained on every labelled patient (site-held-out, final).
    """
    y = [_normalise_label(v) for v in labels]
    labelled = [(key, lab) for key, lab in zip(keys, y, strict=True) if lab != UNLABELLED]
    val = {key: fraction > 0 and is_validation(key, fraction, split_seed) for key, _ in labelled}
    out = {name: [0] * k for name in ("fold-pos", "fold-neg", "train-pos", "train-neg", "val-pos", "val-neg")}
    all_pos, all_neg = [0, 0, 0], [0, 0, 0]
    for key, lab in labelled:
        cls = "pos" if lab == 1 else "neg"
        part = "val" if val[key] else "train"
        if k >= 2:
            held = fold_of_key(key, k, fold_seed)
            out[f"fold-{cls}"][held] += 1
            for f in range(k):
                if f != held:
                    out[f"{part}-{cls}"][f] += 1
        total = all_pos if lab == 1 else all_neg
        total[0 if part == "train" else 1] += 1
        total[2] += 1
    out["all-pos"], out["all-neg"] = all_pos, all_neg
    return out


def site_held_out_plan(sites: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """One entry per site: (held-out site, the other sites that train), in the given site order."""
    if len(set(sites)) != len(sites):
        raise ValueError("duplicate site names")
    if len(sites) < 2:
        raise ValueError("site-held-out needs at least two sites")
    return [(held, tuple(s for s in sites if s != held)) for held in sites]


@dataclass(frozen=True)
class FoldPlan:
    """The tenfold plan as plain values that travel in a run config; each site derives its folds from it."""

    k: int = 10
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"FoldPlan.k must be an integer >= 2, got {self.k!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"FoldPlan.seed must be an integer, got {self.seed!r}")

    def to_config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, values: dict) -> FoldPlan:
        unknown = set(values) - {"k", "seed"}
        if unknown:
            raise ValueError(f"FoldPlan: unknown keys {sorted(unknown)}")
        return cls(**{key: int(val) for key, val in values.items()})

    def folds(self) -> range:
        return range(self.k)

    def assign(self, keys: Sequence[Hashable], labels: Sequence) -> dict:
        return assign_folds(keys, labels, self.k, self.seed)
