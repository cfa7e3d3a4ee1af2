"""The contract of every supported op, one entry each: start here to see how an op is handled.

An entry is a permutation rule plus the facts the other passes need about the op (see OpContract). A rule relates
the axis classes of a node's inputs and outputs:
- `ctx.eq(a, b)`: the two axes must carry the same permutation (elementwise ops, matmul contraction, ...);
- `ctx.fix(a, why)`: the axis must stay unpermuted (indexed positionally: Gather indices, Slice, Concat axis, ...);
- `ctx.link(whole, parts)`: a Reshape flattened or split an axis (hidden -> heads x head_dim);
- `ctx.structure(whole, kind, parts)`: the same for an axis an op packs internally (fused q|k|v, heads x head_dim);
- `ctx.refuse(why, instead)`: the op (or this use of it) cannot be made exact; compile stops and says what to do.
Every input axis of size > 1 must be related to the outputs, to another input, or pinned: an axis a rule
ignores would stay in plaintext order while its partner is permuted (tests/test_rules.py checks the whole table).
Axes of size 1 are broadcast axes and are never permuted. Ops with no entry pin every axis they touch, so an
unsupported op on the hidden path surfaces as a conflict that names it (see solve.py).

Ops outside the default ONNX domain are keyed "domain:op" (onnxruntime's fused ops are "com.microsoft:...").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from stip.passes.packed import Packing
from stip.passes.spaces import SpaceConflict

if TYPE_CHECKING:
    from stip.passes.solve import RuleContext

Rule = Callable[["RuleContext"], None]


@dataclass(frozen=True)
class OpContract:
    """Everything the compiler needs to know about one op.

    weights: input index -> axes (negative: from the end) that carry features when that input is a float weight
        of rank >= 2; they must end up permuted or the model is not protected (solve.py reports them).
    heavy: the op is worth sending to the server (the client stops before it; partition.py).
    lifts: input index -> inputs of which at least one must be a weight; the op then turns the input's values
        into features (embedding lookup, patch conv, linear layer), which makes a graph input private.
    reads: output index -> the only inputs whose values that output depends on (default: all), e.g. a mask
        index computed from the public mask alone is not private data even though its node reads token ids.
    """

    rule: Rule
    weights: dict[int, tuple[int, ...]] = field(default_factory=dict)
    heavy: bool = False
    lifts: dict[int, tuple[int, ...]] = field(default_factory=dict)
    reads: dict[int, tuple[int, ...]] = field(default_factory=dict)


OPS: dict[str, OpContract] = {}
MS = "com.microsoft:"  # onnxruntime's contrib ops (the transformer optimizer's fused ops)

UNARY = (
    "Abs Acos Asin Atan Ceil Cos Cosh Elu Erf Exp Floor Gelu HardSigmoid HardSwish Identity IsInf IsNaN "
    "LeakyRelu Log Mish Neg Not Reciprocal Relu Round Selu Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Tan Tanh "
    "Cast ThresholdedRelu Celu Swish"
).split()
MS_UNARY = [MS + op for op in ("Gelu", "QuickGelu")]
ELEMENTWISE = "Add Sub Mul Div Pow Max Min Mean Sum Equal Greater GreaterOrEqual Less LessOrEqual And Or Xor Mod " \
    "BitShift PRelu Where Clip".split()
MS_ELEMENTWISE = [MS + op for op in ("FastGelu", "BiasGelu", "BiasAdd")]  # activations with a bias input
REDUCE = "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp " \
    "ReduceSumSquare".split()
SHAPE_ONLY = ("Shape", "Size")


def op_key(node) -> str:
    """The table key of a node: its op type, qualified by its domain outside the default ONNX domain."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def rule(*ops: str, weights: dict[int, tuple[int, ...]] | None = None, heavy: bool = False,
         lifts: dict[int, tuple[int, ...]] | None = None,
         reads: dict[int, tuple[int, ...]] | None = None) -> Callable[[Rule], Rule]:
    """Register a rule, with the op's other facts, under each op key."""

    def register(fn: Rule) -> Rule:
        for op in ops:
            if op in OPS:
                raise ValueError(f"op {op} registered twice")
            OPS[op] = OpContract(fn, dict(weights or {}), heavy, dict(lifts or {}), dict(reads or {}))
        return fn

    return register


def contract(node) -> OpContract:
    """The node's entry, or the fallback that pins every axis it touches."""
    return OPS.get(op_key(node), FALLBACK)


def broadcast_into(ctx: RuleContext, j: int, k: int = 0) -> None:
    """Numpy broadcasting: input j's axes align right with output k's; size-1 input axes are broadcast."""
    ins, out = ctx.shape_in(j), ctx.shape_out(k)
    off = len(out) - len(ins)
    for a, d in enumerate(ins):
        if d != 1 and a + off >= 0:
            ctx.eq(ctx.ax_in(j, a), ctx.ax_out(k, a + off))


@rule(*UNARY, *MS_UNARY, "Dropout", "Softmax", "LogSoftmax")
def unary(ctx: RuleContext) -> None:
    """Applied per element (Softmax: per row, and a row permutation commutes with it)."""
    broadcast_into(ctx, 0)
    if ctx.node.op_type == "Dropout" and len(ctx.node.output) > 1 and ctx.node.output[1]:
        for a in range(len(ctx.shape_out(1))):
            ctx.eq(ctx.ax_out(1, a), ctx.ax_out(0, a))


@rule("CastLike", reads={0: (0,)})  # the second input gives only the dtype
def cast_like(ctx: RuleContext) -> None:
    broadcast_into(ctx, 0)


@rule(*ELEMENTWISE, *MS_ELEMENTWISE)
def elementwise(ctx: RuleContext) -> None:
    """Operands that share an axis share its permutation; constants absorb it (biases, scales)."""
    for j in range(len(ctx.node.input)):
        if ctx.node.input[j]:
            broadcast_into(ctx, j)


@rule("Expand")
def expand(ctx: RuleContext) -> None:
    broadcast_into(ctx, 0)
    ctx.fix_input(1, "Expand shape")


@rule("ConstantOfShape")
def constant_of_shape(ctx: RuleContext) -> None:
    """One value everywhere (T5's zero position bias before the mask is added): every order of every output axis
    is the same tensor, so its axes take whatever permutation their consumers need; the shape is positional."""
    ctx.fix_input(0, "ConstantOfShape shape")


@rule("Tile")
def tile(ctx: RuleContext) -> None:
    """An axis repeated once passes through; a size-1 axis tiled is broadcast (its values repeat, so any order of
    the output axis is the same tensor). An axis holding n > 1 values tiled r > 1 times lays out r copies in a
    row: no single permutation of the output is one of the input, so both stay in plaintext order (positional,
    like GPT-J's rotary sin/cos table); so does every axis when the repeats are not known at compile time."""
    ctx.fix_input(1, "Tile repeats")
    ins = ctx.shape_in(0)
    reps = ctx.const(1)
    reps = ctx.sym(1) if reps is None else reps  # some entries may be symbolic (a sequence length): unknown
    for a, d in enumerate(ins):
        r = None if reps is None or np.ndim(reps) != 1 or a >= len(reps) else reps[a]
        r = int(r) if isinstance(r, (int, np.integer)) else None
        if r == 1:
            ctx.eq(ctx.ax_in(0, a), ctx.ax_out(0, a))
        elif d != 1:
            why = "Tile repeats this axis" if r is not None else "Tile with repeats unknown at compile time"
            ctx.fix(ctx.ax_in(0, a), why)
            ctx.fix(ctx.ax_out(0, a), why)


