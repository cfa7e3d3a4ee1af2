"""Solve the permutation spaces of a whole graph at once.

Why: instead of pattern-matching "BERT attention" per exporter, every op contributes its rule (rules.py) and
union-find does the rest. What is left free after all rules are applied is exactly what can be permuted; a
feature space that some op pins to the identity is an unsupported model, and the message names that op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stip.passes.axes import sinusoid_position_table
from stip.passes.errors import StipError
from stip.passes.graph import Graph
from stip.passes.packed import Packing
from stip.passes.rules import contract, op_key
from stip.passes.spaces import SpaceConflict, Spaces
from stip.passes.values import symbolic_values


def use_key(name: str, node_idx: int, input_idx: int) -> str:
    """Each use of a constant gets its own axes, so two consumers may need two differently permuted copies."""
    return f"{name}@{node_idx}:{input_idx}"


@dataclass
class Blocker:
    node: str
    op: str
    reason: str
    refused: bool = False  # a rule refused the op (see RuleContext.refuse), rather than a conflict

    def __str__(self) -> str:
        return f"{self.op} node '{self.node}': {self.reason}"


_INT_TYPES = {2, 3, 4, 5, 6, 7, 9, 12, 13}  # TensorProto integer and bool types


class RuleContext:
    """What a rule sees of one node: shapes, constant values, attributes, and the axis classes to relate."""

    def __init__(self, solver: Solver, idx: int):
        self.s = solver
        self.idx = idx
        self.node = solver.g.model.graph.node[idx]

    def in_key(self, j: int) -> str:
        name = self.node.input[j]
        return use_key(name, self.idx, j) if name in self.s.g.constants else name

    def shape_in(self, j: int) -> list:
        view = self.s.views.get(self.in_key(j))
        return list(view.shape) if view is not None else self.s.shape(self.node.input[j])

    def view(self, j: int, packing: Packing) -> None:
        """See constant input j through its logical layout (packed 4-bit values, flattened block tables): its
        axes are then the view's, and folding unpacks, permutes and repacks it (packed.py)."""
        if self.node.input[j] not in self.s.g.constants:
            self.refuse(f"input {j} ('{self.node.input[j]}') is packed but not a constant",
                        "store it as an initializer")
        self.s.views[self.in_key(j)] = packing

    def shape_out(self, k: int) -> list:
        return self.s.shape(self.node.output[k])

    def ax_in(self, j: int, a: int) -> int:
        return self.s.axis(self.in_key(j), a, self.shape_in(j)[a])

    def ax_out(self, k: int, a: int) -> int:
        return self.s.axis(self.node.output[k], a, self.shape_out(k)[a])

    def const(self, j: int) -> np.ndarray | None:
        """A constant input, or an integer input computed from static shapes (see values.py)."""
        if j >= len(self.node.input):
            return None
        name = self.node.input[j]
        value = self.s.g.constants.get(name)
        return value if value is not None else self.s.values.get(name)

    def sym(self, j: int) -> np.ndarray | None:
        """An integer input known up to symbolic dims: entries are ints, symbolic products or None (values.py)."""
        if j >= len(self.node.input) or not self.node.input[j]:
            return None
        return self.s.sym_values.get(self.node.input[j])

    def is_float(self, j: int) -> bool:
        from onnx import TensorProto

        return self.s.g.dtypes.get(self.node.input[j]) in (TensorProto.FLOAT, TensorProto.FLOAT16,
                                                           TensorProto.BFLOAT16, TensorProto.DOUBLE)

    def is_data(self, j: int) -> bool:
        """Floats, or 8- and 4-bit integers: quantized activations (QOperator's uint8 q|k|v, its KV cache), which
        move like floats; wider integers are shape vectors, indices and masks, which stay positional."""
        from onnx import TensorProto

        return self.is_float(j) or self.s.g.dtypes.get(self.node.input[j]) in (
            TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)

    def attr(self, name: str, default=None):
        from onnx import helper

        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def eq(self, a: int, b: int) -> None:
        self.s.spaces.union(a, b)

    def fix(self, a: int, why: str) -> None:
        self.s.spaces.fix(a, f"{why} at {self.s.g.node_label(self.idx)}")

    def link(self, whole: int, parts: list[int], kind: str = "prod") -> None:
        self.s.spaces.link(whole, parts, kind)

    def structure(self, whole: int | None, kind: str, parts: list[int]) -> int:
        """Give an axis a structure the op packs internally: `whole` (a fresh class when None, e.g. the q block
        inside a fused q|k|v weight) is the "prod" (row-major flattening) or "cat" (concatenation) of `parts`."""
        if whole is None:
            whole = self.fresh(_structured_size(self.s.spaces, kind, parts))
        self.s.spaces.link(whole, parts, kind)
        return whole

    def blocks(self, whole: int, n_blocks: int, block_size: int) -> tuple[int, int]:
        """Split `whole` into quantization blocks (n_blocks x block_size, row-major): a permutation of it must
        move whole blocks and permute within them, so every block keeps its values and its scale."""
        nb, inner = self.fresh(n_blocks), self.fresh(block_size)
        self.structure(whole, "prod", [nb, inner])
        self.s.blocks.append((whole, nb, inner))
        return nb, inner

    def fresh(self, size: int | str | None) -> int:
        """A new axis class that belongs to no tensor (a block or factor of a packed axis)."""
        return self.s.spaces.fresh(size)

    def pinned(self, size: int | str | None, why: str) -> int:
        """A fresh class that must stay unpermuted (the pair index of interleaved rotary pairs)."""
        c = self.fresh(size)
        self.fix(c, why)
        return c

    def refuse(self, why: str, instead: str) -> None:
        """This use of the op cannot be compiled exactly: stop with a blocker that names it and what to do
        (the solver then pins every axis of the node)."""
        raise Refused(f"{why}; {instead}")

    def has_input(self, j: int) -> bool:
        return j < len(self.node.input) and bool(self.node.input[j])

    def has_output(self, k: int) -> bool:
        return k < len(self.node.output) and bool(self.node.output[k])

    def fix_input(self, j: int, why: str) -> None:
        if j < len(self.node.input) and self.node.input[j]:
            for a in range(len(self.shape_in(j))):
                self.fix(self.ax_in(j, a), why)

    def fix_known(self, why: str) -> None:
        """Pin every axis of the node's tensors whose shapes are known."""
        for j, x in enumerate(self.node.input):
            if x and x in self.s.g.shapes:
                self.fix_input(j, why)
        for k, o in enumerate(self.node.output):
            if o and o in self.s.g.shapes:
                for a in range(len(self.shape_out(k))):
                    self.fix(self.ax_out(k, a), why)

    def fix_all(self, why: str) -> None:
        for j in range(len(self.node.input)):
            self.fix_input(j, why)
        for k, o in enumerate(self.node.output):
            if o:
                for a in range(len(self.shape_out(k))):
                    self.fix(self.ax_out(k, a), why)


