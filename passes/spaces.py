"""Permutation spaces as types: a union-find over tensor axes, with structure links for split axes.

Why: every axis that must carry the same secret permutation ends up in one class. A Reshape that splits a feature
axis into (heads, head_dim) links the feature class to its component classes, so the feature permutation is built
from a head permutation and per-head inner permutations, which is exactly what multi-head attention allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Axis = tuple[str, int]  # (tensor key, axis index); constant uses get their own tensor key, see solve.use_key


@dataclass
class ClassInfo:
    """What the solver learned about one equivalence class of axes."""

    size: int | str | None = None
    fixed: str | None = None  # why this class must stay unpermuted (None: free to permute)
    link: tuple[int, ...] | None = None  # component classes of a structured axis (see kind)
    kind: str = "prod"  # "prod": row-major flattening (heads x head_dim); "cat": concatenation (fused q|k|v)
    members: list[Axis] = field(default_factory=list)


class SpaceConflict(Exception):
    """Two axes were required to share a class in incompatible ways."""


class Spaces:
    """Union-find over axes. `fix` pins a class to the identity permutation, with a reason kept for reports."""

    def __init__(self) -> None:
        self._ids: dict[Axis, int] = {}
        self._parent: list[int] = []
        self._info: list[ClassInfo] = []

    def id(self, axis: Axis, size: int | str | None = None) -> int:
        i = self._ids.get(axis)
        if i is None:
            i = len(self._parent)
            self._ids[axis] = i
            self._parent.append(i)
            self._info.append(ClassInfo(size=size, members=[axis]))
        return self.find(i)

    def fresh(self, size: int | str | None) -> int:
        i = len(self._parent)
        self._parent.append(i)
        self._info.append(ClassInfo(size=size))
        return i

    def find(self, i: int) -> int:
        root = i
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[i] != root:
            self._parent[i], i = root, self._parent[i]
        return root

    def info(self, i: int) -> ClassInfo:
        return self._info[self.find(i)]

    def axes(self) -> list[Axis]:
        return list(self._ids)

    def has(self, axis: Axis) -> bool:
        return axis in self._ids

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ia, ib = self._info[a], self._info[b]
        size = _merge_size(ia.size, ib.size)
        self._parent[b] = a
        ia.size = size
        ia.fixed = ia.fixed or ib.fixed
        ia.members.extend(ib.members)
        ib.members = []
        la, lb = ia.link, ib.link
        if la and lb:
            self._unify_links(ia.kind, la, ib.kind, lb)
        elif lb:
            ia.link, ia.kind = lb, ib.kind
        return self.find(a)

    def _unify_links(self, ka: str, la: tuple[int, ...], kb: str, lb: tuple[int, ...]) -> None:
        if ka == kb == "cat" and la != lb:
            self._unify_cat(la, lb)
            return
        if ka == kb == "prod" and la != lb and not self._same_sizes(la, lb):
            self._unify_prod(la, lb)
            return
        if ka != kb or len(la) != len(lb):
            raise SpaceConflict(f"axis structured as {_describe(self, ka, la)} in one place and "
                                f"{_describe(self, kb, lb)} in another")
        for x, y in zip(la, lb):
            self.union(x, y)

    def _unify_cat(self, la: tuple[int, ...], lb: tuple[int, ...]) -> None:
        """Two concatenations of one axis with different block boundaries (Phi-3 slices q | k | v out of one
        projection: [0:32) and [32:64) in one place, [32:48) and [48:64) in another) meet on their common
        refinement: a block spanning several finer blocks becomes a concatenation of them."""
        sa = [self.info(x).size for x in la]
        sb = [self.info(x).size for x in lb]
        if not all(isinstance(v, int) for v in sa + sb) or sum(sa) != sum(sb):
            if len(la) == len(lb):
                for x, y in zip(la, lb):
                    self.union(x, y)
                return
            raise SpaceConflict(f"axis structured as {_describe(self, 'cat', la)} in one place and "
                                f"{_describe(self, 'cat', lb)} in another")
        cuts = sorted({0, *_cumsum(sa), *_cumsum(sb)})
        segs_a = self._refine(la, sa, cuts)
        segs_b = self._refine(lb, sb, cuts)
        for x, y in zip(segs_a, segs_b):
            self.union(x, y)

    def _same_sizes(self, la: tuple[int, ...], lb: tuple[int, ...]) -> bool:
        return [self.info(x).size for x in la] == [self.info(x).size for x in lb]

    def _unify_prod(self, la: tuple[int, ...], lb: tuple[int, ...]) -> None:
        """Two row-major factorings of one axis (heads x head_dim = 4 x 8 in attention, blocks x block = 2 x 16
        in a block-quantized weight) meet on their common refinement (2 x 2 x 8) when every stride of one
        divides or is divided by every stride of the other; otherwise no permutation keeps both structures."""
        sa = [self.info(x).size for x in la]
        sb = [self.info(x).size for x in lb]
        strides = sorted({*_strides(sa), *_strides(sb)}) if all(isinstance(v, int) and v > 0 for v in sa + sb) \
            else []
        if not strides or _product(sa) != _product(sb) or any(b % a for a, b in zip(strides, strides[1:])):
            raise SpaceConflict(f"axis structured as {_describe(self, 'prod', la)} in one place and "
                                f"{_describe(self, 'prod', lb)} in another")
        for x, y in zip(self._refine_prod(la, sa, strides), self._refine_prod(lb, sb, strides)):
            self.union(x, y)

    def _refine_prod(self, parts: tuple[int, ...], sizes: list[int], strides: list[int]) -> list[int]:
        out: list[int] = []
        hi = _product(sizes)
        for part, size in zip(parts, sizes):
            lo = hi // size
            cuts = [t for t in reversed(strides) if lo <= t <= hi]  # outer to inner
            if size == 1:  # a broadcast factor: never permuted, and absent from the other factoring's strides
                pass
            elif len(cuts) == 2:
                out.append(part)
            else:
                pieces = [self.fresh(a // b) for a, b in zip(cuts, cuts[1:])]
                self.link(part, pieces, "prod")
                out.extend(pieces)
            hi = lo
        return out

    def _refine(self, parts: tuple[int, ...], sizes: list[int], cuts: list[int]) -> list[int]:
        out: list[int] = []
        start = 0
        for part, size in zip(parts, sizes):
            inner = [c for c in cuts if start < c < start + size]
            if not inner:
                out.append(part)
            else:
                bounds = [start, *inner, start + size]
                pieces = [self.fresh(hi - lo) for lo, hi in zip(bounds, bounds[1:])]
                self.link(part, pieces, "cat")
                out.extend(pieces)
            start += size
        return out

    def link(self, whole: int, parts: list[int], kind: str = "prod") -> None:
        """Record that class `whole` is built from `parts`: their row-major flattening (kind "prod", e.g.
        heads x head_dim) or their concatenation (kind "cat", e.g. fused q|k|v, or rotary halves)."""
        w = self.find(whole)
        info = self._info[w]
        if info.link is None:
            info.link, info.kind = tuple(parts), kind
        else:
            self._unify_links(info.kind, info.link, kind, tuple(parts))

    def fix(self, i: int, reason: str) -> None:
        info = self._info[self.find(i)]
        if info.fixed is None:
            info.fixed = reason

    def roots(self) -> list[int]:
        return [i for i in range(len(self._parent)) if self._parent[i] == i]

    def kind_of(self, i: int) -> str:
        return self._info[self.find(i)].kind

    def link_of(self, i: int) -> tuple[int, ...] | None:
        link = self._info[self.find(i)].link
        return None if link is None else tuple(self.find(x) for x in link)


def _cumsum(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for v in sizes:
        total += v
        out.append(total)
    return out


def _strides(sizes: list[int]) -> list[int]:
    """Row-major strides of a factoring, with the total: 4 x 8 -> 1, 8, 32."""
    out, total = [1], 1
    for v in reversed(sizes):
        total *= v
        out.append(total)
    return out


def _product(sizes: list) -> int:
    total = 1
    for v in sizes:
        total *= v
    return total


def _describe(sp: Spaces, kind: str, parts: tuple[int, ...]) -> str:
    sizes = [str(sp.info(x).size) for x in parts]
    return (" x " if kind == "prod" else " | ").join(sizes)


def _merge_size(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, int) and isinstance(b, int) and a != b:
        raise SpaceConflict(f"axes of size {a} and {b} cannot share a permutation")
    return a if isinstance(a, int) else b
