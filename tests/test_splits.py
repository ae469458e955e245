"""Tests for common/splits.py: folds per site, the inner validation split, site-held-out plans."""

import random
from collections import Counter

import numpy as np
import pytest

from common.splits import (
    FoldPlan,
    assign_folds,
    fold_indices,
    fold_of_key,
    inner_split,
    membership_counts,
    site_held_out_plan,
)


def _site(n_pos: int, n_neg: int, prefix: str = "k"):
    keys = [f"{prefix}{i:03d}" for i in range(n_pos + n_neg)]
    labels = [1] * n_pos + [0] * n_neg
    return keys, labels


@pytest.mark.parametrize(("n_pos", "n_neg"), [(50, 140), (12, 25), (3, 6), (0, 9), (1, 0), (0, 0)])
def test_every_labelled_patient_in_exactly_one_fold(n_pos, n_neg):
    keys, labels = _site(n_pos, n_neg)
    folds = assign_folds(keys, labels, k=10, seed=7)
    assert sorted(folds) == sorted(keys)  # each patient exactly once (a dict cannot hold a key twice)
    assert all(0 <= f < 10 for f in folds.values())
    assert all(folds[key] == fold_of_key(key, 10, 7) for key in keys)  # the key alone decides


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


def test_folds_balance_in_expectation():
    """Per-key assignment: fold sizes are binomial, not equal; over many patients each fold gets about 1/k."""
    keys, labels = _site(500, 1500)
    folds = assign_folds(keys, labels, k=10, seed=0)
    for cls in (0, 1):
        per_fold = Counter(folds[k] for k, y in zip(keys, labels, strict=True) if y == cls)
        n = 500 if cls else 1500
        for f in range(10):  # within 5 binomial standard deviations of n/k
            assert abs(per_fold[f] - n / 10) < 5 * (n * 0.1 * 0.9) ** 0.5, (cls, f, per_fold[f])


def test_one_patient_more_or_less_moves_no_one_else():
    """The DP neighbouring-dataset property: fold and validation membership of every other patient unchanged."""
    keys, labels = _site(14, 31)
    rng = random.Random(3)
    for _ in range(10):
        smaller = list(zip(keys, labels, strict=True))
        removed = smaller.pop(rng.randrange(len(smaller)))
        larger = list(zip(keys, labels, strict=True))
        larger.insert(rng.randrange(len(larger)), ("new-patient", 1))
        for variant in (smaller, larger):
            vk, vl = [k for k, _ in variant], [y for _, y in variant]
            a, b = assign_folds(keys, labels, 10, 5), assign_folds(vk, vl, 10, 5)
            shared = (set(keys) & set(vk)) - {removed[0]}
            assert all(a[k] == b[k] for k in shared)
            va = set(np.asarray(keys)[inner_split(np.arange(len(keys)), keys, 0.2, 9)[1]])
            vb = set(np.asarray(vk)[inner_split(np.arange(len(vk)), vk, 0.2, 9)[1]])
            assert va & shared == vb & shared


def test_membership_counts_add_up():
    keys, labels = _site(30, 70)
    labels[-1] = -1  # unlabelled: counted nowhere
    c = membership_counts(keys, labels, 10, 1, 0.2, 2)
    assert sum(c["fold-pos"]) == 30 and sum(c["fold-neg"]) == 69
    for f in range(10):
        assert c["train-pos"][f] + c["val-pos"][f] + c["fold-pos"][f] == 30
        assert c["train-neg"][f] + c["val-neg"][f] + c["fold-neg"][f] == 69
    assert c["all-pos"][0] + c["all-pos"][1] == c["all-pos"][2] == 30
    folds = assign_folds(keys, labels, 10, 1)
    assert c["fold-pos"][3] == sum(1 for k, y in zip(keys, labels, strict=True) if y == 1 and folds[k] == 3)


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


def test_inner_split_disjoint_excludes_test_fold_and_stable_across_folds():
    keys, labels = _site(30, 80)
    folds = assign_folds(keys, labels, k=10, seed=1)
    val_everywhere = set()
    for f in range(10):
        train, test = fold_indices(folds, keys, f)
        tr, val = inner_split(train, [keys[i] for i in train], fraction=0.2, seed=1)
        assert not set(tr) & set(val)
        assert set(tr) | set(val) == set(train.tolist())
        assert not (set(tr) | set(val)) & set(test.tolist())
        val_everywhere |= set(val.tolist())
    # a validation patient is one in every fold model it trains in: never trained on under the same seed
    for f in range(10):
        train, _ = fold_indices(folds, keys, f)
        tr, _ = inner_split(train, [keys[i] for i in train], fraction=0.2, seed=1)
        assert not set(tr.tolist()) & val_everywhere
    assert 0.1 < len(val_everywhere) / len(keys) < 0.3


def test_inner_split_deterministic_and_order_invariant():
    idx = np.arange(40)
    keys = [f"p{i}" for i in idx]
    a = inner_split(idx, keys, seed=2)
    perm = np.random.default_rng(0).permutation(40)
    b = inner_split(idx[perm], [keys[i] for i in perm], seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], inner_split(idx, keys, seed=3)[1])
    with pytest.raises(ValueError):
        inner_split(idx, keys[:3])


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


def test_inner_split_indices_is_inner_split_by_key_and_fraction_zero_validates_no_one():
    from common.splits import inner_split_indices

    keys = [f"key-{i:03d}" for i in range(60)]
    train = np.array([5, 3, 40, 7, 22, 59, 11], dtype=np.int64)
    tr, val = inner_split_indices(train, keys, 0.3, seed=4)
    expect = inner_split(train, [keys[i] for i in train], fraction=0.3, seed=4)
    assert tr.tolist() == expect[0].tolist() and val.tolist() == expect[1].tolist()
    tr, val = inner_split_indices(train, keys, 0.0, seed=4)  # what a site's fit gets: it validates elsewhere
    assert tr.tolist() == train.tolist() and val.size == 0  # the given order: the training shuffle depends on it
