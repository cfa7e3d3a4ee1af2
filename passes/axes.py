"""What each input axis means (batch, new tokens, past length, total = past + new), read from the graph.

Why: exporters name dims as they like. optimum calls the mask axis `past_sequence_length + sequence_length`, so a
name containing "past" may be the total length; torch.export calls everything s0, s1. The runtime needs the roles
to build inputs (verify's random feeds, generation's mask and positions, shape checks on user inputs), and clients
must not need the original graph, so the compiler records them in the client manifest.

Evidence used, in order: a cache input's growing axis is the past (it differs from its present output's dim); the
present's dim is the total, spelled either as its own symbol or as `past + new`; a sum of one past symbol and one
other symbol is a total; axis 0 is the batch. An image input's fully symbolic height and width are fixed by the
patch Conv and the position table after it, so they are recorded as sizes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from stip.passes.graph import Graph
from stip.runtime.axes import Role, cache_past_axis

_PASS_THROUGH = {"Cast", "Sub", "Div", "Mul", "Add", "Identity", "Reshape", "Flatten", "Transpose", "Squeeze",
                 "Unsqueeze"}


def declared_dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    """An input's declared dims: a size, a symbol (or `a + b` expression), or None for an anonymous dynamic dim."""
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _terms(d: int | str | None) -> frozenset[str] | None:
    """`past + seq` -> {past, seq}; a plain symbol -> {symbol}; sizes and constants in sums are not symbols."""
    if not isinstance(d, str):
        return None
    return frozenset(t.strip() for t in d.split("+") if t.strip() and not t.strip().isdigit())


def input_axes(g: Graph) -> dict[str, list[Role]]:
    """Roles of every graph input's axes (cache inputs included: their growing axis is "past")."""
    ins = {vi.name: declared_dims(vi) for vi in g.model.graph.input if vi.name not in g.constants}
    outs = {vi.name: declared_dims(vi) for vi in g.model.graph.output}
    past_axis = {c: cache_past_axis(ins[c], outs.get(p, [])) for c, p in g.cache}
    past: set[str] = set()
    total: set[frozenset[str]] = set()
    for c, p in g.cache:
        a = past_axis[c]
        if a is None:
            continue
        if isinstance(ins[c][a], str):
            past.add(ins[c][a])
        grown = outs.get(p, [None] * (a + 1))[a] if len(outs.get(p, [])) > a else None
        if _terms(grown):
            total.add(_terms(grown))
    images = {n: image_size(g, n) for n, dims in ins.items() if len(dims) == 4 and g.dtypes.get(n) in (1, 10, 11)}
    roles: dict[str, list[Role]] = {}
    for name, dims in ins.items():
        size = images.get(name)
        row: list[Role] = []
        for a, d in enumerate(dims):
            terms = _terms(d)
            if isinstance(d, int):
                row.append(d)
            elif name in past_axis and a == past_axis[name]:
                row.append("past")
            elif a == 0:
                row.append("batch")
            elif size is not None and a >= 1:
                row.append(size[a - 1])
            elif terms and terms <= past:
                row.append("past")
            elif terms and (terms in total or (len(terms) == 2 and len(terms & past) == 1)):
                row.append("total")
            else:
                row.append("new")
        roles[name] = row
    return roles


