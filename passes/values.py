"""Integer values computed from shapes (Shape -> Gather -> Div -> Slice bounds), evaluated where they are static.

Why: TorchScript writes rotate_half as `x[..., : x.shape[-1] // 2]`, so the Slice bounds are computed in-graph.
Feature sizes are static even when batch and sequence are not, so partial evaluation (unknown entries are None)
recovers the bounds the Slice rule needs, without running the model.

Dynamic dims are kept too, as symbolic products `(coefficient, (symbol, ...))` (see rules._factors): a Reshape
target built at run time from `Shape(x)[0], Shape(x)[1], 4, -1` is then still known up to the symbols, which is
all Reshape's grouping needs when shape inference lost the output dims.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from stip.passes.graph import Graph
from stip.passes.rules import _factors, _mul

_MAX_ELEMENTS = 64
Sym = tuple[int, tuple[str, ...]]  # a dynamic dim as a product: (coefficient, symbolic factors)


def _attr(n, name, default=None):
    return next((helper.get_attribute_value(a) for a in n.attribute if a.name == name), default)


def shape_values(g: Graph) -> dict[str, np.ndarray]:
    """Fully known small integer tensors."""
    return {k: v.astype(np.int64) for k, v in symbolic_values(g).items()
            if all(isinstance(x, int) for x in v.reshape(-1))}


def symbolic_values(g: Graph) -> dict[str, np.ndarray]:
    """Small integer tensors as object arrays: entries are ints, symbolic dims (Sym), or None where unknown."""
    vals: dict[str, np.ndarray] = {}
    for name, v in g.constants.items():
        if v.dtype.kind in "iu" and v.size <= _MAX_ELEMENTS:
            vals[name] = np.array([int(x) for x in v.reshape(-1)], dtype=object).reshape(v.shape)
    for n in g.model.graph.node:
        try:
            out = _eval(g, n, vals)
        except Exception:  # noqa: BLE001 - anything unusual simply stays unknown
            out = None
        if out is not None and out.size <= _MAX_ELEMENTS:
            vals[n.output[0]] = out
    return vals


def sym_dim(d) -> int | Sym:
    """A shape dim as an int or a symbolic product."""
    if isinstance(d, int):
        return d
    f = _factors(d)
    return f[0] if not f[1] else f


def _num(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sym_binary(op: str, x, y):
    if x is None or y is None:
        return None
    if _num(x) and _num(y):
        return _BINARY[op](x, y)
    fx = (x, ()) if _num(x) else x
    fy = (y, ()) if _num(y) else y
    if op == "Mul":
        r = _mul(fx, fy)
        return r[0] if not r[1] else r
    if op == "Div" and fy[0] and fx[0] % fy[0] == 0:
        rest = list(fx[1])
        for s in fy[1]:
            if s not in rest:
                return None
            rest.remove(s)
        r = (fx[0] // fy[0], tuple(rest))
        return r[0] if not r[1] else r
    if op in ("Add", "Sub") and _num(y) and y == 0:
        return x
    if op == "Add" and _num(x) and x == 0:
        return y
    return None


_BINARY = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a // b,
    "Mod": lambda a, b: a % b,
    "Max": max,
    "Min": min,
}


def _obj(items, shape=None) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out if shape is None else out.reshape(shape)


def _eval(g: Graph, n, vals: dict[str, np.ndarray]) -> np.ndarray | None:
    op = n.op_type
    if op == "Shape":
        dims = g.shapes.get(n.input[0])
        if dims is None:
            return None
        start, end = _attr(n, "start", 0), _attr(n, "end", None)
        return _obj([sym_dim(d) for d in dims][start:end])
    ins = [vals.get(x) if x else None for x in n.input]
    if op in ("Cast", "Identity"):
        return ins[0]
    if ins[0] is None:
        return None
    if op == "Gather":
        if ins[1] is None or ins[0].ndim != 1 or _attr(n, "axis", 0) != 0:
            return None
        if not all(_num(i) for i in ins[1].reshape(-1)):
            return None
        idx = np.array([int(i) for i in ins[1].reshape(-1)], dtype=np.int64).reshape(ins[1].shape)
        flat = [ins[0].reshape(-1)[i] for i in idx.reshape(-1)]
        return _obj(flat, idx.shape)
    if op == "Unsqueeze":
        return ins[0].reshape(-1) if ins[0].ndim == 0 else None
    if op == "Squeeze":
        return ins[0].reshape(()) if ins[0].size == 1 else None
    if op == "Reshape":
        return ins[0].reshape(-1) if ins[0].size <= 1 else None
    if op == "Concat":
        if any(v is None for v in ins):
            return None
        return _obj([x for v in ins for x in v.reshape(-1)])
    if op == "Slice" and ins[0].ndim == 1:
        if ins[1] is None or ins[2] is None or not all(_num(x) for x in list(ins[1]) + list(ins[2])):
            return None
        step = 1 if len(ins) < 5 or ins[4] is None else int(ins[4][0])
        return ins[0][int(ins[1][0]):int(ins[2][0]):step]
    if op in _BINARY and len(ins) == 2 and ins[1] is not None:
        a, b = np.broadcast_arrays(ins[0], ins[1])
        res = [_sym_binary(op, x, y) for x, y in zip(a.reshape(-1), b.reshape(-1))]
        return _obj(res, a.shape)
    return None
