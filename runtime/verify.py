"""`stip verify`: the original model vs pre -> server -> post on the same random inputs, in onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stip.passes.graph import Graph, load_graph
from stip.passes.partition import value_cone
from stip.runtime.bundle import LocalDeployment
from stip.runtime.sessions import make_session

INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def index_range(g: Graph, name: str) -> int:
    """How many rows the tables indexed by this input have (vocabulary, token types), so ids stay valid."""
    cone = value_cone(g, [name])
    reached = {name} | {o for i in cone for o in g.model.graph.node[i].output}
    sizes = []
    for i, n in enumerate(g.model.graph.node):
        if n.op_type == "Gather" and n.input[0] in g.constants and n.input[1] in reached:
            sizes.append(g.constants[n.input[0]].shape[int(_attr(n, "axis", 0))])
    return min(sizes) if sizes else 2


def _attr(n, name, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in n.attribute if a.name == name), default)


def random_feeds(model_path: str | Path, batch: int = 3, seq: int = 13, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the right dtypes: ids within the vocabulary, masks with padding, Gaussian floats."""
    g = load_graph(model_path)
    sess = make_session(model_path, "cpu")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else (batch if a == 0 else seq) for a, d in enumerate(inp.shape)]
        if inp.type in INT_TYPES:
            dt = INT_TYPES[inp.type]
            if "mask" in inp.name.lower():
                arr = np.ones(shape, dtype=dt)
                if len(shape) == 2 and shape[1] > 1:
                    for b in range(shape[0]):
                        arr[b, rng.integers(1, shape[1] + 1):] = 0
            else:
                arr = rng.integers(0, index_range(g, inp.name), size=shape).astype(dt)
        elif inp.type in FLOAT_TYPES:
            arr = rng.standard_normal(shape).astype(FLOAT_TYPES[inp.type])
        elif inp.type == "tensor(bool)":
            arr = np.ones(shape, dtype=bool)
        else:
            raise ValueError(f"{model_path}: input '{inp.name}' has unsupported type {inp.type}")
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

    @property
    def ok(self) -> bool:
        return self.close and self.argmax_agree == 1.0


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float, rtol: float) -> list[OutputCheck]:
    out = []
    for name, r in ref.items():
        o = got[name]
        if o.shape != r.shape:
            out.append(OutputCheck(name, tuple(o.shape), float("inf"), float("inf"), False, 0.0))
            continue
        r64, o64 = r.astype(np.float64), o.astype(np.float64)
        diff = np.abs(r64 - o64)
        rel = diff / np.maximum(np.abs(r64), 1e-12)
        agree = float(np.mean(r.argmax(-1) == o.argmax(-1))) if r.ndim >= 1 and r.shape[-1] > 1 else 1.0
        out.append(OutputCheck(name, tuple(r.shape), float(diff.max(initial=0.0)), float(rel.max(initial=0.0)),
                               bool(np.allclose(o64, r64, atol=atol, rtol=rtol)), agree))
    return out


def verify(bundle_dir: str | Path, original: str | Path, *, batch: int = 3, seq: int = 13, seed: int = 0,
           atol: float = 1e-4, rtol: float = 1e-4, device: str = "auto") -> list[OutputCheck]:
    feeds = random_feeds(original, batch, seq, seed)
    sess = make_session(original, device)
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    got = LocalDeployment(bundle_dir, device).run(feeds)
    return compare(ref, got, atol, rtol)