@dataclass
class Solution:
    """Solved spaces: which class every axis is in, which classes are permuted, and their names."""

    graph: Graph
    spaces: Spaces
    permuted: dict[int, str]  # root class -> space name
    sizes: dict[int, int]
    dependent: dict[int, int]  # inner class -> head class whose position selects its per-head permutation
    blockers: list[Blocker] = field(default_factory=list)
    post_tail: frozenset[int] = frozenset()  # nodes after the last weight that run in plaintext in post
    views: dict[str, Packing] = field(default_factory=dict)  # constant use -> its logical layout (packed.py)
    blocks: frozenset[int] = frozenset()  # classes split as quantization blocks x values in a block (MatMulNBits)

    def classes(self, key: str, rank: int) -> list[int | None]:
        """Class of each axis of a tensor (or constant use), None where the axis is not permuted."""
        out: list[int | None] = []
        for a in range(rank):
            if not self.spaces.has((key, a)):
                out.append(None)
                continue
            c = self.spaces.find(self.spaces.id((key, a)))
            out.append(c if c in self.permuted else None)
        return out

    def name(self, c: int | None) -> str | None:
        return None if c is None else self.permuted[c]

    def link(self, c: int) -> tuple[int, ...] | None:
        return self.spaces.link_of(c)


class Solver:
    def __init__(self, g: Graph, skip: frozenset[int] = frozenset(), values: tuple | None = None):
        self.g = g
        self.spaces = Spaces()
        self.skip = skip  # nodes that run in post on plaintext: no rule, their outputs are never permuted
        self.views: dict[str, Packing] = {}
        self.blocks: list[tuple[int, int, int]] = []  # (whole, blocks, inner) of each blocks() split
        self._static: set[str] = set()  # integer tensors computed from constants only
        self.sym_values = symbolic_values(g) if values is None else values[0]
        self.values = {k: v.astype(np.int64) for k, v in self.sym_values.items()
                       if all(isinstance(x, int) for x in v.reshape(-1))} if values is None else values[1]

    def shape(self, name: str) -> list:
        s = self.g.shapes.get(name)
        if s is None:
            raise _NoShape(name)
        return s

    def axis(self, key: str, a: int, size) -> int:
        return self.spaces.id((key, a), size)

    def run(self) -> Solution:
        g = self.g
        blockers: list[Blocker] = []
        cache_inputs = g.state_inputs
        for name in g.input_names:
            for a, d in enumerate(g.shapes.get(name, [])):
                # A KV-cache input carries permuted heads and head dims; only its batch/length axes are pinned.
                if name not in cache_inputs or not isinstance(d, int):
                    self.spaces.fix(self.axis(name, a, d), f"graph input '{name}'")
        for idx in range(len(g.model.graph.node)):
            blocker = self.apply(idx)
            if blocker:
                blockers.append(blocker)
        for past, present in g.cache:  # the cache fed back must be in the basis the server wrote it in
            for a, (d1, d2) in enumerate(zip(g.shapes.get(past, []), g.shapes.get(present, []))):
                if isinstance(d1, int) and d1 == d2 and d1 > 1:
                    try:
                        self.spaces.union(self.axis(past, a, d1), self.axis(present, a, d2))
                    except SpaceConflict as e:
                        blockers.append(Blocker(present, "cache", str(e)))
        self._propagate_links()
        self._share_weight_uses()
        self._merge_same_links()
        permuted, sizes = self._permuted_classes()
        blockers += self._feature_checks(permuted)
        dependent = self._dependent_inner(permuted)
        sp = self.spaces
        blocks = frozenset(sp.find(w) for w, b, i in self.blocks if sp.link_of(w) == (sp.find(b), sp.find(i)))
        parts = frozenset(sp.find(x) for _, b, i in self.blocks for x in (b, i))
        names = name_spaces(self, permuted, dependent, blocks, parts)
        return Solution(g, self.spaces, names, sizes, dependent, blockers, views=self.views, blocks=blocks)

    def apply(self, idx: int) -> Blocker | None:
        """Run one node's rule; a refusal or a conflict becomes a blocker that names the node."""
        node = self.g.model.graph.node[idx]
        ctx = RuleContext(self, idx)
        label = node.name or node.output[0]
        try:
            if idx in self.skip:  # runs in post on plaintext: its outputs are never permuted
                for k, o in enumerate(node.output):
                    if o:
                        for a in range(len(self.shape(o))):
                            ctx.fix(ctx.ax_out(k, a), "computed in plaintext on the client (post)")
                return None
            if self._static_integers(node):  # pads or shapes folded from constants: plain numbers, no features
                for k, o in enumerate(node.output):
                    if o:
                        for a in range(len(self.shape(o))):
                            ctx.fix(ctx.ax_out(k, a), "integers computed from constants")
                return None
            contract(node).rule(ctx)
        except _NoShape as e:
            try:
                ctx.fix_all(f"unknown shape of '{e.name}'")
            except _NoShape:
                return Blocker(label, node.op_type, f"shape of tensor '{e.name}' is unknown")
        except Refused as e:
            ctx.fix_known(str(e))
            return Blocker(label, node.op_type, str(e), refused=True)
        except SpaceConflict as e:
            return Blocker(label, node.op_type, str(e))
        return None

    def _static_integers(self, node) -> bool:
        """Integer outputs computed from constants only (TorchScript's Pad pads: Concat, Reshape, Slice,
        Transpose): their axes are positions in a small vector, so no structure is recorded for them (a
        Concat 4 | 2 reshaped 3 x 2 would otherwise conflict)."""
        g = self.g
        outs = [o for o in node.output if o]
        if not outs or any(g.dtypes.get(o) not in _INT_TYPES for o in outs):
            return False
        if not all(not x or x in g.constants or x in self._static for x in node.input):
            return False
        self._static.update(outs)
        return True

    def _propagate_links(self) -> None:
        """A pinned structured axis pins its parts, and one whose parts are all pinned (or of size 1) is pinned."""
        sp = self.spaces

        def pinned(c: int) -> bool:
            info = sp.info(c)
            return bool(info.fixed) or info.size == 1

        changed = True
        while changed:
            changed = False
            for r in sp.roots():
                info = sp.info(r)
                link = sp.link_of(r)
                if not link:
                    continue
                if info.fixed:
                    for c in link:
                        if not sp.info(c).fixed:
                            sp.fix(c, info.fixed)
                            changed = True
                elif all(pinned(c) for c in link):
                    sp.fix(r, next((sp.info(c).fixed for c in link if sp.info(c).fixed), COLUMNS))
                    changed = True

    def _share_weight_uses(self) -> None:
        """A weight matrix used in several places (ALBERT's shared layers, a tied head) takes one permutation per
        axis over all its free uses, so the bundle holds one copy of it, not one per use (one real model gave a
        613 MB server graph from an 81 MB file). Free, unstructured classes are only tied by equalities, so merging
        them keeps every rule satisfied. Exporters also share byte-identical biases and scalars between unrelated
        ops: those stay per use (cheap), so unrelated spaces keep independent permutations. Structured axes
        (heads x head_dim) merge with axes of the same structure, which unifies their parts one to one."""
        sp, g = self.spaces, self.g
        uses: dict[str, list[str]] = {}
        for idx, n in enumerate(g.model.graph.node):
            for j, x in enumerate(n.input):
                if x in g.constants:
                    uses.setdefault(x, []).append(use_key(x, idx, j))
        for name, keys in uses.items():
            if len(keys) < 2 or g.constants[name].ndim < 2:  # biases and scalars: cheap copies, unrelated spaces
                continue
            for a in range(g.constants[name].ndim):
                free: dict[tuple, int] = {}  # by structure: a (heads x head_dim) axis merges with its like
                for k in keys:
                    if not sp.has((k, a)):
                        continue
                    c = sp.find(sp.id((k, a)))
                    info = sp.info(c)
                    if info.fixed or not isinstance(info.size, int) or info.size <= 1:
                        continue
                    link = sp.link_of(c)
                    shape = (sp.kind_of(c), tuple(sp.info(x).size for x in link)) if link else None
                    if shape is not None and any(sp.info(x).fixed for x in link):
                        continue
                    first = free.setdefault(shape, c)
                    if sp.find(first) != sp.find(c):
                        sp.union(first, c)

    def _merge_same_links(self) -> None:
        """Q and K projections flatten the same (heads, head_dim) pair: they are one space, report it once."""
        sp = self.spaces
        by_link: dict[tuple, int] = {}
        for r in sp.roots():
            link = sp.link_of(r)
            if link:
                other = by_link.setdefault((sp.kind_of(r), link), r)
                if other != r:
                    sp.union(other, r)

    def _permuted_classes(self) -> tuple[dict[int, str], dict[int, int]]:
        sp = self.spaces
        permuted: dict[int, str] = {}
        sizes: dict[int, int] = {}
        for r in sp.roots():
            info = sp.info(r)
            if info.fixed or not isinstance(info.size, int) or info.size <= 1:
                continue
            link = sp.link_of(r)
            if link and not all(isinstance(sp.info(c).size, int) for c in link):
                continue
            permuted[r] = ""
            sizes[r] = info.size
        # A flattened axis is permuted through its parts only; a part may be permuted even if its whole is
        # dynamic (batch x heads), which never reaches a constant.
        return permuted, sizes

    def _feature_checks(self, permuted: dict[int, str]) -> list[Blocker]:
        """Every weight's feature axes must be secret; report the op that pinned one."""
        out: list[Blocker] = []
        seen: set[int] = set()
        g = self.g
        for idx, n in enumerate(g.model.graph.node):
            for j, x in enumerate(n.input):
                if x not in g.constants:
                    continue
                feature_axes = _weight_feature_axes(n, j, g.constants[x])
                for a in feature_axes:
                    key = (use_key(x, idx, j), a)
                    if not self.spaces.has(key):
                        continue
                    c = self.spaces.find(self.spaces.id(key))
                    if c in permuted or c in seen:
                        continue
                    seen.add(c)
                    why = self.spaces.info(c).fixed or "not permutable"
                    if n.op_type == "Gather" and j == 0 and sinusoid_position_table(g, n):
                        continue  # sines and cosines of positions: computable from the config, nothing to hide
                    if why == COLUMNS and not self._contracted(c):  # a QA head's start|end: named outputs
                        continue
                    out.append(Blocker(n.name or n.output[0], n.op_type,
                                       f"feature axis {a} of weight '{x}' must stay unpermuted because of {why}"))
        return out

    def _contracted(self, c: int) -> bool:
        """Does some weight contract over this class (so it carries features into a later layer)?"""
        nodes = self.g.model.graph.node
        for key, a in self.spaces.info(c).members:
            if "@" not in key:
                continue
            name, rest = key.rsplit("@", 1)
            idx, j = (int(x) for x in rest.split(":"))
            n = nodes[idx]
            rank = len(self.g.shapes.get(name, []))
            trans = any(at.name == "transB" and at.i for at in n.attribute)
            if j == 1 and ((n.op_type == "MatMul" and a == rank - 2) or (n.op_type == "Gemm" and a == int(trans))):
                return True
        return False

    def _dependent_inner(self, permuted: dict[int, str]) -> dict[int, int]:
        """Inner (head_dim) classes may get one permutation per head when every constant that has the inner
        axis also has the matching head axis; otherwise they share one permutation across heads."""
        sp = self.spaces
        head_of: dict[int, int | None] = {}
        for r in list(permuted):
            link = sp.link_of(r)
            if not link or sp.kind_of(r) != "prod":
                continue
            for k, i in enumerate(link):
                if k == 0:  # a head (or an outer factor) cannot itself vary per head: a block of heads inside
                    head_of[i] = None  # a quantization block (o_proj's K refined as blocks x heads x head_dim)
                    continue
                if i not in permuted or sp.link_of(i):
                    continue
                h = link[k - 1] if len(link) == 2 and k == 1 else None
                if h is None or h not in permuted:
                    head_of[i] = None
                    continue
                prev = head_of.get(i, h)
                head_of[i] = h if prev == h else None
        for r in list(permuted):  # an inner space that appears in a concatenation cannot depend on a head
            if sp.link_of(r) and sp.kind_of(r) == "cat":
                for c in sp.link_of(r):
                    head_of[c] = None
        dependent: dict[int, int] = {}
        for i, h in head_of.items():
            if h is None:
                continue
            ok = True
            for key, _a in sp.info(i).members:
                if "@" not in key and key not in self.g.output_names:
                    continue
                rank = len(self.g.shapes.get(key.split("@")[0], []))
                if not any(sp.has((key, b)) and sp.find(sp.id((key, b))) == h for b in range(rank)):
                    ok = False
                    break
            if ok:
                dependent[i] = h
        return dependent