def _folded(ctx: RuleContext, j: int, limit: int = 16) -> np.ndarray | None:
    """Input j's value when it is computed from constants only (TorchScript builds Pad's pads with Concat,
    Reshape, Slice, Transpose, Cast), evaluated here with ONNX's reference runtime; None otherwise."""
    value = ctx.const(j)
    if value is not None or not ctx.has_input(j):
        return value
    g = ctx.s.g
    nodes: list[int] = []
    stack = [ctx.node.input[j]]
    while stack:
        t = stack.pop()
        if not t or t in g.constants:
            continue
        p = g.producer.get(t)
        if p is None or len(nodes) >= limit:
            return None
        if p not in nodes:
            nodes.append(p)
            stack.extend(g.model.graph.node[p].input)
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    order = sorted(nodes)
    used = {x for i in order for x in g.model.graph.node[i].input if x in g.constants}
    graph = helper.make_graph([g.model.graph.node[i] for i in order], "fold", [],
                              [helper.make_value_info(ctx.node.input[j], onnx.TypeProto())],
                              [numpy_helper.from_array(np.asarray(g.constants[x]), x) for x in used])
    try:
        model = helper.make_model(graph, opset_imports=g.model.opset_import)
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception:  # noqa: BLE001 - an op the reference runtime lacks: the pads stay unknown (axes pinned)
        return None


@rule("Pad")
def pad(ctx: RuleContext) -> None:
    """An axis padded by nothing passes through (any mode or fill value only touches padded axes); a padded axis
    gains positions at its ends, so it stays in plaintext order (MobileBERT's shifted trigram embeddings pad the
    sequence); every axis does when the pads are not known at compile time."""
    for j in range(1, len(ctx.node.input)):
        ctx.fix_input(j, "Pad pads/value/axes")
    rank = len(ctx.shape_in(0))
    pads, axes = _folded(ctx, 1), _folded(ctx, 3) if ctx.has_input(3) else None
    if pads is None and ctx.node.input[0] and ctx.attr("pads") is not None:  # opset < 11: an attribute
        pads = np.asarray(ctx.attr("pads"))
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.ravel(axes)]
    padded: set[int] | None = None
    if pads is not None and np.ndim(pads) == 1 and len(pads) == 2 * len(axes):
        padded = {a for i, a in enumerate(axes) if int(pads[i]) != 0 or int(pads[i + len(axes)]) != 0}
    for a in range(rank):
        if padded is not None and a not in padded:
            ctx.eq(ctx.ax_in(0, a), ctx.ax_out(0, a))
        else:
            why = "Pad adds positions on this axis" if padded is not None else "Pad with pads unknown at compile time"
            ctx.fix(ctx.ax_in(0, a), why)
            ctx.fix(ctx.ax_out(0, a), why)


@rule("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", MS + "SkipLayerNormalization",
      MS + "SkipSimplifiedLayerNormalization")
def layer_norm(ctx: RuleContext) -> None:
    """Statistics over the normalised axes are order-invariant; gamma/beta take the permutation."""
    broadcast_into(ctx, 0)
    for j in range(1, len(ctx.node.input)):
        if ctx.node.input[j]:
            broadcast_into(ctx, j)
    for k in range(1, len(ctx.node.output)):
        if ctx.node.output[k]:
            out = ctx.shape_out(k)
            for a, d in enumerate(out):
                if d != 1:
                    ctx.eq(ctx.ax_out(k, a), ctx.ax_in(0, a))


@rule("MatMul", weights={1: (-2, -1)}, heavy=True, lifts={0: (1,), 1: (0,)})
def matmul(ctx: RuleContext, ia: int = 0, ib: int = 1) -> None:
    """Contraction axes share a permutation (it cancels); free axes pass through; a constant absorbs both.
    (ia, ib: the operands' input indices, for the quantized forms that interleave scales.)"""
    a, b, out = ctx.shape_in(ia), ctx.shape_in(ib), ctx.shape_out(0)
    ra, rb, ro = len(a), len(b), len(out)
    if ra == 1 and rb == 1:
        ctx.eq(ctx.ax_in(ia, 0), ctx.ax_in(ib, 0))
        return
    if ra == 1:
        ctx.eq(ctx.ax_in(ia, 0), ctx.ax_in(ib, rb - 2))
        ctx.eq(ctx.ax_out(0, ro - 1), ctx.ax_in(ib, rb - 1))
        _batch(ctx, ib, rb - 2, ro - 1)
        return
    if rb == 1:
        ctx.eq(ctx.ax_in(ia, ra - 1), ctx.ax_in(ib, 0))
        for i in range(ra - 1):
            ctx.eq(ctx.ax_in(ia, i), ctx.ax_out(0, i))
        return
    ctx.eq(ctx.ax_in(ia, ra - 1), ctx.ax_in(ib, rb - 2))
    ctx.eq(ctx.ax_out(0, ro - 1), ctx.ax_in(ib, rb - 1))
    ctx.eq(ctx.ax_out(0, ro - 2), ctx.ax_in(ia, ra - 2))
    _batch(ctx, ia, ra - 2, ro - 2)
    _batch(ctx, ib, rb - 2, ro - 2)


@rule(MS + "FusedMatMul", weights={1: (-2, -1)}, heavy=True, lifts={0: (1,), 1: (0,)})
def ms_fused_matmul(ctx: RuleContext) -> None:
    """alpha * op(A) @ op(B), op a transpose of the last two axes (onnxruntime's MatMul + Transpose/Mul fusion):
    MatMul's rule with the contraction and free axes swapped where transposed."""
    a, b, out = ctx.shape_in(0), ctx.shape_in(1), ctx.shape_out(0)
    ra, rb, ro = len(a), len(b), len(out)
    if ctx.attr("transBatchA", 0) or ctx.attr("transBatchB", 0) or ra < 2 or rb < 2:
        ctx.refuse("FusedMatMul with transBatchA/transBatchB or a vector operand is not supported", BEFORE_OPTIMIZER)
    a_m, a_k = (ra - 1, ra - 2) if ctx.attr("transA", 0) else (ra - 2, ra - 1)
    b_k, b_n = (rb - 1, rb - 2) if ctx.attr("transB", 0) else (rb - 2, rb - 1)
    ctx.eq(ctx.ax_in(0, a_k), ctx.ax_in(1, b_k))
    ctx.eq(ctx.ax_out(0, ro - 2), ctx.ax_in(0, a_m))
    ctx.eq(ctx.ax_out(0, ro - 1), ctx.ax_in(1, b_n))
    _batch(ctx, 0, ra - 2, ro - 2)
    _batch(ctx, 1, rb - 2, ro - 2)


def _batch(ctx: RuleContext, j: int, n_in: int, n_out: int) -> None:
    shape = ctx.shape_in(j)
    for i in range(n_in):
        o = n_out - n_in + i
        if shape[i] != 1 and o >= 0:
            ctx.eq(ctx.ax_in(j, i), ctx.ax_out(0, o))


@rule("Gemm", weights={1: (0, 1)}, heavy=True, lifts={0: (1,), 1: (0,)})
def gemm(ctx: RuleContext) -> None:
    ta, tb = ctx.attr("transA", 0), ctx.attr("transB", 0)
    a_m, a_k = (1, 0) if ta else (0, 1)
    b_k, b_n = (1, 0) if tb else (0, 1)
    ctx.eq(ctx.ax_in(0, a_k), ctx.ax_in(1, b_k))
    ctx.eq(ctx.ax_out(0, 0), ctx.ax_in(0, a_m))
    ctx.eq(ctx.ax_out(0, 1), ctx.ax_in(1, b_n))
    if len(ctx.node.input) > 2 and ctx.node.input[2]:
        broadcast_into(ctx, 2)


