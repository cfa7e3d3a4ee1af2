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
    link: tuple[int, ...] | None = None  # component classes, outer to inner, when the axis is a flattened product
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
        ia.link = la or lb
        if la and lb:
            if len(la) != len(lb):
                raise SpaceConflict(f"axis split as {len(la)} parts in one place and {len(lb)} in another")
            for x, y in zip(la, lb):
                self.union(x, y)
        return self.find(a)

    def link(self, whole: int, parts: list[int]) -> None:
        """Record that class `whole` is the row-major flattening of `parts` (e.g. heads x head_dim)."""
        w = self.find(whole)
        info = self._info[w]
        if info.link is None:
            info.link = tuple(parts)
        else:
            if len(info.link) != len(parts):
                raise SpaceConflict(
                    f"axis split as {len(info.link)} parts in one place and {len(parts)} in another"
                )
            for x, y in zip(info.link, parts):
                self.union(x, y)

    def fix(self, i: int, reason: str) -> None:
        info = self._info[self.find(i)]
        if info.fixed is None:
            info.fixed = reason

    def roots(self) -> list[int]:
        return [i for i in range(len(self._parent)) if self._parent[i] == i]

    def link_of(self, i: int) -> tuple[int, ...] | None:
        link = self._info[self.find(i)].link
        return None if link is None else tuple(self.find(x) for x in link)


def _merge_size(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, int) and isinstance(b, int) and a != b:
        raise SpaceConflict(f"axes of size {a} and {b} cannot share a permutation")
    return a if isinstance(a, int) else b