class Refused(Exception):
    """A rule's refusal: the op cannot be compiled exactly (the message says why and what to do)."""


def _structured_size(sp: Spaces, kind: str, parts: list[int]):
    sizes = [sp.info(c).size for c in parts]
    if not all(isinstance(x, int) for x in sizes):
        return None
    return int(np.prod(sizes)) if kind == "prod" else sum(sizes)


# Ops that read an int8 weight or embedding table, to dequantize or gather it
QUANTIZED_TABLE_OPS = ("Gather", "Cast", "DequantizeLinear")
# Ops that compute with int8 (or packed 4-bit) weights directly: their `weights` axes are features
INTEGER_WEIGHT_OPS = ("MatMulInteger", "ConvInteger", "QLinearMatMul", "com.microsoft:QGemm",
                      "com.microsoft:DynamicQuantizeMatMul",
                      "com.microsoft:MatMulIntegerToFloat", "com.microsoft:MatMulNBits")
COLUMNS = "split into single columns, each its own output"


class _NoShape(Exception):
    def __init__(self, name: str):
        self.name = name


def _weight_feature_axes(node, j: int, value: np.ndarray) -> list[int]:
    """Axes of a weight that carry features (must be permuted for the model to be protected): see OpContract.
    Size-1 axes (a per-row scale [V, 1]) are broadcast and carry none."""
    return [a for a in _feature_axes(node, j, value) if value.shape[a] > 1]


