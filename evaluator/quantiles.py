"""Exact order statistics, quantiles and a histogram of a float32 column of any length (an array
or a memory-mapped file, e.g. a comparison's per-token KL), in bounded memory: the column is read
block by block, never whole.

- :func:`order_statistics`: the r-th smallest values, exactly. Each float32 maps to an
  order-preserving uint32 key; one pass counts the keys' high 16 bits (65,536 bins) and locates
  each wanted rank's bin, a second pass counts the low 16 bits of the keys in those bins: the
  rank's exact value. Memory: one block and two 2^16-bin histograms per rank.
- :func:`quantiles`: ``np.quantile(values, qs)`` with numpy's default ``linear`` method, equal to
  numpy's float64 result bit for bit (the tests check against ``np.quantile`` on random data).
- :func:`histogram`: counts over ``[0, top]``, block by block (the report's KL plot).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np

from .spill import BLOCK

__all__ = ["histogram", "order_statistics", "quantiles"]


def _keys(v: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order (negatives' bits flipped, positives' sign bit set)."""
    b = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    return b ^ np.where(b >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))


def _value(key: int) -> float:
    b = key ^ 0x80000000 if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.array([b], np.uint32).view(np.float32)[0])


def _blocks(values: Any, block: int) -> Iterator[np.ndarray]:
    for lo in range(0, len(values), block):
        yield np.asarray(values[lo : lo + block])


def order_statistics(values: Any, ranks: Sequence[int], block: int = BLOCK) -> list[float]:
    """The ``ranks``-th smallest (0-based) of the float32 ``values`` (an array or memmap of any
    length), exactly, in memory of two 2^16-bin histograms per rank and one block: a pass counts
    the high 16 bits of each order-preserving key, then a pass counts the low 16 bits of the keys
    in each rank's high bin."""
    n = len(values)
    h = np.zeros(1 << 16, np.int64)
    for b in _blocks(values, block):
        h += np.bincount(_keys(b) >> 16, minlength=1 << 16)
    c = np.cumsum(h)
    hi = {r: int(np.searchsorted(c, r, side="right")) for r in ranks}
    if any(not 0 <= r < n for r in ranks):
        raise ValueError(f"ranks {list(ranks)} outside [0, {n})")
    lows = {b: np.zeros(1 << 16, np.int64) for b in set(hi.values())}
    for blk in _blocks(values, block):
        k = _keys(blk)
        top = k >> 16
        for b, h2 in lows.items():
            h2 += np.bincount(k[top == b] & 0xFFFF, minlength=1 << 16)
    out = []
    for r in ranks:
        b = hi[r]
        below = int(c[b - 1]) if b else 0
        lo = int(np.searchsorted(np.cumsum(lows[b]), r - below, side="right"))
        out.append(_value((b << 16) | lo))
    return out


def quantiles(values: Any, qs: Sequence[float], block: int = BLOCK) -> list[float]:
    """``np.quantile(values, qs)`` (method ``linear``, computed in float64 from the float32 order
    statistics) of a float32 array or memmap of any length, in bounded memory (:func:`order_statistics`).
    An empty column gives NaN for every q."""
    n = len(values)
    if n == 0:
        return [math.nan] * len(qs)
    pos = []
    for q in qs:
        # numpy's linear method: the virtual index h = (n - 1) q, the value between the order
        # statistics floor(h) and floor(h) + 1 at fraction h - floor(h). Written exactly as numpy
        # writes it: the algebraically equal n q + (1 - q) - 1 rounds differently (n = 41, q = 0.95
        # gives 37.99999999999999 instead of 38) and then no longer equals np.quantile bit for bit.
        h = (n - 1) * q
        k = min(max(int(math.floor(h)), 0), n - 1)
        pos.append((k, min(k + 1, n - 1), h - math.floor(h)))
    ranks = sorted({r for k, k1, _ in pos for r in (k, k1)})
    stat = dict(zip(ranks, order_statistics(values, ranks, block)))
    out = []
    for k, k1, g in pos:
        a, b = stat[k], stat[k1]
        if g == 0 or k == k1:  # an order statistic itself (also an infinite one: no inf - inf)
            out.append(a)
            continue
        d = b - a
        out.append(b - d * (1 - g) if g >= 0.5 else a + d * g)  # numpy's _lerp
    return out


def histogram(values: Any, bins: int = 100, top: float | None = None, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of non-negative ``values`` over ``[0, top]`` (default: their maximum), block
    by block; values outside are counted in the first or last bin."""
    if top is None:
        top = max((float(np.max(b)) for b in _blocks(values, block)), default=0.0)
    edges = np.linspace(0.0, max(top, 1e-12), bins + 1)
    counts = np.zeros(bins, np.int64)
    for b in _blocks(values, block):
        counts += np.histogram(np.clip(b, 0.0, edges[-1]), bins=edges)[0]
    return counts, edges