@rule("Transpose")
def transpose(ctx: RuleContext) -> None:
    rank = len(ctx.shape_in(0))
    perm = ctx.attr("perm", list(reversed(range(rank))))
    for i, p in enumerate(perm):
        ctx.eq(ctx.ax_out(0, i), ctx.ax_in(0, p))


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx: RuleContext) -> None:
    """Match axes by products of sizes: 1:1 keeps a class, 1:n splits it (link), n:1 merges (link)."""
    for j in range(1, len(ctx.node.input)):
        ctx.fix_input(j, f"{ctx.node.op_type} shape/axes")
    ins, out = ctx.shape_in(0), ctx.shape_out(0)
    groups = group_axes(ins, out)
    if groups is None and ctx.node.op_type == "Reshape":
        target = reshape_target(ctx.sym(1), ins, ctx.attr("allowzero", 0))
        if target is not None and len(target) == len(out):
            groups = group_axes(ins, target)
            for a, d in enumerate(target):  # the sizes shape inference lost
                if isinstance(d, int) and not isinstance(out[a], int):
                    ctx.eq(ctx.ax_out(0, a), ctx.s.spaces.fresh(d))
    if groups is None:
        for a in range(len(ins)):
            ctx.fix(ctx.ax_in(0, a), "Reshape the compiler cannot follow (unknown sizes)")
        for a in range(len(out)):
            ctx.fix(ctx.ax_out(0, a), "Reshape the compiler cannot follow (unknown sizes)")
        return
    for gi, go in groups:
        if len(gi) == 1 and len(go) == 1:
            ctx.eq(ctx.ax_in(0, gi[0]), ctx.ax_out(0, go[0]))
        elif len(gi) == 1:
            ctx.link(ctx.ax_in(0, gi[0]), [ctx.ax_out(0, a) for a in go])
        elif len(go) == 1:
            ctx.link(ctx.ax_out(0, go[0]), [ctx.ax_in(0, a) for a in gi])
        else:
            why = "Reshape regroups axes many-to-many"
            for a in gi:
                ctx.fix(ctx.ax_in(0, a), why)
            for a in go:
                ctx.fix(ctx.ax_out(0, a), why)


def reshape_target(shape, ins: list, allowzero: int = 0) -> list | None:
    """The output dims of Reshape(x, shape) from its (partially symbolic) shape value, with Reshape's semantics:
    0 copies the input dim (unless allowzero), -1 is what the product leaves; one unknown entry is found the same
    way. Dims are ints or symbolic products (values.py); None when more than one entry is unknown."""
    if shape is None or shape.ndim != 1:
        return None
    dims: list = []
    unknown = []
    for i, v in enumerate(shape):
        if isinstance(v, int) and v == 0 and not allowzero:
            v = ins[i] if i < len(ins) else None
        if v is None or (isinstance(v, int) and v < 0):
            unknown.append(i)
            dims.append(None)
        else:
            dims.append(v if isinstance(v, int) or isinstance(v, tuple) else _factors(v))
    if len(unknown) > 1:
        return None
    if unknown:
        total: tuple = (1, ())
        for d in ins:
            total = _mul(total, _factors(d))
        known: tuple = (1, ())
        for d in dims:
            if d is not None:
                known = _mul(known, _factors(d))
        if not _divides(known, total):
            return None
        rest = list(total[1])
        for x in known[1]:
            rest.remove(x)
        dims[unknown[0]] = (total[0] // known[0], tuple(rest))
    return [d[0] if isinstance(d, tuple) and not d[1] else d for d in dims]


_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


@functools.lru_cache(maxsize=4096)
def _factors(d) -> tuple[int, tuple[str, ...]]:
    """A dim as (integer coefficient, symbolic factors): 'floor(32*batch*(p + s)/(8*p + 8*s))' -> (4, (batch,)).

    Symbolic shape inference writes products and sums of dims; sympy with positive integer symbols reduces
    them so that Reshape's products can be compared."""
    if isinstance(d, int):
        return d, ()
    if isinstance(d, tuple):  # already a symbolic product (values.py)
        return d
    text = str(d)
    if _IDENT.fullmatch(text):
        return 1, (text,)
    import sympy

    clean = re.sub(r"[^A-Za-z_0-9+*/() .-]", "_", text)
    names = set(_IDENT.findall(clean)) - {"floor", "ceiling", "Max", "Min", "Mod"}
    local = {n: sympy.Symbol(n, integer=True, positive=True) for n in names}
    try:
        expr = sympy.simplify(sympy.sympify(clean, locals=local))
        coeff, rest = expr.as_coeff_Mul()
        factors = tuple(sorted(str(f) for f in sympy.Mul.make_args(rest) if f != 1))
        return int(coeff), factors
    except Exception:  # noqa: BLE001 - an unparseable dim is an opaque symbol
        return 1, (text,)


def _mul(x, y):
    return x[0] * y[0], tuple(sorted(x[1] + y[1]))


def _divides(x, y) -> bool:
    if x[0] == 0 or y[0] % x[0]:
        return False
    rest = list(y[1])
    for s in x[1]:
        if s not in rest:
            return False
        rest.remove(s)
    return True


def group_axes(ins: list, out: list) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input axes with runs of output axes of equal product; size-1 axes belong to no group."""
    ia = [i for i, d in enumerate(ins) if d != 1]
    oa = [i for i, d in enumerate(out) if d != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(oa):
        gi, go = [ia[i]], [oa[j]]
        pi, po = _factors(ins[ia[i]]), _factors(out[oa[j]])
        i += 1
        j += 1
        while pi != po:
            if _divides(pi, po) and i < len(ia):
                pi = _mul(pi, _factors(ins[ia[i]]))
                gi.append(ia[i])
                i += 1
            elif _divides(po, pi) and j < len(oa):
                po = _mul(po, _factors(out[oa[j]]))
                go.append(oa[j])
                j += 1
            else:
                return None
        groups.append((gi, go))
    if i != len(ia) or j != len(oa):
        return None
    return groups


@rule("Concat")
def concat(ctx: RuleContext) -> None:
    """The concatenated axis is the concatenation of the inputs' spaces (fused projections, rotary halves,
    KV cache + new keys); the other axes are shared."""
    _concat_inputs(ctx, list(range(len(ctx.node.input))))


def _concat_inputs(ctx: RuleContext, inputs: list[int]) -> None:
    """Concat's rule over the data inputs `inputs` (QLinearConcat interleaves them with scales)."""
    axis = ctx.attr("axis", 0) % len(ctx.shape_out(0))
    if not ctx.is_data(inputs[0]):  # shape vectors and masks: positional
        for j in inputs:
            ctx.fix(ctx.ax_in(j, axis), "Concat axis (integer data)")
        ctx.fix(ctx.ax_out(0, axis), "Concat axis (integer data)")
    parts = []
    for j in inputs:
        for a in range(len(ctx.shape_in(j))):
            if a == axis:
                if ctx.shape_in(j)[a] != 0:
                    parts.append(ctx.ax_in(j, a))
            elif ctx.shape_in(j)[a] != 1:
                ctx.eq(ctx.ax_in(j, a), ctx.ax_out(0, a))
    if len(parts) == 1:
        ctx.eq(parts[0], ctx.ax_out(0, axis))
    else:
        ctx.link(ctx.ax_out(0, axis), parts, kind="cat")


@rule("Split")
def split(ctx: RuleContext) -> None:
    """Splitting a fused axis (GPT-2's q|k|v) gives each output one block of the input's space."""
    rank = len(ctx.shape_in(0))
    axis = ctx.attr("axis", 0) % rank
    ctx.fix_input(1, "Split sizes")
    if not ctx.is_data(0):
        ctx.fix(ctx.ax_in(0, axis), "Split axis (integer data)")
    parts = []
    for k in range(len(ctx.node.output)):
        for a in range(rank):
            if a == axis:
                parts.append(ctx.ax_out(k, a))
            else:
                ctx.eq(ctx.ax_in(0, a), ctx.ax_out(k, a))
    ctx.link(ctx.ax_in(0, axis), parts, kind="cat")