def is_float(dtype: np.dtype) -> bool:
    """numpy floats, and ml_dtypes' bfloat16 / float8 (numpy kind 'V'), which onnx hands out for those types."""
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8"))


QUANTIZED_DTYPES = ("int8", "uint8", "int4", "uint4")  # ml_dtypes names the 4-bit ones


def _feature_axes(node, j: int, value: np.ndarray) -> list[int]:
    if value.ndim >= 2 and value.dtype.name in QUANTIZED_DTYPES and j == 0 and node.op_type in QUANTIZED_TABLE_OPS:
        return [value.ndim - 1]  # an int8 weight or embedding table: gathered, or cast/dequantized first
    if value.ndim >= 2 and value.dtype in (np.int8, np.uint8) and op_key(node) in INTEGER_WEIGHT_OPS:
        return sorted({a % value.ndim for a in contract(node).weights.get(j, ())})  # used as int8 (or packed)
    if value.ndim < 2 or not is_float(value.dtype):
        return []
    return sorted({a % value.ndim for a in contract(node).weights.get(j, ())})


def name_spaces(solver: Solver, permuted: dict[int, str], dependent: dict[int, int],
                blocks: frozenset[int] = frozenset(), block_parts: frozenset[int] = frozenset()) -> dict[int, str]:
    """Human names in STIP.md's vocabulary: hidden, layerN.heads / .qk / .v / .ffn, out, rotary.

    Heuristic, for reports only: the class with most member axes is `hidden`; (heads x head_dim) products are
    attention projections; classes reaching a graph output are `out`; the rest are FFN intermediates.
    """
    sp = solver.spaces
    g = solver.g
    if not permuted:
        return {}
    first_node: dict[int, int] = {}
    for idx, n in enumerate(g.model.graph.node):
        for o in n.output:
            for a in range(len(g.shapes.get(o, []))):
                if sp.has((o, a)):
                    c = sp.find(sp.id((o, a)))
                    if c in permuted:
                        first_node.setdefault(c, idx)
    first = lambda c: first_node.get(c, 1 << 30)  # noqa: E731
    hidden = max(permuted, key=lambda c: len(sp.info(c).members))
    out_classes = set()
    for o in g.output_names:
        for a in range(len(g.shapes.get(o, []))):
            if sp.has((o, a)):
                out_classes.add(sp.find(sp.id((o, a))))
    # inner classes contracted between two activations are qk, the others v
    qk_inner: set[int] = set()
    for n in g.model.graph.node:
        if n.op_type == "MatMul" and n.input[0] not in g.constants and n.input[1] not in g.constants:
            r = len(g.shapes.get(n.input[0], []))
            if r >= 2 and sp.has((n.input[0], r - 1)):
                qk_inner.add(sp.find(sp.id((n.input[0], r - 1))))

    def prod(c: int) -> tuple[int, ...] | None:
        link = sp.link_of(c)
        return link if link and sp.kind_of(c) == "prod" else None

    pairs = {c: prod(c) for c in permuted if prod(c) and len(prod(c)) == 2 and c not in blocks | block_parts}
    grouped = {h for h, _ in pairs.values() if prod(h)}  # GQA: query heads = (kv group, head in group)
    heads = sorted({h for h, _ in pairs.values() if h in permuted and h not in grouped}, key=first)
    layer_of = {h: i for i, h in enumerate(heads)}
    for h in grouped:
        layer_of[h] = next((layer_of[x] for x in prod(h) if x in layer_of), len(heads))
    inner_owner = {i: h for h, i in pairs.values()}
    rotary = {x for c in permuted if sp.link_of(c) and sp.kind_of(c) == "cat" and c in inner_owner
              for x in sp.link_of(c)}
    feeds_hidden = _projects_into(g, sp, hidden)
    names: dict[int, str] = {}
    ffn_count: dict[int, int] = {}
    for c in sorted(permuted, key=first):
        if c == hidden:
            names[c] = "hidden"
        elif c in layer_of and c not in grouped:
            names[c] = f"layer{layer_of[c]}.heads"
        elif c in grouped:
            names[c] = f"layer{layer_of[c]}.q_heads"
        elif any(prod(h) and c == prod(h)[-1] for h in grouped):
            h = next(h for h in grouped if prod(h)[-1] == c)
            names[c] = f"layer{layer_of[h]}.q_heads_in_group"
        elif c in pairs:
            h, i = pairs[c]
            names[c] = f"layer{layer_of.get(h, '?')}.{'qk' if i in qk_inner else 'v'}"
        elif c in inner_owner and sp.link_of(c) and sp.kind_of(c) == "cat":
            names[c] = "rotary.head_dim"  # one head_dim permutation for every layer: RoPE's tables are shared
        elif c in inner_owner:
            h = inner_owner[c]
            names[c] = f"layer{layer_of.get(h, '?')}.{'qk' if c in qk_inner else 'v'}.inner"
        elif c in rotary:
            names[c] = "rotary"
        elif c in out_classes:
            names[c] = "out"
        elif heads and first(c) < first(heads[0]):
            names[c] = "embedding"
        elif c in feeds_hidden:
            layer = _layer_before(first(c), heads, first_node)
            k = ffn_count.get(layer, 0)
            ffn_count[layer] = k + 1
            names[c] = f"layer{layer}.ffn" + (f"{k}" if k else "")
        else:
            names[c] = "dense"
    for c in sorted(blocks & set(permuted), key=first):  # quantization blocks: named after the axis they split
        block, inner = sp.link_of(c)
        for part, suffix in ((block, "blocks"), (inner, "block_inner")):
            if part in permuted and names.get(part) in (None, "dense", "embedding", "out"):
                names[part] = f"{names[c]}.{suffix}"
    # disambiguate duplicates (two outputs, two qk spaces sharing heads, ...)
    seen: dict[str, int] = {}
    for c in sorted(permuted, key=first):
        base = names[c]
        if base in seen:
            seen[base] += 1
            names[c] = f"{base}.{seen[base]}"
        else:
            seen[base] = 0
    return names


