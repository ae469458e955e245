"""Tests for common/splits.py: folds per site, the inner validation split, site-held-out plans."""

import random
from collections import Counter

import numpy as np
import pytest

from common.splits import FoldPlan, assign_folds, fold_indices, inner_split, site_held_out_plan


def _site(n_pos: int, n_neg: int, prefix: str = "k"):
    keys = [f"{prefix}{i:03d}" for i in range(n_pos + n_neg)]
    labels = [1] * n_pos + [0] * n_neg
    return keys, labels


@pytest.mark.parametrize(("n_pos", "n_neg"), [(50, 140), (12, 25), (3, 6), (0, 9), (1, 2), (1, 0), (0, 0), (9, 0)])
def test_every_patient_in_exactly_one_fold_and_stratified(n_pos, n_neg):
    keys, labels = _site(n_pos, n_neg)
    folds = assign_folds(keys, labels, k=10, seed=7)
    assert sorted(folds) == sorted(keys)  # each patient exactly once (a dict cannot hold a key twice)
    assert all(0 <= f < 10 for f in folds.values())
    for cls, n_cls in ((1, n_pos), (0, n_neg)):
        per_fold = Counter(folds[key] for key, y in zip(keys, labels, strict=True) if y == cls)
        counts = [per_fold.get(f, 0) for f in range(10)]
        assert max(counts) - min(counts) <= 1, counts
        assert sum(counts) == n_cls
    sizes = Counter(folds.values())
    sizes = [sizes.get(f, 0) for f in range(10)]
    assert max(sizes) - min(sizes) <= 1


def test_no_patient_in_two_folds_via_fold_indices():
    keys, labels = _site(20, 57)
    folds = assign_folds(keys, labels, k=10, seed=3)
    seen = []
    for f in range(10):
        train, test = fold_indices(folds, keys, f)
        assert not set(train) & set(test)
        assert len(train) + len(test) == len(keys)
        seen.extend(test.tolist())
    assert sorted(seen) == list(range(len(keys)))  # test folds partition the site


@pytest.mark.parametrize("n", [0, 1, 3, 9])
def test_small_sites_fill_folds_from_zero(n):
    keys, labels = _site(n // 3, n - n // 3)
    folds = assign_folds(keys, labels, k=10, seed=0)
    assert len(folds) == n
    assert sorted(folds.values()) == list(range(n))  # folds 0..n-1, one patient each


def test_deterministic_and_order_invariant():
    keys, labels = _site(17, 40)
    a = assign_folds(keys, labels, k=10, seed=11)
    pairs = list(zip(keys, labels, strict=True))
    random.Random(5).shuffle(pairs)
    b = assign_folds([p[0] for p in pairs], [p[1] for p in pairs], k=10, seed=11)
    assert a == b
    c = assign_folds(keys, labels, k=10, seed=12)
    assert a != c  # the seed matters


def test_unlabelled_excluded_and_bad_input_rejected():
    folds = assign_folds(["a", "b", "c", "d"], [1, -1, None, 0], k=10)
    assert set(folds) == {"a", "d"}
    with pytest.raises(ValueError):
        assign_folds(["a", "a"], [0, 1])
    with pytest.raises(ValueError):
        assign_folds(["a"], [2])
    with pytest.raises(ValueError):
        assign_folds(["a"], [0], k=1)


def test_inner_split_stratified_disjoint_and_excludes_test_fold():
    keys, labels = _site(30, 80)
    folds = assign_folds(keys, labels, k=10, seed=1)
    for f in range(10):
        train, test = fold_indices(folds, keys, f)
        tr, val = inner_split(train, [labels[i] for i in train], fraction=0.2, seed=1)
        assert not set(tr) & set(val)
        assert set(tr) | set(val) == set(train.tolist())
        assert not (set(tr) | set(val)) & set(test.tolist())
        n_val_pos = sum(labels[i] for i in val)
        n_train_pos = sum(labels[i] for i in train)
        assert n_val_pos == round(0.2 * n_train_pos)


@pytest.mark.parametrize(
    ("labels", "expected_val_pos", "expected_val_neg"),
    [([1, 1, 0, 0], 1, 1), ([1, 0, 0, 0, 0, 0], 0, 1), ([1, 0], 0, 0), ([1, 1, 1], 1, 0), ([], 0, 0)],
)
def test_inner_split_tiny_sites(labels, expected_val_pos, expected_val_neg):
    idx = list(range(100, 100 + len(labels)))
    tr, val = inner_split(idx, labels, fraction=0.2, seed=0)
    lab = dict(zip(idx, labels, strict=True))
    assert sum(lab[i] for i in val) == expected_val_pos
    assert sum(1 - lab[i] for i in val) == expected_val_neg
    for cls in (0, 1):  # every class present in training stays present
        if cls in labels:
            assert any(lab[i] == cls for i in tr)


def test_inner_split_deterministic_and_order_invariant():
    idx = np.arange(40)
    labels = [1 if i % 4 == 0 else 0 for i in idx]
    a = inner_split(idx, labels, seed=2)
    perm = np.random.default_rng(0).permutation(40)
    b = inner_split(idx[perm], [labels[i] for i in perm], seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], inner_split(idx, labels, seed=3)[1])


def test_site_held_out_plan():
    plan = site_held_out_plan(["A", "B", "C"])
    assert plan == [("A", ("B", "C")), ("B", ("A", "C")), ("C", ("A", "B"))]
    with pytest.raises(ValueError):
        site_held_out_plan(["A"])
    with pytest.raises(ValueError):
        site_held_out_plan(["A", "A"])


def test_fold_plan_round_trips_as_plain_values():
    plan = FoldPlan(k=10, seed=42)
    cfg = plan.to_config()
    assert cfg == {"k": 10, "seed": 42}
    assert FoldPlan.from_config(cfg) == plan
    keys, labels = _site(5, 15)
    assert plan.assign(keys, labels) == assign_folds(keys, labels, 10, 42)
    assert list(plan.folds()) == list(range(10))
    with pytest.raises(ValueError):
        FoldPlan(k=1)
    with pytest.raises(ValueError):
        FoldPlan.from_config({"k": 10, "sead": 1})
