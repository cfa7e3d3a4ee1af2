"""Union-find with structure links, and folding permutations into constants."""

from __future__ import annotations

import numpy as np
import pytest

from stip.passes import permute
from stip.passes.permute import Permutations, fold, inverse
from stip.passes.spaces import SpaceConflict, Spaces


def test_union_merges_links_componentwise():
    s = Spaces()
    a, b = s.id(("a", 0), 32), s.id(("b", 0), 32)
    h1, i1, h2, i2 = (s.id((n, 0), sz) for n, sz in (("h1", 4), ("i1", 8), ("h2", 4), ("i2", 8)))
    s.link(a, [h1, i1])
    s.link(b, [h2, i2])
    s.union(a, b)
    assert s.find(h1) == s.find(h2) and s.find(i1) == s.find(i2)


def test_size_mismatch_is_a_conflict():
    s = Spaces()
    with pytest.raises(SpaceConflict, match="size 4 and 8"):
        s.union(s.id(("a", 0), 4), s.id(("b", 0), 8))


def test_fix_keeps_first_reason():
    s = Spaces()
    a = s.id(("a", 0), 4)
    s.fix(a, "first")
    s.fix(a, "second")
    assert s.info(a).fixed == "first"


class _FakeSolution:
    """Just enough of Solution for fold(): one head space (3) and a per-head inner space (4) under a whole (12)."""

    def __init__(self):
        self.spaces = Spaces()
        self.head = self.spaces.id(("h", 0), 3)
        self.inner = self.spaces.id(("i", 0), 4)
        self.whole = self.spaces.id(("w", 0), 12)
        self.spaces.link(self.whole, [self.head, self.inner])
        self.permuted = {self.head: "heads", self.inner: "inner", self.whole: "qk"}
        self.sizes = {self.head: 3, self.inner: 4, self.whole: 12}
        self.dependent = {self.inner: self.head}

    def link(self, c):
        return self.spaces.link_of(c)


def test_whole_permutation_composes_heads_and_per_head_inner():
    sol = _FakeSolution()
    rng = np.random.default_rng(0)
    hp = rng.permutation(3)
    ip = np.stack([rng.permutation(4) for _ in range(3)])
    perms = Permutations(sol, {sol.head: hp, sol.inner: ip})
    p = perms.vector(sol.whole)
    assert sorted(p) == list(range(12))
    for h in range(3):
        for i in range(4):
            assert p[h * 4 + i] == hp[h] * 4 + ip[h][i]
    # a [12, 5] weight permuted on its rows equals the same weight viewed [3, 4, 5] permuted by head/inner axes
    w = rng.standard_normal((12, 5))
    flat = fold(w, [sol.whole, None], perms)
    split = fold(w.reshape(3, 4, 5), [sol.head, sol.inner, None], perms).reshape(12, 5)
    np.testing.assert_array_equal(flat, split)
    # and with the head axis after the inner axis
    wt = w.reshape(3, 4, 5).transpose(1, 0, 2)
    np.testing.assert_array_equal(fold(wt, [sol.inner, sol.head, None], perms).transpose(1, 0, 2).reshape(12, 5),
                                  flat)


@pytest.mark.parametrize("shape", [(5,), (3, 4), (4, 1), (2, 3, 5), (70, 3, 2), (0, 4)])
def test_one_pass_gather_equals_one_take_per_axis(shape, monkeypatch):
    """The blocked single-pass gather gives what one np.take per axis gives, whatever the block boundaries."""
    monkeypatch.setattr(permute, "CHUNK_BYTES", 8)  # several blocks even on these small shapes
    rng = np.random.default_rng(len(shape))
    x = rng.integers(0, 60000, shape).astype(np.uint16)
    for axes in ([0], [len(shape) - 1], list(range(len(shape))), [a for a in range(1, len(shape))]):
        steps = [(a, rng.permutation(shape[a])) for a in axes if shape[a] > 1]
        expected = x
        for a, p in steps:
            expected = np.take(expected, p, axis=a)
        np.testing.assert_array_equal(permute._gather(x, steps), expected)


@pytest.mark.parametrize("shape", [(5,), (3, 4), (4, 1), (2, 3, 5), (70, 3, 2), (0, 4), ()])
@pytest.mark.parametrize("dtype", ["<f4", "<f2", ">f4", "i1", "u2", "bf16"])
def test_fold_into_writes_fold_bytes_block_by_block(shape, dtype, monkeypatch):
    """The streaming fold (blocks handed to a writer at byte offsets) produces exactly fold()'s little-endian
    bytes for every dtype and byte order, whatever the block boundaries, and writes every byte once."""
    from types import SimpleNamespace

    import ml_dtypes

    monkeypatch.setattr(permute, "CHUNK_BYTES", 8)
    rng = np.random.default_rng(len(shape))
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else np.dtype(dtype)
    x = rng.integers(-100, 100, shape).astype(dt) if dt.kind in "iu" else rng.standard_normal(shape).astype(dt)
    vectors = {a: rng.permutation(n) for a, n in enumerate(shape)}

    class P(SimpleNamespace):
        def vector(self, c):
            return self.vectors[c]

    perms = P(solution=SimpleNamespace(dependent={}, permuted={}), vectors=vectors, drawn={})
    for classes in (None, [None] * len(shape), list(range(len(shape))), [None] + list(range(1, len(shape)))):
        want = (x if classes is None else permute.fold(x, classes, perms)).astype(dt.newbyteorder("<"))
        buf = bytearray(want.nbytes)
        hits = np.zeros(want.nbytes, dtype=np.int64)

        def write(block, at, buf=buf, hits=hits):
            b = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
            buf[at:at + b.nbytes] = b.tobytes()
            hits[at:at + b.nbytes] += 1

        permute.fold_into(x, classes, perms, write)
        assert bytes(buf) == want.tobytes() and (hits == 1).all()


def test_inverse():
    p = np.random.default_rng(1).permutation(50)
    x = np.arange(50) * 3.0
    np.testing.assert_array_equal(x[p][inverse(p)], x)


def test_concatenations_with_different_boundaries_refine():
    """Phi-3 slices [0:32) and [32:64) in one place, [32:48) and [48:64) in another: they meet on the common
    refinement, and the composed permutation keeps every block inside its range."""
    s = Spaces()
    whole = s.id(("w", 0), 64)
    a, b = s.fresh(32), s.fresh(32)
    s.link(whole, [a, b], "cat")
    c, d, e = s.fresh(32), s.fresh(16), s.fresh(16)
    s.link(whole, [c, d, e], "cat")
    assert s.find(a) == s.find(c)
    sub = s.link_of(b)
    assert sub is not None and s.kind_of(b) == "cat" and {s.find(x) for x in sub} == {s.find(d), s.find(e)}
