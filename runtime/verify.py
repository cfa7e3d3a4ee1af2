"""`stip verify`: the original model vs pre -> server -> post on the same random inputs, in onnxruntime.

A developer tool, not part of a client: it reads the original graph, so it imports stip.passes, but only inside
the functions that need it, so that importing the runtime never loads the compiler's passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stip.runtime.axes import Role, size
from stip.runtime.bundle import LocalDeployment
from stip.runtime.errors import StipError
from stip.runtime.sessions import exact_math, make_session, run

if TYPE_CHECKING:
    from stip.passes.graph import Graph

INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def index_range(g: Graph, name: str) -> int:
    """How many rows the tables indexed by this input have (vocabulary, token types), so ids stay valid. A position
    table indexed by positions counted from the ids (M2M100's) is not one."""
    from stip.passes.axes import counts_positions
    from stip.passes.partition import value_cone

    cone = value_cone(g, [name])
    reached = {name} | {o for i in cone for o in g.model.graph.node[i].output}
    sizes = []
    for i, n in enumerate(g.model.graph.node):
        if n.op_type == "Gather" and n.input[1] in reached and _is_table(g, n.input[0]) \
                and not counts_positions(g, n.input[1]):
            rows = g.shapes[n.input[0]][int(_attr(n, "axis", 0))]
            if isinstance(rows, int):
                sizes.append(rows)
    return min(sizes) if sizes else 2


def _is_table(g: Graph, name: str) -> bool:
    """A constant, or computed from constants only (an int8 table dequantized before the Gather)."""
    if name in g.constants:
        return True
    p = g.producer.get(name)
    return p is not None and all(_is_table(g, x) for x in g.model.graph.node[p].input if x)


def _attr(n, name, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in n.attribute if a.name == name), default)


def random_feeds(model_path: str | Path, batch: int = 3, seq: int = 13, seed: int = 0,
                 past: int = 0, axes: dict[str, list[Role]] | None = None, session=None,
                 graph=None) -> dict[str, np.ndarray]:
    """Inputs of the right dtypes and sizes: ids within the vocabulary, masks with padding, positions after the
    cache, Gaussian floats (and a random KV cache of `past` positions for decoders exported with one).

    Sizes follow each axis's role (`axes`, from the bundle's manifest, else read from the graph): batch, `seq` new
    tokens, `past` cached ones, a total of past + seq, or a size the model requires (an image's height)."""
    from stip.passes.graph import load_graph

    g = graph if graph is not None else load_graph(model_path)  # a caller's graph: shapes inferred once
    if axes is None:
        from stip.passes.axes import input_axes

        axes = input_axes(g)
    sess = session or make_session(model_path, "cpu")  # a caller's session: the model is not loaded twice
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in sess.get_inputs():
        roles = axes.get(inp.name) or ["batch"] + ["new"] * (len(inp.shape) - 1)
        shape = [d if isinstance(d, int) else size(r, batch, seq, past) for d, r in zip(inp.shape, roles)]
        if inp.type in INT_TYPES:
            dt = INT_TYPES[inp.type]
            if "position" in inp.name.lower():
                arr = np.broadcast_to(np.arange(past, past + shape[-1]), shape).astype(dt)
            elif "mask" in inp.name.lower():
                arr = np.ones(shape, dtype=dt)
                if len(shape) == 2 and shape[1] > 1:
                    for b in range(shape[0]):  # right padding, never hiding the whole row
                        arr[b, rng.integers(max(1, past + 1), shape[1] + 1):] = 0
            else:
                arr = rng.integers(0, index_range(g, inp.name), size=shape).astype(dt)
        elif inp.type in FLOAT_TYPES:
            arr = rng.standard_normal(shape).astype(FLOAT_TYPES[inp.type])
        elif inp.type == "tensor(bool)":
            arr = np.ones(shape, dtype=bool)
        else:
            raise StipError(f"{model_path}: input '{inp.name}' has unsupported type {inp.type}")
        feeds[inp.name] = arr
    return feeds


@dataclass
class OutputCheck:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    close: bool
    argmax_agree: float
    scale: float = 0.0  # max |original output|: lets a caller judge the difference relative to the output

    @property
    def ok(self) -> bool:
        return self.close and self.argmax_agree == 1.0


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float, rtol: float) -> list[OutputCheck]:
    out = []
    for name, r in ref.items():
        o = got[name]
        if o.shape != r.shape:
            out.append(OutputCheck(name, tuple(o.shape), float("inf"), float("inf"), False, 0.0,
                                   float(np.abs(r.astype(np.float64)).max(initial=0.0))))
            continue
        r64, o64 = r.astype(np.float64), o.astype(np.float64)
        diff = np.abs(r64 - o64)
        rel = diff / np.maximum(np.abs(r64), 1e-12)
        agree = float(np.mean(r.argmax(-1) == o.argmax(-1))) if r.ndim >= 1 and r.shape[-1] > 1 else 1.0
        out.append(OutputCheck(name, tuple(r.shape), float(diff.max(initial=0.0)), float(rel.max(initial=0.0)),
                               bool(np.allclose(o64, r64, atol=atol, rtol=rtol)), agree,
                               float(np.abs(r64).max(initial=0.0))))
    return out


