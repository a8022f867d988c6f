"""Exact quantiles in bounded memory (evaluator/quantiles.py): equal to np.quantile (method
``linear``, float64) bit for bit, on random data of many lengths, read in many blocks."""

from __future__ import annotations

import numpy as np
import pytest

from evaluator.quantiles import histogram, order_statistics, quantiles

QS = [0.0, 0.5, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 41, 61, 1000, 1001])
def test_quantiles_equal_numpy_bit_for_bit(n):
    """Brute force: np.quantile of the float64 copy, exactly (no tolerance), for every q."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    got = quantiles(x, QS, block=5)
    assert got == [float(np.quantile(x.astype(np.float64), q)) for q in QS]


def test_virtual_index_is_numpys_n_minus_1_times_q():
    """Regression: the index was n q + (1 - q) - 1, algebraically (n - 1) q but rounded differently:
    n = 41, q = 0.95 gave 37.99999999999999, so the result was interpolated from the 37th and 38th
    values instead of being the 38th, off np.quantile in the last bits."""
    x = np.arange(41, dtype=np.float32) * np.float32(0.1) + np.float32(0.7)
    for q in (0.95, 0.9, 0.999):
        assert quantiles(x, [q]) == [float(np.quantile(x.astype(np.float64), q))], q


def test_quantiles_are_numpys_in_bounded_blocks():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.exponential(0.1, 5000), -rng.exponential(1e-7, 50), np.zeros(30), [np.inf]])
    x = rng.permutation(x).astype(np.float32)
    qs = [0.0, 0.01, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0]
    got = quantiles(x, qs, block=777)  # many blocks
    np.testing.assert_allclose(got[:-1], np.quantile(x.astype(np.float64), qs[:-1]), rtol=1e-12, atol=0)
    assert got[-1] == np.inf
    s = np.sort(x)
    ranks = [0, 1, 17, 2500, 5079, 5080]
    assert order_statistics(x, ranks, block=1000) == [float(s[r]) for r in ranks]


def test_empty_column_gives_nan_and_histogram_counts_every_value():
    assert all(np.isnan(quantiles(np.zeros(0, np.float32), QS)))
    x = np.random.default_rng(3).exponential(1.0, 999).astype(np.float32)
    counts, edges = histogram(x, bins=10, block=100)
    want, _ = np.histogram(x, bins=edges)
    assert counts.tolist() == want.tolist() and counts.sum() == 999 and edges[-1] == float(x.max())
