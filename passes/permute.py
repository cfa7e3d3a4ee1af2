"""Draw secret permutations for solved spaces and fold them into constants.

Why here: this is the only place where a space becomes concrete index arrays. A flattened space (heads x head_dim)
is never drawn directly; its permutation is built from its parts, so Q/K/V and the output projection agree.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from stip.passes.errors import StipError
from stip.passes.solve import Solution


@dataclass
class Permutations:
    """Index arrays per space: 1-D `p` (x' = x[..., p]), or [heads, head_dim] for per-head inner spaces."""

    solution: Solution
    drawn: dict[int, np.ndarray]
    _composed: dict[int, np.ndarray] = field(default_factory=dict)

    def vector(self, c: int) -> np.ndarray:
        """The flat permutation of a space, composing linked parts (hidden = heads x head_dim, row-major)."""
        if c in self._composed:
            return self._composed[c]
        sol = self.solution
        link = sol.link(c)
        if link and sol.spaces.kind_of(c) == "cat":
            blocks, offset = [], 0
            for x in link:
                size = sol.spaces.info(x).size
                blocks.append((self.vector(x) if x in sol.permuted else np.arange(size)) + offset)
                offset += size
            p = np.concatenate(blocks).astype(np.int64)
        elif link:
            sizes = [sol.spaces.info(x).size for x in link]
            grid = np.arange(int(np.prod(sizes)), dtype=np.int64).reshape(sizes)
            parts = [x if x in sol.permuted else None for x in link]
            p = fold(grid, parts, self).reshape(-1)
        elif c in sol.dependent:
            raise StipError(f"space '{sol.permuted[c]}' has one permutation per head and cannot be used without "
                            "its head axis")
        else:
            p = self.drawn[c]
        self._composed[c] = p
        return p

    def by_name(self) -> dict[str, np.ndarray]:
        return {self.solution.permuted[c]: self.drawn[c] if c in self.drawn else self.vector(c)
                for c in self.solution.permuted}


def draw(sol: Solution, permutation: Callable[[int], np.ndarray]) -> Permutations:
    """One independent permutation per free space (per head for dependent inner spaces), each a fresh call of
    `permutation(n)`: stip.compiler.keys.random_permutation (the OS CSPRNG) in a compile, a seeded generator's
    `.permutation` in tests that need reproducible keys."""
    drawn: dict[int, np.ndarray] = {}
    for c in sorted(sol.permuted):
        if sol.link(c):
            continue
        n = sol.sizes[c]
        h = sol.dependent.get(c)
        if h is not None:
            drawn[c] = np.stack([_checked(permutation(n), n) for _ in range(sol.sizes[h])])
        else:
            drawn[c] = _checked(permutation(n), n)
    return Permutations(sol, drawn)


def _checked(p, n: int) -> np.ndarray:
    """A wrong key must never be folded in silently: the source must return a permutation of range(n)."""
    p = np.asarray(p, dtype=np.int64)
    if p.shape != (n,) or not np.array_equal(np.sort(p), np.arange(n)):
        raise StipError(f"the permutation source returned {p.shape} values that are not a permutation of {n}")
    return p


def _plan(value: np.ndarray, classes: list[int | None], perms: Permutations):
    """(flat steps [(axis, index)], per-head steps [(axis, space)]) for one constant."""
    sol = perms.solution
    steps: list[tuple[int, np.ndarray]] = []
    later: list[tuple[int, int]] = []
    for a, c in enumerate(classes):
        if c is None or value.shape[a] == 1:
            continue
        if c in sol.dependent:
            later.append((a, c))
            continue
        steps.append((a, perms.vector(c)))
    return steps, later


def fold(value: np.ndarray, classes: list[int | None], perms: Permutations) -> np.ndarray:
    """Permute every axis of a constant by its space; per-head inner spaces index jointly with their head axis.

    All flat axes are gathered in one pass (see _gather), so a weight is read once and written once; numpy
    releases the GIL there, so callers may fold two tensors on two threads once the vectors are composed."""
    sol = perms.solution
    raw = _raw_words(value)
    steps, later = _plan(value, classes, perms)
    out = _gather(raw, steps) if steps else raw
    for a, c in later:
        head = sol.dependent[c]
        if head not in classes:
            raise StipError(f"constant axis {a} is in per-head space '{sol.permuted[c]}' without its head axis")
        ha = classes.index(head)
        idx = perms.drawn[c]  # [heads, head_dim], row = new head position
        shape = [1] * out.ndim
        shape[ha], shape[a] = idx.shape[0], idx.shape[1]
        if ha > a:
            idx = idx.T
            shape[ha], shape[a] = idx.shape[1], idx.shape[0]
        out = np.take_along_axis(out, idx.reshape(shape), axis=a)
    out = np.ascontiguousarray(out)
    return out.view(value.dtype) if raw is not value else out


Write = Callable[[np.ndarray, int], None]  # (contiguous block, byte offset within the tensor)


def fold_into(value: np.ndarray, classes: list[int | None] | None, perms: Permutations, write: Write) -> None:
    """fold(), handing the result to `write` block by block as little-endian bytes, never as a whole tensor.

    Why: streaming each cache-sized block straight to the output file (os.pwrite, which releases the GIL) skips
    the tensor-sized output buffer and its second pass through memory, and lets fold threads write in parallel.
    Per-head steps (rare: constants with explicit head and inner axes) and big-endian hosts take fold()."""
    raw = _raw_words(value)
    steps, later = _plan(value, classes, perms) if classes is not None else ([], [])
    plain = raw.dtype.kind in "iuf" and value.dtype.byteorder != ">" and sys.byteorder == "little"
    if later or not plain:
        out = fold(value, classes, perms) if classes is not None else np.ascontiguousarray(value)
        write(np.ascontiguousarray(out.astype(out.dtype.newbyteorder("<"), copy=False)).reshape(-1), 0)
        return
    if raw.size == 0:
        return
    if raw.ndim == 0:
        write(np.ascontiguousarray(raw).reshape(-1), 0)
        return
    idx = dict(steps)
    first = idx.pop(0, None)
    rest = sorted(idx.items())
    row_bytes = raw[0].nbytes if raw.ndim > 1 else raw.itemsize
    rows = max(1, CHUNK_BYTES // max(1, row_bytes))
    buf = np.empty((min(rows, raw.shape[0]),) + raw.shape[1:], dtype=raw.dtype) if steps else None
    for s in range(0, raw.shape[0], rows):
        e = min(s + rows, raw.shape[0])
        if not steps:
            blk = np.ascontiguousarray(raw[s:e])
        elif not rest:
            blk = np.take(raw, first[s:e], axis=0, out=buf[: e - s], mode="clip")
        else:
            blk = raw[s:e] if first is None else np.take(raw, first[s:e], axis=0, mode="clip")
            for k, (a, p) in enumerate(rest):
                blk = np.take(blk, p, axis=a, mode="clip", out=buf[: e - s] if k == len(rest) - 1 else None)
        write(blk, s * row_bytes)


CHUNK_BYTES = 1 << 19  # a block this size stays in cache between the outer gather and the inner ones


def _gather(src: np.ndarray, steps: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """out[i, j, ...] = src[p0[i], p1[j], ...] in one pass: blocks of output rows are gathered on axis 0 (or
    sliced) into a cache-sized block, whose other axes are gathered straight into the output. Each index is a
    checked permutation, so mode="clip" (which lets numpy write into `out` unbuffered) never clips."""
    out = np.empty(src.shape, dtype=src.dtype)
    if out.size == 0 or not steps:
        out[...] = src
        return out
    idx = dict(steps)
    first = idx.pop(0, None)
    rest = sorted(idx.items())
    rows = max(1, CHUNK_BYTES // max(1, src[0].nbytes if src.ndim > 1 else src.itemsize))
    for s in range(0, src.shape[0], rows):
        e = min(s + rows, src.shape[0])
        if not rest:
            np.take(src, first[s:e], axis=0, out=out[s:e], mode="clip")
            continue
        blk = src[s:e] if first is None else np.take(src, first[s:e], axis=0, mode="clip")
        for k, (a, p) in enumerate(rest):
            blk = np.take(blk, p, axis=a, mode="clip", out=out[s:e] if k == len(rest) - 1 else None)
    return out


def _raw_words(value: np.ndarray) -> np.ndarray:
    """The tensor as unsigned words of its element size: permuting is pure data movement, so every dtype
    (fp32, fp16, bf16 from ml_dtypes, int8) comes out bit-exact, NaN payloads and negative zeros included."""
    size = value.dtype.itemsize
    if value.dtype.kind in "OUSb" or size not in (1, 2, 4, 8) or value.dtype.kind == "u":
        return value
    return np.asarray(value).view(np.dtype(f"u{size}"))


def inverse(p: np.ndarray) -> np.ndarray:
    inv = np.empty_like(p)
    inv[p] = np.arange(len(p), dtype=p.dtype)
    return inv