@rule("Slice")
def slice_(ctx: RuleContext) -> None:
    """A whole-axis slice keeps the space; a contiguous block [a:b) of a static axis is one block of it
    (rotate_half slices the two rotary halves); anything else is positional."""
    ins = ctx.shape_in(0)
    for j in range(1, len(ctx.node.input)):
        ctx.fix_input(j, "Slice bounds")
    bounds = _slice_bounds(ctx)
    for a in range(len(ins)):
        b = bounds.get(a, "full") if bounds is not None else None
        if b != "full" and not ctx.is_data(0):
            b = None  # integer data (shape vectors): positional
        if b == "full":
            ctx.eq(ctx.ax_in(0, a), ctx.ax_out(0, a))
        elif b is None or not isinstance(ins[a], int):
            ctx.fix(ctx.ax_in(0, a), "Slice (positional)")
            ctx.fix(ctx.ax_out(0, a), "Slice (positional)")
        else:
            start, end = b
            parts, out_part = [], None
            for lo, hi in ((0, start), (start, end), (end, ins[a])):
                if hi > lo:
                    c = ctx.ax_out(0, a) if (lo, hi) == (start, end) else ctx.s.spaces.fresh(hi - lo)
                    parts.append(c)
                    out_part = c if (lo, hi) == (start, end) else out_part
            if out_part is not None and len(parts) > 1:
                ctx.link(ctx.ax_in(0, a), parts, kind="cat")
            elif out_part is not None:
                ctx.eq(ctx.ax_in(0, a), out_part)


