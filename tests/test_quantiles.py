"""common.quantiles.percentiles gives np.percentile's values bit for bit (the stacks' normalisation uses it)."""

from __future__ import annotations

import numpy as np
import pytest

from common.quantiles import percentiles


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf - inf, in numpy and here alike
@pytest.mark.parametrize("seed", range(40))
def test_percentiles_are_numpys_to_the_bit(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([2, 3, 7, 200, 1001, 102400]))
    kind = seed % 4
    if kind == 0:  # stored integers (the usual slice), many ties
        x = rng.integers(0, 4096, n).astype(np.float32)
    elif kind == 1:  # rescaled: fractions and negatives
        x = (rng.normal(size=n) * 300).astype(np.float32)
    elif kind == 2:  # few distinct values
        x = rng.integers(0, 3, n).astype(np.float32)
    else:  # infinities included
        x = rng.normal(size=n).astype(np.float32)
        x[rng.integers(0, n, max(1, n // 100))] = np.inf
        x[0] = -np.inf
    image = x.reshape(-1, 1) if n % 2 else x.reshape(2, -1)
    for low, high in ((0.5, 99.5), (0.0, 100.0), (1.0, 99.0), (50.0, 50.0), (33.3, 66.7)):
        want = np.percentile(image, [low, high])
        got = percentiles(image, low, high)
        assert np.array_equal(np.array(got), want, equal_nan=True), (low, high)
        assert [v.hex() for v in got] == [float(v).hex() for v in want] or np.isnan(want).any()


def test_other_input_is_numpys_own():
    x = np.array([[1.0, np.nan], [3.0, 4.0]], dtype=np.float32)
    assert np.isnan(percentiles(x, 0.5, 99.5)).all()
    y = np.arange(10.0)  # float64: np.percentile itself
    assert percentiles(y, 10, 90) == tuple(float(v) for v in np.percentile(y, [10, 90]))
    assert percentiles(np.float32([5.0]), 0.5, 99.5) == (5.0, 5.0)
