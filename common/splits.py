"""Patient-level splits computed at each site: tenfold assignment, the inner validation split, site-held-out plans.

Each site assigns its own patients from the federation's shared seed; the server sends only ``FoldPlan`` values (k,
seed) and a fold number, and never sees keys. Assignments depend on (key, label, seed) only: the same patients give
the same folds whatever order the index lists them in, on any machine and Python version (SHA-256, not ``hash``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

UNLABELLED = -1


def _rank_key(seed: int, key: Hashable) -> bytes:
    """A seed-dependent, platform-independent pseudo-random sort key for one patient."""
    return hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()


def _shuffled(keys: Sequence[Hashable], seed: int) -> list:
    return sorted(keys, key=lambda k: (_rank_key(seed, k), str(k)))


def _normalise_label(label) -> int:
    if label is None or (isinstance(label, float) and np.isnan(label)):
        return UNLABELLED
    value = int(label)
    if value not in (0, 1, UNLABELLED):
        raise ValueError(f"labels must be 0, 1, -1 or None, got {label!r}")
    return value


def assign_folds(keys: Sequence[Hashable], labels: Sequence, k: int = 10, seed: int = 0) -> dict:
    """Assign one site's labelled patients to folds 0..k−1: ``{key: fold}``.

    Within each class, patients are put in a seed-dependent order (SHA-256 of seed and key) and dealt round-robin;
    the benign deal starts where the malignant deal stopped. Hence every class differs by at most one between folds
    (stratified whenever the site has >= k of a class, spread as evenly as possible otherwise), fold sizes differ by
    at most one, and a site with n < k patients fills folds 0..n−1: the other folds are empty there, which callers
    must accept. Unlabelled patients (label −1 or None) are left out: they can be neither trained on nor evaluated.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    if len(keys) != len(labels):
        raise ValueError("keys and labels must have the same length")
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate patient keys")
    by_class: dict[int, list] = {1: [], 0: []}
    for key, label in zip(keys, labels, strict=True):
        value = _normalise_label(label)
        if value != UNLABELLED:
            by_class[value].append(key)
    folds: dict = {}
    position = 0
    for cls in (1, 0):  # minority class first: its spread matters most
        for key in _shuffled(by_class[cls], seed):
            folds[key] = position % k
            position += 1
    return folds


def fold_indices(folds: dict, keys: Sequence[Hashable], fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``keys`` of the training patients (other folds) and the test patients (this fold).

    Keys absent from ``folds`` (unlabelled) are in neither.
    """
    train = [i for i, key in enumerate(keys) if key in folds and folds[key] != fold]
    test = [i for i, key in enumerate(keys) if key in folds and folds[key] == fold]
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def inner_split(
    indices: Sequence, labels: Sequence, fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split training patients into inner-train and validation (threshold, round and epoch choices are made there).

    ``indices`` are the training patients (never the held-out fold) and ``labels`` their labels, aligned. Per class:
    round(fraction·n) patients go to validation, but at least one when the class has >= 2 and never all of them (a
    class of one stays in training: the model must see it, and the threshold then rests on the other class only).
    Deterministic and independent of input order (SHA-256 of seed and index). Returns sorted index arrays.
    """
    idx = list(indices)
    if len(idx) != len(labels):
        raise ValueError("indices and labels must have the same length")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    val = []
    for cls in (0, 1):
        members = [i for i, y in zip(idx, labels, strict=True) if _normalise_label(y) == cls]
        n_val = min(max(round(fraction * len(members)), 1 if len(members) >= 2 else 0), max(len(members) - 1, 0))
        val.extend(_shuffled(members, seed)[:n_val])
    val_set = set(val)
    train = [i for i in idx if i not in val_set]
    return np.sort(np.asarray(train)), np.sort(np.asarray(val, dtype=np.asarray(idx).dtype if idx else np.int64))


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