def _slice_bounds(ctx: RuleContext) -> dict[int, object] | None:
    """Per sliced axis: "full", a static (start, end) with step 1, or None when positional or unknown.

    Bounds computed at run time (`x[:, :seq_len]`) leave their axes positional, but only those: when the axes
    are known, every other axis passes through. None only when the sliced axes themselves are unknown."""
    ins = ctx.shape_in(0)
    rank = len(ins)
    starts, ends = ctx.sym(1), ctx.sym(2)
    has_axes = len(ctx.node.input) > 3 and ctx.node.input[3]
    axes = ctx.const(3) if has_axes else None
    steps = ctx.const(4) if len(ctx.node.input) > 4 and ctx.node.input[4] else None
    if has_axes and axes is None:
        return None
    if axes is None:
        n = len(starts) if starts is not None else ctx.shape_in(1)[0] if ctx.shape_in(1) else None
        if not isinstance(n, int):
            return None
        axes = range(n)
    out: dict[int, object] = {}
    for k, ax in enumerate(axes):
        a = int(ax) % rank
        step = 1 if steps is None else int(steps[k])
        s0 = None if starts is None else starts[k]
        e0 = None if ends is None else ends[k]
        n = ins[a]
        if step == 1 and s0 == 0 and e0 is not None and (
                (isinstance(e0, int) and e0 >= np.iinfo(np.int32).max // 2) or _factors(e0) == _factors(n)):
            out[a] = "full"  # x[:, :x.shape[1]] keeps the whole axis
            continue
        if step != 1 or not isinstance(n, int) or not isinstance(s0, int) or not isinstance(e0, int):
            out[a] = None
            continue
        s1 = min(max(s0 + n if s0 < 0 else s0, 0), n)
        e1 = min(max(e0 + n if e0 < 0 else e0, 0), n)
        out[a] = "full" if (s1, e1) == (0, n) else ((s1, e1) if e1 > s1 else None)
    return out


@rule("Gather", weights={0: (-1,)}, lifts={1: (0,)})
def gather(ctx: RuleContext) -> None:
    """Indexing is positional on the gathered axis; the other data axes and the index axes pass through."""
    data, idx = ctx.shape_in(0), ctx.shape_in(1)
    axis = ctx.attr("axis", 0) % len(data)
    ctx.fix(ctx.ax_in(0, axis), "Gather axis (indexed by position)")
    o = 0
    for a in range(len(data)):
        if a == axis:
            for b in range(len(idx)):
                ctx.eq(ctx.ax_in(1, b), ctx.ax_out(0, o))
                o += 1
        else:
            ctx.eq(ctx.ax_in(0, a), ctx.ax_out(0, o))
            o += 1


@rule("GatherND")
def gather_nd(ctx: RuleContext) -> None:
    """The first batch_dims + k data axes are indexed by position (k = the index tuples' length); the data axes
    after them (a table row's features, RoPE's cos/sin width) pass through to the output's trailing axes."""
    data, idx = ctx.shape_in(0), ctx.shape_in(1)
    k, b = idx[-1] if idx else None, ctx.attr("batch_dims", 0)
    if not isinstance(k, int):
        ctx.fix_all("GatherND with an unknown index depth")
        return
    ctx.fix_input(1, "GatherND indices")
    for a in range(b + k):
        ctx.fix(ctx.ax_in(0, a), "GatherND indexed axis")
    for i in range(len(idx) - 1):
        ctx.eq(ctx.ax_in(1, i), ctx.ax_out(0, i))
    for a in range(b + k, len(data)):
        ctx.eq(ctx.ax_in(0, a), ctx.ax_out(0, len(idx) - 1 + a - b - k))


@rule(*REDUCE)
def reduce(ctx: RuleContext) -> None:
    """Reductions are order-invariant over the reduced axes; the kept axes pass through."""
    rank = len(ctx.shape_in(0))
    axes = ctx.attr("axes", None)
    if axes is None and len(ctx.node.input) > 1 and ctx.node.input[1]:
        c = ctx.const(1)
        ctx.fix_input(1, "Reduce axes")
        axes = None if c is None else [int(x) for x in c.reshape(-1)]
        if c is None:
            ctx.fix_all(f"{ctx.node.op_type} with computed axes")
            return
    if not axes:
        axes = [] if ctx.attr("noop_with_empty_axes", 0) else list(range(rank))
    axes = sorted(int(a) % rank for a in axes)
    keep = ctx.attr("keepdims", 1)
    o = 0
    for a in range(rank):
        if a in axes:
            o += 1 if keep else 0
            continue
        ctx.eq(ctx.ax_in(0, a), ctx.ax_out(0, o))
        o += 1


@rule("ArgMax", "ArgMin")
def argmax(ctx: RuleContext) -> None:
    rank = len(ctx.shape_in(0))
    axis = ctx.attr("axis", 0) % rank
    keep = ctx.attr("keepdims", 1)
    ctx.fix(ctx.ax_in(0, axis), f"{ctx.node.op_type} returns positions")
    o = 0
    for a in range(rank):
        if a == axis:
            o += 1 if keep else 0
            continue
        ctx.eq(ctx.ax_in(0, a), ctx.ax_out(0, o))
        o += 1


def _conv_family(ctx: RuleContext, w_in: int, w_out: int, bias: int | None = 2) -> None:
    """Channels behave like a matmul (the weight's axes w_in and w_out absorb both sides); spatial and kernel axes
    are positional; grouped channels are pinned."""
    op = ctx.node.op_type
    x, w = ctx.shape_in(0), ctx.shape_in(1)
    ctx.eq(ctx.ax_in(0, 0), ctx.ax_out(0, 0))
    if ctx.attr("group", 1) == 1:
        ctx.eq(ctx.ax_in(0, 1), ctx.ax_in(1, w_in))
        ctx.eq(ctx.ax_out(0, 1), ctx.ax_in(1, w_out))
    else:
        for c in (ctx.ax_in(0, 1), ctx.ax_in(1, 0), ctx.ax_in(1, 1), ctx.ax_out(0, 1)):
            ctx.fix(c, f"grouped {op} channels")
    for a in range(2, len(x)):
        ctx.fix(ctx.ax_in(0, a), f"{op} spatial axis")
        ctx.fix(ctx.ax_out(0, a), f"{op} spatial axis")
    for a in range(2, len(w)):
        ctx.fix(ctx.ax_in(1, a), f"{op} kernel axis")
    if bias is not None and ctx.has_input(bias):
        ctx.eq(ctx.ax_in(bias, 0), ctx.ax_out(0, 1))


@rule("Conv", weights={1: (0,)}, lifts={0: (1,)})
def conv(ctx: RuleContext) -> None:
    """Weight [C_out, C_in/group, k...]."""
    _conv_family(ctx, w_in=1, w_out=0)


@rule("ConvInteger", weights={1: (0,)}, lifts={0: (1,)})
def conv_integer(ctx: RuleContext) -> None:
    """Conv on (x - x_zero_point) and (w - w_zero_point) in int32, exactly (quantize_dynamic's Conv): x's zero
    point is per tensor, w's per tensor or one per output channel, moving with it."""
    _conv_family(ctx, w_in=1, w_out=0, bias=None)
    if ctx.has_input(2) and any(d != 1 for d in ctx.shape_in(2)):
        ctx.refuse(f"ConvInteger x_zero_point of shape {ctx.shape_in(2)}", "quantize x per tensor")
    _params_along(ctx, 3, ctx.ax_out(0, 1), "ConvInteger w_zero_point")


@rule("ConvTranspose", weights={1: (0,)})
def conv_transpose(ctx: RuleContext) -> None:
    """Weight [C_in, C_out/group, k...]: Conv's channel axes swapped."""
    _conv_family(ctx, w_in=0, w_out=1)


@rule("Resize", "Upsample")
def resize(ctx: RuleContext) -> None:
    """Interpolation mixes neighbours along the resized (spatial) axes, which stay positional; an axis it leaves
    alone (scale 1, or outside `axes`) passes through, so image channels keep their permutation."""
    rank = len(ctx.shape_in(0))
    for j in range(1, len(ctx.node.input)):
        ctx.fix_input(j, f"{ctx.node.op_type} roi/scales/sizes")
    axes = ctx.attr("axes", None)
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    scales = ctx.const(2 if ctx.node.op_type == "Resize" else 1)
    sizes = ctx.sym(3) if ctx.node.op_type == "Resize" else None  # often Concat(Shape(x)[:2], (H', W'))
    ins = ctx.shape_in(0)
    for a in range(rank):
        k = axes.index(a) if a in axes else None
        same = k is None
        if k is not None and scales is not None and scales.size == len(axes):
            same = float(scales.reshape(-1)[k]) == 1.0
        elif k is not None and sizes is not None and sizes.size == len(axes):
            want = sizes.reshape(-1)[k]
            same = want is not None and _factors(want) == _factors(ins[a])
        if same:
            ctx.eq(ctx.ax_in(0, a), ctx.ax_out(0, a))
        else:
            ctx.fix(ctx.ax_in(0, a), f"{ctx.node.op_type} resized axis")
            ctx.fix(ctx.ax_out(0, a), f"{ctx.node.op_type} resized axis")


@rule(*SHAPE_ONLY, reads={0: ()})
def shape_only(ctx: RuleContext) -> None:
    """Shapes never change under a permutation, so the input is unconstrained."""
    for k in range(len(ctx.node.output)):
        for a in range(len(ctx.shape_out(k))):
            ctx.fix(ctx.ax_out(k, a), "shape data")


# ---- onnxruntime's fused ops (com.microsoft), as `onnxruntime.transformers.optimizer` emits them ----

BEFORE_OPTIMIZER = ("compile the export from before `onnxruntime.transformers.optimizer`, "
                    "or optimize without this fusion")


def _axes_pass(ctx: RuleContext, j: int, k: int, axes: range | list[int]) -> None:
    """Input j's listed axes (batch, sequence) are output k's same axes, unless broadcast."""
    shape = ctx.shape_in(j)
    for a in axes:
        if shape[a] != 1:
            ctx.eq(ctx.ax_in(j, a), ctx.ax_out(k, a))


def _fix_positional(ctx: RuleContext, j: int, why: str, keep: dict[int, int] | None = None) -> None:
    """Pin input j's axes (masks, positions, sequence lengths), except those `keep` maps to a class."""
    if not ctx.has_input(j):
        return
    for a, d in enumerate(ctx.shape_in(j)):
        if keep and a in keep:
            if d != 1:
                ctx.eq(ctx.ax_in(j, a), keep[a])
        else:
            ctx.fix(ctx.ax_in(j, a), why)


def _attention_bias(ctx: RuleContext, j: int, heads: int, batch: int) -> None:
    """An additive bias [B|1, H|1, S, T] on the scores: its head axis takes the head permutation."""
    _fix_positional(ctx, j, "attention bias positions", {0: batch, 1: heads})


def _heads(ctx: RuleContext, n, size, what: str) -> int:
    """Head size of a packed axis of `size` features over `n` heads, or a refusal."""
    if not n or not isinstance(size, int) or size % n:
        ctx.refuse(f"{what} of size {size} is not {n} whole heads", BEFORE_OPTIMIZER)
    return size // n


def _rotary_inner(ctx: RuleContext, hd: int, cos_j: int, sin_j: int, interleaved: int, rot: int = 0) -> int:
    """A head_dim axis that RoPE rotates: frequency i pairs (i, i + rot/2), or (2i, 2i+1) when interleaved.

    Permuting the frequencies (both halves alike, or whole pairs) and the cos/sin columns to match commutes
    with the rotation, so head_dim is a structure over one frequency class f, and the pair index stays put."""
    half = ctx.shape_in(cos_j)[-1]
    if not isinstance(half, int):
        ctx.refuse("rotary cos/sin cache of unknown width", BEFORE_OPTIMIZER)
    rot = rot or 2 * half
    if rot != 2 * half or rot > hd:
        ctx.refuse(f"rotary dim {rot} does not match cos/sin caches of width {half} and head size {hd}",
                   BEFORE_OPTIMIZER)
    f = ctx.fresh(half)
    if interleaved:
        part = ctx.structure(None, "prod", [f, ctx.pinned(2, "rotary pair (interleaved)")])
    else:
        part = ctx.structure(None, "cat", [f, f])
    for j in (cos_j, sin_j):
        _fix_positional(ctx, j, "rotary cache positions", {len(ctx.shape_in(j)) - 1: f})
    return part if rot == hd else ctx.structure(None, "cat", [part, ctx.fresh(hd - rot)])


@rule(MS + "Attention", weights={1: (0, 1)}, heavy=True, lifts={0: (1,)})
def ms_attention(ctx: RuleContext) -> None:
    """x [B,S,D] @ packed weight [D, Dq+Dk+Dv] (+ bias): the packed axis is q | k | v, each heads x head_dim.
    q and k share one space (it cancels in q k^T), all three share the head permutation, and the output
    [B,S,Dv] is in v's space."""
    if ctx.attr("do_rotary", 0):
        ctx.refuse("Attention with do_rotary=1 is not supported", BEFORE_OPTIMIZER)
    if ctx.has_input(4) or ctx.has_input(6) or ctx.has_output(1):
        ctx.refuse("Attention with a past/present state is not supported", BEFORE_OPTIMIZER)
    n = ctx.attr("num_heads", 0)
    total = ctx.shape_in(1)[1]
    sizes = list(ctx.attr("qkv_hidden_sizes", None) or ([total // 3] * 3 if isinstance(total, int) else []))
    if len(sizes) != 3 or sum(sizes) != total or sizes[0] != sizes[1]:
        ctx.refuse(f"Attention weight of width {total} is not q | k | v with equal q and k sizes", BEFORE_OPTIMIZER)
    h = ctx.fresh(n)
    qk = ctx.structure(None, "prod", [h, ctx.fresh(_heads(ctx, n, sizes[0], "q/k projection"))])
    v = ctx.structure(ctx.ax_out(0, 2), "prod", [h, ctx.fresh(_heads(ctx, n, sizes[2], "v projection"))])
    ctx.structure(ctx.ax_in(1, 1), "cat", [qk, qk, v])
    ctx.eq(ctx.ax_in(0, 2), ctx.ax_in(1, 0))
    _axes_pass(ctx, 0, 0, [0, 1])
    if ctx.has_input(2):
        ctx.eq(ctx.ax_in(2, 0), ctx.ax_in(1, 1))
    _fix_positional(ctx, 3, "attention mask_index")
    if ctx.has_input(5):
        _attention_bias(ctx, 5, h, ctx.ax_out(0, 0))


def _cache(ctx: RuleContext, j: int, k: int, batch: int, heads: int, inner: int) -> None:
    """past (input j) / present (output k) [B, heads, length, head_dim]: the server keeps them permuted."""
    if ctx.has_input(j):
        _fix_positional(ctx, j, "cache positions", {0: batch, 1: heads, 3: inner})
    if ctx.has_output(k):
        out = ctx.shape_out(k)
        for a, c in ((0, batch), (1, heads), (3, inner)):
            if out[a] != 1:
                ctx.eq(ctx.ax_out(k, a), c)
        ctx.fix(ctx.ax_out(k, 2), "cache positions")


@rule(MS + "MultiHeadAttention", heavy=True)
def ms_multi_head_attention(ctx: RuleContext) -> None:
    """Separate q [B,S,Dq], k, v ([B,L,D] or per head [B,N,L,H]), optional packed bias [Dq+Dk+Dv], cache
    [B,N,P,H]: q and k share heads x head_dim, v has its own head_dim, the output is in v's space."""
    q = ctx.shape_in(0)
    if not ctx.has_input(1) or len(q) != 3 or len(ctx.shape_in(1)) == 5:
        ctx.refuse("MultiHeadAttention with packed q/k/v inputs is not supported", BEFORE_OPTIMIZER)
    if ctx.has_input(9):
        ctx.refuse("MultiHeadAttention with cache_indirection (beam search) is not supported", BEFORE_OPTIMIZER)
    n = ctx.attr("num_heads", 0)
    b = ctx.ax_out(0, 0)
    h = ctx.fresh(n)
    qk_inner = ctx.fresh(_heads(ctx, n, q[2], "query"))
    qk = ctx.structure(ctx.ax_in(0, 2), "prod", [h, qk_inner])
    _axes_pass(ctx, 0, 0, [0, 1])
    k, v = ctx.shape_in(1), ctx.shape_in(2)
    v_size = v[2] if len(v) == 3 else v[1] * v[3]
    v_inner = ctx.fresh(_heads(ctx, n, v_size, "value"))
    vc = ctx.structure(ctx.ax_out(0, 2), "prod", [h, v_inner])
    for j, shape, whole, inner in ((1, k, qk, qk_inner), (2, v, vc, v_inner)):
        if shape[0] != 1:
            ctx.eq(ctx.ax_in(j, 0), b)
        if len(shape) == 3:
            ctx.eq(ctx.ax_in(j, 2), whole)
        else:
            ctx.eq(ctx.ax_in(j, 1), h)
            ctx.eq(ctx.ax_in(j, 3), inner)
    ctx.eq(ctx.ax_in(1, len(k) - 2), ctx.ax_in(2, len(v) - 2))  # key and value positions pair up
    if ctx.has_input(3):
        ctx.structure(ctx.ax_in(3, 0), "cat", [qk, qk, vc])
    _fix_positional(ctx, 4, "key padding mask")
    if ctx.has_input(5):
        _attention_bias(ctx, 5, h, b)
    _cache(ctx, 6, 1, b, h, qk_inner)
    _cache(ctx, 7, 2, b, h, v_inner)
    _fix_positional(ctx, 8, "past sequence length")
    if ctx.has_output(3):
        ctx.eq(ctx.ax_out(3, 1), h)


@rule(MS + "GroupQueryAttention", heavy=True)
def ms_group_query_attention(ctx: RuleContext) -> None:
    """Query heads are kv heads x heads per group (head i reads kv head i // group); q and k share head_dim
    (with RoPE inside, a frequency structure, see _rotary_inner); q | k | v may come packed in one input."""
    if ctx.has_input(12) or ctx.has_input(13) or ctx.attr("k_quant_type", "NONE") not in ("NONE", b"NONE"):
        ctx.refuse("GroupQueryAttention with a quantized KV cache is not supported", BEFORE_OPTIMIZER)
    n, nkv = ctx.attr("num_heads", 0), ctx.attr("kv_num_heads", 0)
    if not nkv or n % nkv:
        ctx.refuse(f"num_heads {n} is not a multiple of kv_num_heads {nkv}", BEFORE_OPTIMIZER)
    q = ctx.shape_in(0)
    packed = not ctx.has_input(1)
    hd = _heads(ctx, n + 2 * nkv if packed else n, q[2], "query")
    b = ctx.ax_out(0, 0)
    kvh = ctx.fresh(nkv)
    qh = ctx.structure(None, "prod", [kvh, ctx.fresh(n // nkv)])
    if ctx.attr("do_rotary", 0):
        inner = _rotary_inner(ctx, hd, 7, 8, ctx.attr("rotary_interleaved", 0))
    else:
        inner = ctx.fresh(hd)
        _fix_positional(ctx, 7, "unused rotary cache")
        _fix_positional(ctx, 8, "unused rotary cache")
    v_inner = ctx.fresh(hd)
    qc = ctx.structure(None, "prod", [qh, inner])
    kc = ctx.structure(None, "prod", [kvh, inner])
    vc = ctx.structure(None, "prod", [kvh, v_inner])
    if packed:
        ctx.structure(ctx.ax_in(0, 2), "cat", [qc, kc, vc])
    else:
        for j, c in ((0, qc), (1, kc), (2, vc)):
            ctx.eq(ctx.ax_in(j, 2), c)
            _axes_pass(ctx, j, 0, [0, 1])
    _axes_pass(ctx, 0, 0, [0, 1])
    ctx.structure(ctx.ax_out(0, 2), "prod", [qh, v_inner])
    _cache(ctx, 3, 1, b, kvh, inner)
    _cache(ctx, 4, 2, b, kvh, v_inner)
    for j in (5, 6, 9):
        _fix_positional(ctx, j, "sequence lengths and positions")
    if ctx.has_input(10):
        _attention_bias(ctx, 10, qh, b)
    if ctx.has_input(11):
        ctx.eq(ctx.ax_in(11, 0), qh)
    for j in (14, 15):
        if ctx.has_input(j):
            ctx.eq(ctx.ax_in(j, 0), inner)
    if ctx.has_output(3):
        ctx.eq(ctx.ax_out(3, 1), qh)


def _rotary_embedding(ctx: RuleContext, x: int, pos: int, cos: int, sin: int) -> None:
    """RoPE on [B,S,N*H] or [B,N,S,H]: whole heads permute freely; head_dim only by frequency (see
    _rotary_inner), with the cos/sin caches' columns permuted to match."""
    if ctx.attr("is_packed_batching", 0):
        ctx.refuse("RotaryEmbedding with is_packed_batching=1 is not supported", BEFORE_OPTIMIZER)
    shape = ctx.shape_in(x)
    half = ctx.shape_in(cos)[-1]
    rot = ctx.attr("rotary_embedding_dim", 0)
    inter = ctx.attr("interleaved", 0)
    for a in range(len(shape)):
        ctx.eq(ctx.ax_in(x, a), ctx.ax_out(0, a))
    if len(shape) == 4:
        ctx.eq(ctx.ax_in(x, 3), _rotary_inner(ctx, shape[3], cos, sin, inter, rot))
    else:
        n = ctx.attr("num_heads", 0) or (shape[2] // (2 * half) if isinstance(shape[2], int) and half else 0)
        hd = _heads(ctx, n, shape[2], "RotaryEmbedding input")
        ctx.structure(ctx.ax_in(x, 2), "prod", [ctx.fresh(n), _rotary_inner(ctx, hd, cos, sin, inter, rot)])
    _fix_positional(ctx, pos, "position ids")


@rule(MS + "RotaryEmbedding")
def ms_rotary_embedding(ctx: RuleContext) -> None:
    _rotary_embedding(ctx, 0, 1, 2, 3)


@rule("RotaryEmbedding")
def rotary_embedding(ctx: RuleContext) -> None:
    """ONNX's RotaryEmbedding (opset 23): the same op with inputs X, cos, sin, position_ids."""
    _rotary_embedding(ctx, 0, 3, 1, 2)


@rule(MS + "EmbedLayerNormalization", weights={2: (-1,), 3: (-1,), 4: (-1,)}, lifts={0: (2,), 1: (4,), 8: (3,)},
      reads={1: (7,)})
def ms_embed_layer_norm(ctx: RuleContext) -> None:
    """word + position + segment embedding lookups, then LayerNorm: each table's rows are indexed by position
    (pinned), its columns are the hidden space; the mask index (output 1) is a count of the public mask."""
    d = ctx.ax_out(0, 2)
    for j in (2, 3, 4):
        if ctx.has_input(j):
            ctx.fix(ctx.ax_in(j, 0), "embedding rows (looked up by id)")
            ctx.eq(ctx.ax_in(j, 1), d)
    for j in (5, 6):
        if ctx.has_input(j):
            broadcast_into(ctx, j)
    for j in (0, 1, 8):
        if ctx.has_input(j):
            _axes_pass(ctx, j, 0, range(2))
    _fix_positional(ctx, 7, "attention mask")
    if ctx.has_output(1):
        for a in range(len(ctx.shape_out(1))):
            ctx.fix(ctx.ax_out(1, a), "mask index")
    if ctx.has_output(2):
        for a in range(3):
            ctx.eq(ctx.ax_out(2, a), ctx.ax_out(0, a))


# ---- quantized ops (onnxruntime.quantization: dynamic int8, QDQ, weight-only; MatMulNBits) ----
# Permuting is exact when every per-channel scale and zero point moves with its channel; per-tensor ones have no
# axis. The quantization steps themselves are elementwise, or (DynamicQuantizeLinear) read only the min and max
# of the whole tensor, which no permutation changes.


def _params_along(ctx: RuleContext, j: int, target: int, why: str) -> None:
    """A scale/zero point input j: a scalar (or size-1) one is per tensor; a 1-D one of size > 1 is per channel
    of `target` and takes its permutation; any other layout is refused rather than guessed."""
    if not ctx.has_input(j):
        return
    shape = ctx.shape_in(j)
    if all(d == 1 for d in shape):
        return
    if len(shape) != 1:
        ctx.refuse(f"{why} of shape {shape} is neither per tensor nor one value per channel",
                   "quantize per tensor or per channel (a 1-D scale/zero point)")
    ctx.eq(ctx.ax_in(j, 0), target)


@rule("DynamicQuantizeLinear")
def dynamic_quantize_linear(ctx: RuleContext) -> None:
    """y = saturate(round(x / scale) + zero_point), with the scalar scale and zero point (outputs 1, 2) computed
    from x's min and max over the whole tensor: a permutation changes neither, and y is elementwise."""
    broadcast_into(ctx, 0)


@rule("MatMulInteger", weights={1: (-2, -1)}, heavy=True, lifts={0: (1,), 1: (0,)})
def matmul_integer(ctx: RuleContext) -> None:
    """(a - a_zero_point) @ (b - b_zero_point) in int32, exactly: a MatMul whose zero points are per tensor, per
    row of a (a 1-D a_zero_point) or per column of b (b_zero_point aligned right with b), moving with them."""
    matmul(ctx)
    a, b = ctx.shape_in(0), ctx.shape_in(1)
    if len(a) >= 2:
        _params_along(ctx, 2, ctx.ax_in(0, len(a) - 2), "MatMulInteger a_zero_point")
    elif ctx.has_input(2) and any(d != 1 for d in ctx.shape_in(2)):
        ctx.refuse("MatMulInteger with a per-row a_zero_point on a vector", "quantize a per tensor")
    if ctx.has_input(3):
        zp = ctx.shape_in(3)
        if len(zp) > len(b):
            ctx.refuse(f"MatMulInteger b_zero_point of shape {zp} has more axes than b", "quantize b per column")
        broadcast = len(zp) == 1 and len(b) >= 2  # one value per column: b's last axis
        for k, d in enumerate(zp):
            if d != 1:
                ctx.eq(ctx.ax_in(3, k), ctx.ax_in(1, len(b) - 1 if broadcast else len(b) - len(zp) + k))


@rule(MS + "DynamicQuantizeMatMul", weights={1: (-2, -1)}, heavy=True, lifts={0: (1,)})
def ms_dynamic_quantize_matmul(ctx: RuleContext) -> None:
    """A quantized per tensor from its min and max (order-invariant) @ int8 b [K, N], rescaled by b_scale and
    b_zero_point (scalars, or one per column N), plus an optional bias [N]."""
    matmul(ctx)
    n = ctx.ax_in(1, len(ctx.shape_in(1)) - 1)
    _params_along(ctx, 2, n, "DynamicQuantizeMatMul b_scale")
    _params_along(ctx, 3, n, "DynamicQuantizeMatMul b_zero_point")
    _params_along(ctx, 4, n, "DynamicQuantizeMatMul bias")


@rule(MS + "MatMulIntegerToFloat", weights={1: (-2, -1)}, heavy=True, lifts={0: (1,)})
def ms_matmul_integer_to_float(ctx: RuleContext) -> None:
    """(a - a_zp) a_scale @ (b - b_zp) b_scale + bias: a's parameters are per tensor or per column of a (its K
    axis, which b's rows share), b's per tensor or per column of b (N), as is the bias."""
    matmul(ctx)
    k = ctx.ax_in(0, len(ctx.shape_in(0)) - 1)
    n = ctx.ax_in(1, len(ctx.shape_in(1)) - 1)
    for j, target, what in ((2, k, "a_scale"), (3, n, "b_scale"), (4, k, "a_zero_point"), (5, n, "b_zero_point"),
                            (6, n, "bias")):
        _params_along(ctx, j, target, f"MatMulIntegerToFloat {what}")


def _per_tensor(ctx: RuleContext, inputs: tuple[int, ...]) -> None:
    """Scales and zero points that must be per tensor (their op requantizes every element alike)."""
    for j in inputs:
        if ctx.has_input(j) and any(d != 1 for d in ctx.shape_in(j)):
            ctx.refuse(f"{ctx.node.op_type} input {j} of shape {ctx.shape_in(j)} (not per tensor)",
                       "quantize activations per tensor")


@rule("QLinearMatMul", weights={3: (-2, -1)}, heavy=True, lifts={0: (3,), 3: (0,)})
def qlinear_matmul(ctx: RuleContext) -> None:
    """QOperator format: a (0) @ b (3) in integers, requantized per element with y's scale (6) and zero point (7):
    MatMul's rule; a's parameters (1, 2) per tensor or per row of a, b's (4, 5) per tensor or per column of b,
    y's per tensor or per row of y."""
    matmul(ctx, 0, 3)
    a, b, out = ctx.shape_in(0), ctx.shape_in(3), ctx.shape_out(0)
    for j, shape, target in ((1, a, (0, len(a) - 2)), (2, a, (0, len(a) - 2)), (4, b, (3, len(b) - 1)),
                             (5, b, (3, len(b) - 1))):
        if len(shape) < 2:
            _per_tensor(ctx, (j,))
        else:
            _params_along(ctx, j, ctx.ax_in(*target), f"QLinearMatMul input {j}")
    if len(out) < 2:
        _per_tensor(ctx, (6, 7))
    else:
        for j in (6, 7):
            _params_along(ctx, j, ctx.ax_out(0, len(out) - 2), f"QLinearMatMul input {j}")


@rule(MS + "QGemm", weights={3: (0, 1)}, heavy=True, lifts={0: (3,)})
def ms_qgemm(ctx: RuleContext) -> None:
    """Gemm on quantized A (0) and B (3) with an int32 bias C (6), requantized with y's scale (7) and zero point
    (8), or float when they are absent: a's and y's parameters per tensor, b's per tensor or per column."""
    ta, tb = ctx.attr("transA", 0), ctx.attr("transB", 0)
    a_m, a_k = (1, 0) if ta else (0, 1)
    b_k, b_n = (1, 0) if tb else (0, 1)
    ctx.eq(ctx.ax_in(0, a_k), ctx.ax_in(3, b_k))
    ctx.eq(ctx.ax_out(0, 0), ctx.ax_in(0, a_m))
    ctx.eq(ctx.ax_out(0, 1), ctx.ax_in(3, b_n))
    _per_tensor(ctx, (1, 2, 7, 8))
    for j in (4, 5):
        _params_along(ctx, j, ctx.ax_in(3, b_n), f"QGemm input {j}")
    if ctx.has_input(6):
        broadcast_into(ctx, 6)


@rule(MS + "QLinearAdd", MS + "QLinearMul")
def ms_qlinear_binary(ctx: RuleContext) -> None:
    """A (0) + or * B (3) on quantized values, requantized per element: an elementwise op whose scales and zero
    points (1, 2, 4, 5, 6, 7) are per tensor."""
    broadcast_into(ctx, 0)
    broadcast_into(ctx, 3)
    _per_tensor(ctx, (1, 2, 4, 5, 6, 7))


@rule(MS + "QLinearConcat")
def ms_qlinear_concat(ctx: RuleContext) -> None:
    """Y = concat of each X (2, 5, 8, ...) requantized from its own scale and zero point (3, 4, ...) to Y's (0, 1):
    Concat's rule on the X inputs, with every scale and zero point per tensor (its contract), so elementwise."""
    n = len(ctx.node.input)
    if n < 5 or (n - 2) % 3:
        ctx.refuse(f"QLinearConcat with {n} inputs (expected Y scale, Y zero point, then triples)",
                   "re-export the quantized model")
    _per_tensor(ctx, (0, 1, *[j for j in range(2, n) if (j - 2) % 3]))
    _concat_inputs(ctx, list(range(2, n, 3)))


@rule(MS + "QLinearSoftmax", MS + "QLinearSigmoid", MS + "QLinearLeakyRelu")
def ms_qlinear_unary(ctx: RuleContext) -> None:
    """Softmax (a row permutation commutes with it) or an activation on quantized values, with per-tensor
    scales and zero points (1 to 4)."""
    broadcast_into(ctx, 0)
    _per_tensor(ctx, (1, 2, 3, 4))


@rule("DequantizeLinear", "QuantizeLinear")
def dequantize_linear(ctx: RuleContext) -> None:
    """(x - zero_point) * scale (or its inverse, round(x / scale) + zero_point), elementwise: per-tensor
    parameters have no axes; per-axis ones (1-D, `axis`) share x's axis and take its permutation, as a bias does.
    Blocked quantization (block_size): see _blocked_quantize_linear."""
    rank = len(ctx.shape_in(0))
    broadcast_into(ctx, 0)
    axis = ctx.attr("axis", 1) % max(rank, 1)
    if ctx.attr("block_size", 0):
        _blocked_quantize_linear(ctx, axis, ctx.attr("block_size", 0))
        return
    for j in (1, 2):
        if ctx.has_input(j) and len(ctx.shape_in(j)) == 1 and ctx.shape_in(j)[0] != 1:
            ctx.eq(ctx.ax_in(j, 0), ctx.ax_in(0, axis))
        elif ctx.has_input(j) and any(d != 1 for d in ctx.shape_in(j)):
            ctx.refuse(f"{ctx.node.op_type} parameter of shape {ctx.shape_in(j)}", "quantize per tensor or per axis")


def _blocked_quantize_linear(ctx: RuleContext, axis: int, bs: int) -> None:
    """Blocked (opset 21) parameters: scale and zero point have x's shape with x's `axis` counted in blocks of
    `block_size`. That axis is blocks x values-in-block (whole blocks move, values move within their block, as in
    MatMulNBits), so every block keeps its values and its scale; the other axes are shared as they are."""
    x, d = ctx.shape_in(0), ctx.shape_in(0)[axis]
    if not isinstance(d, int) or d % bs:
        ctx.refuse(f"blocked {ctx.node.op_type} of axis {axis} (size {d}) not a whole number of blocks of {bs}",
                   "quantize with a block_size that divides that axis")
    nb = d // bs
    for j in (1, 2):
        if ctx.has_input(j) and ctx.shape_in(j) != [nb if a == axis else v for a, v in enumerate(x)]:
            ctx.refuse(f"blocked {ctx.node.op_type} parameter of shape {ctx.shape_in(j)} for input {x}",
                       "re-export the quantized model")
    if nb == 1:
        block = None
    else:
        try:
            block, _ = ctx.blocks(ctx.ax_in(0, axis), nb, bs)
        except SpaceConflict as e:
            ctx.refuse(f"axis {axis} (size {d}) is quantized in {nb} blocks of {bs}, which no permutation keeps "
                       f"whole together with the other structure of that axis ({e})",
                       "quantize with a block_size that divides the head size, or is a multiple of it")
    for j in (1, 2):
        if ctx.has_input(j):
            for a, v in enumerate(x):
                if a != axis and v != 1:
                    ctx.eq(ctx.ax_in(j, a), ctx.ax_in(0, a))
                elif a == axis and block is not None:
                    ctx.eq(ctx.ax_in(j, a), block)


@rule(MS + "MatMulNBits", weights={1: (0, 1)}, heavy=True, lifts={0: (1,)})
def ms_matmul_nbits(ctx: RuleContext) -> None:
    """A [..., K] @ B^T + bias, B stored as [N, K / block_size, block_size * bits / 8] bytes of `bits`-bit values
    with one scale (and zero point) per column and block. A permutation of K that crosses block boundaries would
    change what each block holds (requantizing is not exact), so K is blocks x values-in-block: whole blocks move,
    values move within their block (one permutation per block), and every block keeps its values, scale and zero
    point. N moves freely, with its rows of B, scales and zero points. Folding unpacks the 4-bit values."""
    k, n, bits, bs = (ctx.attr(x, 0) for x in ("K", "N", "bits", "block_size"))
    if bits not in (4, 8):
        ctx.refuse(f"MatMulNBits with bits={bits}", "quantize with bits=4 or bits=8")
    if ctx.has_input(4):
        ctx.refuse("MatMulNBits with g_idx (act-order: K is regrouped before blocking)", "quantize without act-order")
    if not bs or not k or k % bs:
        ctx.refuse(f"MatMulNBits with K={k} not a whole number of blocks of {bs} (the last block is padded)",
                   "quantize with a block_size that divides K")
    nb = k // bs
    x = ctx.shape_in(0)
    if x[-1] != k or int(np.prod(ctx.shape_in(1))) * 8 != n * k * bits:
        ctx.refuse(f"MatMulNBits weight of shape {ctx.shape_in(1)} is not N={n} x K={k} at {bits} bits",
                   "re-export the quantized model")
    ctx.view(1, Packing((n, nb, bs), bits))
    for j in (2, 3):
        if ctx.has_input(j):
            ctx.view(j, Packing((n, nb), bits if j == 3 and not ctx.is_float(j) else 8))
    out = ctx.ax_out(0, len(x) - 1)
    for a in range(len(x) - 1):
        if x[a] != 1:
            ctx.eq(ctx.ax_in(0, a), ctx.ax_out(0, a))
    if nb == 1:  # one block: the whole of K permutes freely inside it
        block, inner = None, ctx.ax_in(0, len(x) - 1)
    else:
        try:
            block, inner = ctx.blocks(ctx.ax_in(0, len(x) - 1), nb, bs)
        except SpaceConflict as e:  # e.g. heads of 12 values read in blocks of 16: a block spans parts of two heads
            ctx.refuse(f"K={k} is read in {nb} blocks of {bs}, which no permutation keeps whole together with the "
                       f"other structure of that axis ({e})",
                       "quantize with a block_size that divides the head size, or is a multiple of it")
    ctx.eq(ctx.ax_in(1, 0), out)
    ctx.eq(ctx.ax_in(1, 2), inner)
    for j in (1, 2, 3):
        if ctx.has_input(j):
            ctx.eq(ctx.ax_in(j, 0), out)
            if block is not None:
                ctx.eq(ctx.ax_in(j, 1), block)
    if ctx.has_input(5):
        ctx.eq(ctx.ax_in(5, 0), out)


def fallback(ctx: RuleContext) -> None:
    """No rule: every axis the op touches must stay unpermuted (a conflict if it is on the hidden path)."""
    ctx.fix_all(f"{ctx.node.op_type} has no permutation rule")


FALLBACK = OpContract(fallback)
# Heavy ops without a permutation rule: the client still stops before them.
for _op in ("Einsum", "Attention"):
    OPS[_op] = OpContract(fallback, heavy=True)