def verify(bundle_dir: str | Path, original: str | Path, *, batch: int = 3, seq: int = 13, seed: int = 0,
           atol: float = 1e-4, rtol: float = 1e-4, device: str = "auto", past: int = 0) -> list[OutputCheck]:
    """For decoders with a cache, the cache is first built by a prefill of `past` tokens through each side
    (the server keeps its permuted copy), then both run the same `seq` new tokens.

    The original and the bundle run one after the other, each session freed before the next is loaded, so
    peak memory is one model, not two: the same inputs reach both, and every output of the last step is compared.
    A model whose weights pass runtime.segmented.SEGMENT_BYTES (CPU) runs a segment of nodes at a time, so peak
    memory is one segment's weights, whatever the model's size."""
    from stip.runtime.widen import widened_on_cpu

    with exact_math(), widened_on_cpu(bundle_dir, original, device) as (bundle_dir, original):
        return _verify(bundle_dir, original, batch, seq, seed, atol, rtol, device, past)


def _verify(bundle_dir, original, batch: int, seq: int, seed: int, atol: float, rtol: float, device: str,
            past: int) -> list[OutputCheck]:
    from stip.passes.graph import load_graph
    from stip.runtime.bundle_format import CLIENT_MANIFEST, Manifest, find_client_dir
    from stip.runtime.segmented import session_for

    manifest = Manifest.read(find_client_dir(bundle_dir) / CLIENT_MANIFEST)
    cached = bool(manifest.cache)
    cache_inputs = {p for p, _ in manifest.cache}
    sess = session_for(original, device)  # in segments of bounded memory when the model is large
    same_interface(manifest, sess, original, bundle_dir)
    steps = ((past, 0), (seq, past)) if cached else ((seq, 0),)
    graph = load_graph(original)  # one symbolic shape inference for every step's inputs
    feeds = [{k: v for k, v in random_feeds(original, batch, length, seed + i, past=start, axes=manifest.axes,
                                            session=sess, graph=graph).items() if k not in cache_inputs}
             for i, (length, start) in enumerate(steps) if length]
    ref = _run_original(sess, original, _as_fed(sess, feeds, steps, manifest.fixed_inputs), cached, batch)
    del sess
    got = _run_bundle(bundle_dir, device, feeds, cached, batch)
    return compare(ref, got, atol, rtol)


def _as_fed(sess, feeds: list[dict], steps, fixed: dict[str, bool]) -> list[dict]:
    """The original's feeds as its own callers give them: a merged decoder's condition selects the first-token
    branch while the past is empty and the with-past branch after, so the bundle (the with-past branch throughout)
    is checked against the first-token branch too."""
    if not fixed:
        return feeds
    shapes = {i.name: [d if isinstance(d, int) else 1 for d in i.shape] for i in sess.get_inputs()}
    starts = [start for length, start in steps if length]
    return [{**{k: x for k, x in f.items() if k not in fixed},
             **{n: np.full(shapes[n], v if start else not v, dtype=bool) for n, v in fixed.items() if n in shapes}}
            for f, start in zip(feeds, starts)]


def _run_original(sess, original, feeds: list[dict], cached: bool, batch: int) -> dict[str, np.ndarray]:
    if not cached:
        return dict(zip([o.name for o in sess.get_outputs()], run(sess, None, feeds[-1], str(original))))
    from stip.runtime.generate import CachedSession

    plain = CachedSession(sess, batch)
    out: dict[str, np.ndarray] = {}
    for f in feeds:
        out = plain.run(f)
    return out


def _run_bundle(bundle_dir, device, feeds: list[dict], cached: bool, batch: int) -> dict[str, np.ndarray]:
    from stip.runtime.segmented import session_for

    dep = LocalDeployment(bundle_dir, device, server_session=lambda path: session_for(path, device))
    if not cached:
        return dep.run(feeds[-1])
    from stip.runtime.generate import CachedSession

    stip = CachedSession(dep.server.session, batch)
    out: dict[str, np.ndarray] = {}
    for f in feeds:
        to_server, kept = dep.client.prepare(f, stip.past_length)
        out = dep.client.finish(stip.run(to_server), kept)
    return out


def same_interface(manifest, sess, original: str | Path, bundle_dir: str | Path) -> None:
    """`--original` must be the model the bundle was compiled from: same inputs, the bundle's outputs."""
    cache = {c for c, _ in manifest.cache}
    ins = [i.name for i in sess.get_inputs() if i.name not in cache and i.name not in manifest.fixed_inputs]
    outs = {o.name for o in sess.get_outputs()}
    want = manifest.inputs
    if set(ins) != set(want) or not set(manifest.outputs) <= outs:
        raise StipError(f"{original}: not the model {bundle_dir} was compiled from (its inputs are "
                        f"{', '.join(ins) or 'none'}; the bundle's are {', '.join(want)}; outputs "
                        f"{', '.join(sorted(outs))} vs {', '.join(manifest.outputs)}); pass the .onnx given "
                        "to `stip compile`")
    for i in sess.get_inputs():
        roles = manifest.axes.get(i.name)
        if roles is None:
            continue
        static = [a for a, (d, r) in enumerate(zip(i.shape, roles)) if isinstance(d, int) and isinstance(r, int)
                  and d != r]
        if len(roles) != len(i.shape) or static:
            raise StipError(f"{original}: input '{i.name}' has shape {list(i.shape)}, but the bundle was compiled "
                            f"for {roles}; pass the .onnx given to `stip compile`")