def _projects_into(g: Graph, sp: Spaces, hidden: int) -> set[int]:
    """Spaces that a 2-D weight projects back into the hidden space (FFN intermediates)."""
    out: set[int] = set()
    for idx, n in enumerate(g.model.graph.node):
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in g.constants:
            if g.constants[n.input[1]].ndim != 2:
                continue
            trans = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
            rows, cols = (1, 0) if trans else (0, 1)
            key = use_key(n.input[1], idx, 1)
            if sp.has((key, rows)) and sp.has((key, cols)) and sp.find(sp.id((key, cols))) == hidden:
                out.add(sp.find(sp.id((key, rows))))
    return out


def _layer_before(node_idx: int, heads: list[int], first_node: dict[int, int]) -> int:
    layer = 0
    for i, h in enumerate(heads):
        if first_node.get(h, 1 << 30) <= node_idx:
            layer = i
    return layer


def solve(g: Graph) -> Solution:
    """Solve; when an op after the last weight pins a weight's feature axis (ArgMax over labels, an op without a
    rule in an image decoder), run that tail in post instead, on un-permuted tensors, rather than refuse."""
    first = Solver(g)
    sol = first.run()
    if not sol.blockers or any(b.refused for b in sol.blockers):  # a refusal stands wherever the op runs
        return sol
    tail = trailing_nodes(g)
    if not tail:
        return sol
    alt = Solver(g, tail, (first.sym_values, first.values)).run()
    if alt.blockers or not alt.permuted:
        return sol
    alt.post_tail = tail
    return alt


