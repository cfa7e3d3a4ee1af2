"""Integer values computed from shapes (Shape -> Gather -> Div -> Slice bounds), evaluated where they are static.

Why: TorchScript writes rotate_half as `x[..., : x.shape[-1] // 2]`, so the Slice bounds are computed in-graph.
Feature sizes are static even when batch and sequence are not, so partial evaluation (unknown entries are None)
recovers the bounds the Slice rule needs, without running the model.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from stip.passes.graph import Graph

_BINARY = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a // b,
    "Mod": lambda a, b: a % b,
    "Max": max,
    "Min": min,
}
_MAX_ELEMENTS = 64


def _attr(n, name, default=None):
    return next((helper.get_attribute_value(a) for a in n.attribute if a.name == name), default)


def shape_values(g: Graph) -> dict[str, np.ndarray]:
    """Fully known small integer tensors (object arrays hold None where a dim is dynamic are dropped)."""
    vals: dict[str, np.ndarray] = {}
    for name, v in g.constants.items():
        if v.dtype.kind in "iu" and v.size <= _MAX_ELEMENTS:
            vals[name] = v.astype(object)
    for n in g.model.graph.node:
        try:
            out = _eval(g, n, vals)
        except Exception:  # noqa: BLE001 - anything unusual simply stays unknown
            out = None
        if out is not None and out.size <= _MAX_ELEMENTS:
            vals[n.output[0]] = out
    return {k: v.astype(np.int64) for k, v in vals.items() if all(x is not None for x in v.reshape(-1))}


def _eval(g: Graph, n, vals: dict[str, np.ndarray]) -> np.ndarray | None:
    op = n.op_type
    if op == "Shape":
        dims = g.shapes.get(n.input[0])
        if dims is None:
            return None
        start, end = _attr(n, "start", 0), _attr(n, "end", None)
        return np.array([d if isinstance(d, int) else None for d in dims][start:end], dtype=object)
    ins = [vals.get(x) if x else None for x in n.input]
    if op in ("Cast", "Identity"):
        return ins[0]
    if ins[0] is None:
        return None
    if op == "Gather":
        if ins[1] is None or _attr(n, "axis", 0) != 0:
            return None
        return np.asarray(ins[0][ins[1].astype(np.int64)], dtype=object)
    if op == "Unsqueeze":
        return ins[0].reshape(-1) if ins[0].ndim == 0 else None
    if op == "Squeeze":
        return ins[0].reshape(()) if ins[0].size == 1 else None
    if op == "Reshape":
        return ins[0].reshape(-1) if ins[0].size <= 1 else None
    if op == "Concat":
        if any(v is None for v in ins):
            return None
        return np.concatenate([v.reshape(-1) for v in ins]).astype(object)
    if op == "Slice" and ins[0].ndim == 1:
        if ins[1] is None or ins[2] is None or any(x is None for x in list(ins[1]) + list(ins[2])):
            return None
        step = 1 if len(ins) < 5 or ins[4] is None else int(ins[4][0])
        return ins[0][int(ins[1][0]):int(ins[2][0]):step]
    if op in _BINARY and len(ins) == 2 and ins[1] is not None:
        a, b = np.broadcast_arrays(ins[0], ins[1])
        f = _BINARY[op]
        res = [None if x is None or y is None else f(int(x), int(y)) for x, y in zip(a.reshape(-1), b.reshape(-1))]
        return np.array(res, dtype=object).reshape(a.shape)
    return None
