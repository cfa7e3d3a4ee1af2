"""Permutation-invariant features and assignment, in numpy (no scipy): what every matching attack shares."""

from __future__ import annotations

import math

import numpy as np

BINS = 64


def sorted_slices(w: np.ndarray, axis: int, bins: int = BINS) -> np.ndarray:
    """[n, bins]: the sorted values of each slice along `axis`, averaged into equal bins. Sorting makes the
    feature blind to every other permutation of the weight; binning keeps its shape and averages out noise."""
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float32)
    s = np.sort(rows, axis=1)
    m = s.shape[1]
    if m <= bins:
        return s
    edges = (np.arange(bins) * m) // bins
    counts = np.diff(np.append(edges, m)).astype(np.float32)
    return np.add.reduceat(s, edges, axis=1) / counts


def sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aa = (a * a).sum(1)[:, None]
    bb = (b * b).sum(1)[None, :]
    return np.maximum(aa + bb - 2.0 * (a @ b.T), 0.0)


def assign(cost: np.ndarray) -> np.ndarray:
    """A bijection rows -> columns, greedy by mutual nearest neighbours (round by round, vectorised)."""
    n = cost.shape[0]
    out = np.full(n, -1, dtype=np.int64)
    rows, cols = np.arange(n), np.arange(cost.shape[1])
    for _ in range(50):
        if rows.size == 0 or cols.size == 0:
            break
        c = cost[np.ix_(rows, cols)]
        best_col = c.argmin(1)
        best_row = c.argmin(0)
        mutual = best_row[best_col] == np.arange(rows.size)
        out[rows[mutual]] = cols[best_col[mutual]]
        keep_c = np.ones(cols.size, bool)
        keep_c[best_col[mutual]] = False
        rows, cols = rows[~mutual], cols[keep_c]
    for r in rows:  # whatever the rounds left: nearest free column
        if cols.size == 0:
            break
        j = int(cost[r, cols].argmin())
        out[r] = cols[j]
        cols = np.delete(cols, j)
    return out


def nearest(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Nearest row of b for each row of a (squared L2), in chunks: for spaces too large for a full cost matrix."""
    return np.concatenate([sq_dist(a[i:i + chunk], b).argmin(1) for i in range(0, len(a), chunk)])


def poisson_tail(k: int, mean: float) -> float:
    """P(X >= k) for X ~ Poisson(mean): how likely `k` hits are by chance (fixed points of random guesses)."""
    if k <= 0:
        return 1.0
    if mean <= 0:
        return 0.0
    term = math.exp(-mean)
    below = 0.0
    for i in range(min(k, 100000)):
        below += term
        term *= mean / (i + 1)
    return max(0.0, 1.0 - below)


def verdict(hits: int, total: int, expected: float) -> str:
    """'recovered' (most of it, far beyond chance), 'leaks' (beyond chance), 'chance', or 'not significant'
    (too few indices to tell, e.g. 2 heads)."""
    if total == 0:
        return "n/a"
    p = poisson_tail(hits, expected)
    if p < 1e-4 and hits / total >= 0.5:
        return "recovered"
    if p < 1e-4 and hits / total > 2 * expected / total:
        return "leaks"
    return "chance" if hits <= 2 * expected else "not significant"