def trailing_nodes(g: Graph) -> frozenset[int]:
    """Nodes after the last weight: downstream of some weight, upstream of none, and not making the KV cache."""
    nodes = g.model.graph.node

    def weighted(n) -> bool:  # a weight matrix, or an op the server exists for (quantized weights, attention)
        return contract(n).heavy or any(x in g.constants and g.constants[x].ndim >= 2 and
                                        g.constants[x].dtype.kind == "f" for x in n.input)

    reaches: set[int] = set()  # nodes from which a weight node is reachable (inclusive)
    for idx in reversed(range(len(nodes))):
        n = nodes[idx]
        if weighted(n) or any(c in reaches for o in n.output if o for c, _ in g.consumers.get(o, [])):
            reaches.add(idx)
    after: set[int] = set()  # nodes downstream of a weight node
    for idx, n in enumerate(nodes):
        if weighted(n) or any(g.producer.get(x) in after for x in n.input if x):
            after.add(idx)
    cache: set[int] = set()
    stack = list(g.state_outputs)
    while stack:
        p = g.producer.get(stack.pop())
        if p is not None and p not in cache:
            cache.add(p)
            stack.extend(x for x in nodes[p].input if x)
    return frozenset(after - reaches - cache)


def require_transformer(sol: Solution) -> None:
    """A graph with no permutable feature space has nothing STIP can protect."""
    refused = [b for b in sol.blockers if b.refused]
    if not sol.permuted and refused:  # the ops it refused may be all the weights there are
        raise StipError(f"{sol.graph.path}: cannot place {refused[0]}")
    if not sol.permuted:
        raise StipError(f"{sol.graph.path}: no Transformer found: no weight feature axis can be permuted "
                        "(no MatMul/Gemm/Gather/Conv weights on a feature path)")