def image_size(g: Graph, name: str) -> tuple[int, int, int] | None:
    """(channels, height, width) an image input must have: the patch Conv's weight gives the channels; the
    position table added after the patches (minus class/distillation tokens concatenated in front) gives how
    many patches, hence the size. Without a table any size works, so four patches a side is returned."""
    conv = _first(g, name, lambda n: n.op_type == "Conv")
    if conv is None or conv.input[1] not in g.constants:
        return None
    w = g.constants[conv.input[1]]
    if w.ndim != 4:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    channels = int(w.shape[1]) * int(attrs.get("group", 1))
    kernel = [int(k) for k in w.shape[2:]]
    strides = list(attrs.get("strides", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    patches = _patch_count(g, conv.output[0])
    if patches is None:
        side = [4, 4]
    else:
        r = math.isqrt(patches)
        if r * r != patches:
            return None
        side = [r, r]
    hw = [(side[i] - 1) * strides[i] + kernel[i] - pads[i] - pads[i + 2] for i in range(2)]
    return channels, hw[0], hw[1]


def _first(g: Graph, start: str, want, limit: int = 12):
    """The first node satisfying `want` downstream of `start`, through shape-only and elementwise ops."""
    frontier, seen = [start], set()
    for _ in range(limit):
        nxt = []
        for t in frontier:
            for idx, _j in g.consumers.get(t, []):
                n = g.model.graph.node[idx]
                if want(n):
                    return n
                if n.op_type in _PASS_THROUGH and idx not in seen:
                    seen.add(idx)
                    nxt.extend(o for o in n.output if o)
        frontier = nxt
    return None


def _patch_count(g: Graph, conv_out: str) -> int | None:
    """Rows of the position table added to the patch tokens, less the tokens concatenated in front of them."""
    extra, t = 0, conv_out
    node = _first(g, t, lambda n: n.op_type in ("Concat", "Add") and _table_rows(g, n) is not None
                  or n.op_type == "Concat")
    if node is not None and node.op_type == "Concat":
        for x in node.input:
            if x and x != t and not _reaches(g, conv_out, x):
                s = g.shapes.get(x)
                if not s or len(s) < 2 or not isinstance(s[1], int):
                    return None
                extra += s[1]
        node = _first(g, node.output[0], lambda n: n.op_type == "Add" and _table_rows(g, n) is not None, 4)
    if node is None:
        return None
    rows = _table_rows(g, node)
    return None if rows is None else rows - extra


def _table_rows(g: Graph, n: onnx.NodeProto) -> int | None:
    if n.op_type != "Add":
        return None
    for x in n.input:
        c = g.constants.get(x)
        if c is not None and c.ndim == 3 and c.shape[1] > 1:
            return int(c.shape[1])
    return None


def _reaches(g: Graph, src: str, dst: str, limit: int = 12) -> bool:
    """Whether `dst`'s values are computed from `src` within a few nodes (the patch branch of the Concat; DeiT's
    class and distillation tokens are expanded to the batch read from the patches' Shape, which does not count)."""
    frontier = [dst]
    for _ in range(limit):
        if src in frontier:
            return True
        nxt = []
        for t in frontier:
            p = g.producer.get(t)
            if p is not None and g.model.graph.node[p].op_type not in ("Shape", "Size"):  # sizes are not values
                nxt.extend(x for x in g.model.graph.node[p].input if x)
        frontier = nxt
    return False


# Ops through which a table index keeps counting positions: data movement (input 0 only) and integer arithmetic.
_INDEX_DATA = {"Reshape", "Expand", "Slice", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Tile", "Transpose"}
_INDEX_ARITH = {"Cast", "Add", "Sub", "Mul", "Where", "Neg"}  # not Clip/Min/Max: clamped indices stay in the table


def is_positions_input(name: str) -> bool:
    """An input the runtime fills with positions 0, 1, ... (generate and verify feed Hugging Face's position_ids)."""
    return "position" in name.lower()


def position_table_rows(g: Graph) -> int | None:
    """The longest context the learned position tables allow (GPT-2's wpe, BERT's, OPT's offset table), or None.

    A position table is a 2-D table whose Gather indices count positions: walking back from the indices meets a
    Range (arange), a CumSum (positions counted over a mask), an integer constant 0..n-1 (BERT's position_ids
    buffer) or a positions input (optimum's GPT-2 takes position_ids, which makes them private). Tables indexed
    by token ids (the vocabulary, token types) are not. The first position's row (OPT numbers positions from 2)
    uses up the rows before it."""
    limits = []
    for n in g.model.graph.node:
        if n.op_type != "Gather" or n.input[0] not in g.constants or g.constants[n.input[0]].ndim != 2:
            continue
        if any(a.name == "axis" and a.i != 0 for a in n.attribute):
            continue
        offset = _position_offset(g, n.input[1])
        if offset is not None:
            limits.append(int(g.constants[n.input[0]].shape[0]) - offset)
    limits = [x for x in limits if x > 0]
    return min(limits) if limits else None


def sinusoid_position_table(g: Graph, n: onnx.NodeProto) -> bool:
    """A Gather into a fixed sin/cos table by positions (RoFormer's, CodeGen's rotary tables): position 0's row
    is sin 0 = 0 and cos 0 = 1, every value lies in [-1, 1]. Its feature order may stay plain: it holds no
    learned weight, only what the config determines."""
    t = g.constants.get(n.input[0])
    if t is None or t.ndim != 2 or t.dtype.kind != "f" or _position_offset(g, n.input[1]) is None:
        return False
    row0 = t[0].astype(np.float64)
    return bool(np.all(np.isclose(row0, 0) | np.isclose(row0, 1)) and np.all(np.abs(t) <= 1 + 1e-6))


def counts_positions(g: Graph, index: str) -> bool:
    """Whether `index` counts positions (M2M100's positions are counted from the token ids: not a vocabulary)."""
    return _position_offset(g, index) is not None


def _position_offset(g: Graph, index: str, depth: int = 24) -> int | None:
    """If `index` counts positions, the constant added to them on the way (0 if none); else None."""
    if depth == 0:
        return None
    if index in g.input_names:
        return 0 if is_positions_input(index) and g.dtypes.get(index) in (6, 7) else None
    c = g.constants.get(index)
    if c is not None:
        flat = c.reshape(-1, c.shape[-1]) if c.ndim else None
        ok = (flat is not None and c.dtype.kind in "iu" and flat.shape[-1] > 1
              and all((row == row[0] + range(len(row))).all() for row in flat))
        return int(flat[0, 0]) if ok else None
    p = g.producer.get(index)
    if p is None:
        return None
    node = g.model.graph.node[p]
    if node.op_type == "Range":
        return 0
    if node.op_type == "CumSum":  # an inclusive running count of a mask of ones: 1, 2, ...
        return 0 if any(a.name == "exclusive" and a.i for a in node.attribute) else 1
    if node.op_type in _INDEX_DATA:
        return _position_offset(g, node.input[0], depth - 1)
    if node.op_type not in _INDEX_ARITH:
        return None
    ins = [x for x in node.input if x]
    if node.op_type == "Where":
        ins = ins[1:]
    found = [(x, _position_offset(g, x, depth - 1)) for x in ins if x not in g.constants]
    hits = [o for _, o in found if o is not None]
    if not hits:
        return None
    scalars = [int(g.constants[x].reshape(-1)[0]) if x in g.constants and g.constants[x].size == 1
               and g.constants[x].dtype.kind in "iu" else 0 for x in ins]
    if node.op_type == "Add":
        return max(hits) + sum(scalars)
    if node.op_type == "Sub":
        return None if found[0][0] != ins[0] or found[0][1] is None else found[0][1] - sum(scalars[1:])
    return max(hits)
