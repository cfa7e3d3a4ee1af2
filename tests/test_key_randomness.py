"""Keys come from the OS CSPRNG: every permutation uniform over all n! orders, each drawn independently, and no
numpy generator anywhere on the key path.

The chi-square tests use a p-value threshold of 1e-6: a correct generator fails one run in a million (never
flaky in CI), while the classic biased shuffle (swap with any position) is rejected at p < 1e-30 with the same
number of draws, which test_chi_square_rejects_a_biased_shuffle shows, so the test can fail.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections import Counter

import numpy as np
import pytest

import stip.compiler.pipeline as pipeline
from stip.compiler.keys import random_permutation, read_key
from stip.passes.graph import load_graph
from stip.passes.permute import draw
from stip.passes.solve import solve

P_MIN = 1e-6


def chi_square_p(counts: Counter, outcomes: list, draws: int) -> float:
    """P(X >= stat) for X ~ chi-square(len(outcomes) - 1), equal expected counts (no scipy here)."""
    expected = draws / len(outcomes)
    stat = sum((counts.get(o, 0) - expected) ** 2 / expected for o in outcomes)
    return _upper_gamma_q((len(outcomes) - 1) / 2, stat / 2)


def _upper_gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x): series for x < a + 1, continued fraction beyond (Lentz)."""
    if x <= 0:
        return 1.0
    log_pre = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        while abs(term) > 1e-15 * abs(total):
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - math.exp(log_pre) * total)
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        delta = c * d
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(log_pre) * h


def test_p_value_helper_matches_known_quantiles():
    # chi-square(23): 95th percentile 35.172, 99.9th 49.728; chi-square(1) at 3.841 -> 0.05
    assert abs(_upper_gamma_q(23 / 2, 35.172 / 2) - 0.05) < 1e-4
    assert abs(_upper_gamma_q(23 / 2, 49.728 / 2) - 0.001) < 1e-5
    assert abs(_upper_gamma_q(0.5, 3.841 / 2) - 0.05) < 1e-4


def test_draw_is_uniform_over_all_24_orders():
    n, draws = 4, 24_000
    outcomes = list(itertools.permutations(range(n)))
    counts = Counter(tuple(random_permutation(n).tolist()) for _ in range(draws))
    assert set(counts) == set(outcomes)
    assert chi_square_p(counts, outcomes, draws) > P_MIN


def test_chi_square_rejects_a_biased_shuffle():
    def naive(n):  # swaps with any position: 4^4 = 256 equally likely paths onto 24 orders, so not uniform
        p = list(range(n))
        for i in range(n):
            j = secrets.randbelow(n)
            p[i], p[j] = p[j], p[i]
        return tuple(p)

    outcomes = list(itertools.permutations(range(4)))
    counts = Counter(naive(4) for _ in range(24_000))
    assert chi_square_p(counts, outcomes, 24_000) < 1e-30


def test_consecutive_draws_are_independent():
    n, draws = 3, 36_000
    orders = list(itertools.permutations(range(n)))
    outcomes = list(itertools.product(orders, orders))  # 36 joint outcomes of two consecutive draws
    counts = Counter((tuple(random_permutation(n).tolist()), tuple(random_permutation(n).tolist()))
                     for _ in range(draws))
    assert chi_square_p(counts, outcomes, draws) > P_MIN


def test_vocabulary_sized_draw_is_a_permutation():
    p = random_permutation(150_000)
    assert p.dtype == np.int64 and np.array_equal(np.sort(p), np.arange(150_000))
    assert not np.array_equal(p, random_permutation(150_000))


def test_spaces_of_one_compile_are_drawn_independently(zoo):
    sol = solve(load_graph(zoo.get("bert")))
    perms = draw(sol, random_permutation)
    by_size: dict[int, list[np.ndarray]] = {}
    for arr in perms.drawn.values():
        for row in arr.reshape(-1, arr.shape[-1]):  # per-head spaces: one row per head
            by_size.setdefault(len(row), []).append(row)
    pairs = [(a, b) for rows in by_size.values() if len(rows[0]) >= 8 for a, b in itertools.combinations(rows, 2)]
    assert len(pairs) >= 10, "the model has several spaces (or heads) of one size"
    assert all(not np.array_equal(a, b) for a, b in pairs)


def test_a_source_that_returns_no_permutation_is_refused(zoo):
    from stip.passes.errors import StipError

    sol = solve(load_graph(zoo.get("bert")))
    with pytest.raises(StipError, match="not a permutation"):
        draw(sol, lambda n: np.zeros(n, dtype=np.int64))


def test_no_numpy_generator_on_the_key_path(zoo, tmp_path, monkeypatch):
    """numpy.random raises while the key is drawn and written; the compile still succeeds, and its key is the
    one drawn under the patch."""
    def refuse(*_a, **_k):
        raise AssertionError("numpy.random used on the key path")

    names = ["default_rng", "Generator", "RandomState", "PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64",
             "SeedSequence", "permutation", "shuffle", "randint", "random", "seed"]
    seen = {}

    def guarded(fn, label):
        def run(*a, **k):
            with monkeypatch.context() as m:
                for name in names:
                    m.setattr(np.random, name, refuse)
                out = fn(*a, **k)
            seen[label] = out if label == "draw" else a
            return out
        return run

    monkeypatch.setattr(pipeline, "draw", guarded(pipeline.draw, "draw"))
    monkeypatch.setattr(pipeline, "write_key", guarded(pipeline.write_key, "write_key"))
    pipeline.compile_model(zoo.get("bert"), tmp_path / "o")
    assert set(seen) == {"draw", "write_key"}
    _, perms = read_key(tmp_path / "o" / "developer" / "key.npz")
    assert np.array_equal(perms["hidden"], seen["draw"].by_name()["hidden"])


def test_permutation_is_the_order_of_os_urandom_keys_and_ties_are_redrawn(monkeypatch):
    """The source is os.urandom alone: the permutation sorts the keys it returned, and a draw with a repeated key
    is thrown away whole (keeping the distribution uniform) rather than broken by position."""
    import stip.compiler.keys as keys

    first = np.array([7, 3, 7, 1], dtype=np.uint64).tobytes()  # key 7 repeats: redrawn
    second = np.array([9, 2, 5, 4], dtype=np.uint64).tobytes()
    reads = [first, second]
    monkeypatch.setattr(keys.os, "urandom", lambda n: reads.pop(0))
    assert keys.random_permutation(4).tolist() == [1, 3, 2, 0] and not reads
