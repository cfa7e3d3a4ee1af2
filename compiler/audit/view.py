"""The server's view of a bundle (its graph and the traffic users send) and the attacker's reference weights,
aligned to the server graph node by node.

Why structure, not names: the server graph is the original's server nodes, copied in order, so the k-th server
node corresponds to the k-th server node of the reference's own partition; initializer names are renamed by the
compiler and may differ between exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from stip.compiler.keys import read_key
from stip.passes.errors import StipError
from stip.runtime.bundle_format import CACHE_SHAPE_SUFFIX, Layout, Manifest, is_cache_input, model_key_id
from stip.runtime.cache import empty_past
from stip.runtime.sessions import make_session

FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclass
class View:
    """What the server holds, plus the developer key (used only to score the attacks)."""

    path: Path
    manifest: Manifest
    server: onnx.ModelProto
    pre: object  # onnxruntime session of client/pre.onnx (runs the users' side to make traffic)
    key: dict[str, np.ndarray]
    token_input: str | None
    vocab: int

    def weights(self) -> dict[str, np.ndarray]:
        base = str(Layout(self.path).server_dir)
        return {t.name: numpy_helper.to_array(t, base_dir=base) for t in self.server.graph.initializer}


def load_view(bundle: str | Path) -> View:
    d = Path(bundle)
    lay = Layout(d)
    for f in (lay.manifest, lay.server_model, lay.pre):
        if not f.is_file():
            raise StipError(f"{d}: not a stip bundle (missing {f.relative_to(d)})")
    if not lay.key.is_file():
        raise StipError(f"{lay.key}: missing; the audit scores each attack against the developer key, so run it "
                        "where the bundle was compiled")
    man = Manifest.read(lay.manifest)
    key_id, key = read_key(lay.key)
    server_id = model_key_id(lay.server_model)
    if key_id != man.key_id or server_id != man.key_id:
        raise StipError(f"{lay.key}: key id {key_id} does not match the bundle's {man.key_id} (server {server_id})")
    server = onnx.load(str(lay.server_model), load_external_data=False)
    tokens = [n for n in man.private if n in man.vocab_size and "type" not in n.lower()]
    token = tokens[0] if tokens else None
    return View(d, man, server, make_session(lay.pre, "cpu"), key, token, man.vocab_size.get(token, 0) if token else 0)


@dataclass
class Reference:
    """The attacker's weights, analysed by the compiler's own solver and partitioned as the bundle was."""

    path: Path
    graph: object  # stip.passes.graph.Graph
    sol: object    # stip.passes.solve.Solution
    part: object   # stip.passes.partition.Partition
    pre: object    # onnxruntime session: the reference's own pre graph (identity permutations)
    server: onnx.ModelProto  # the reference's server graph, unpermuted, node k <-> bundle server node k

    def hidden(self) -> int | None:
        return next((c for c, n in self.sol.permuted.items() if n == "hidden"), None)


def load_reference(path: str | Path, view: View) -> Reference:
    from stip.compiler.pipeline import analyse
    from stip.passes.build import build
    from stip.passes.permute import draw

    p = Path(path)
    if not p.is_file():
        raise StipError(f"--reference {p}: no such file")
    man = view.manifest
    try:
        a = analyse(p, man.private, man.public or None, head=man.head)
    except StipError as e:
        raise StipError(f"--reference {p}: cannot analyse it like the bundle's model ({e})") from None
    g, sol, part = a.graph, a.solution, a.partition
    nodes = g.model.graph.node
    srv = view.server.graph.node
    if len(part.server_nodes) != len(srv):
        raise StipError(f"--reference {p}: its server part has {len(part.server_nodes)} nodes, the bundle's server "
                        f"graph {len(srv)}; give a model of the same architecture and export")
    inits = {t.name: list(t.dims) for t in view.server.graph.initializer}
    for k, i in enumerate(part.server_nodes):
        a_, b = srv[k], nodes[i]
        if a_.op_type != b.op_type or len(a_.input) != len(b.input):
            raise StipError(f"--reference {p}: node {k} of the server part is {b.op_type} '{b.name}', the bundle's "
                            f"is {a_.op_type} '{a_.name}'; give a model of the same architecture and export")
        for j, x in enumerate(b.input):
            if x in g.constants and list(g.constants[x].shape) != inits.get(a_.input[j], list(g.constants[x].shape)):
                raise StipError(f"--reference {p}: weight {j} of {b.op_type} node '{b.name}' has shape "
                                f"{list(g.constants[x].shape)}, the bundle's {inits[a_.input[j]]}")
    ident = draw(sol, np.arange)
    bundle = build(g, sol, ident, part, "reference")
    return Reference(p, g, sol, part, make_session(bundle.pre.SerializeToString(), "cpu"), bundle.server)


def run_pre(session, manifest: Manifest, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A client's pre on a prompt batch with an empty KV cache: the tensors it would send to the server."""
    batch = next(iter(feeds.values())).shape[0]
    pre_in = {}
    for i in session.get_inputs():
        if i.name.endswith(CACHE_SHAPE_SUFFIX) and i.name not in feeds:
            dims = manifest.cache_dims[i.name[: -len(CACHE_SHAPE_SUFFIX)]]
            pre_in[i.name] = np.array([batch if a == 0 else (0 if d is None else d) for a, d in enumerate(dims)],
                                      dtype=np.int64)
        else:
            pre_in[i.name] = feeds[i.name]
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, pre_in)))


def truncated(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """Only the nodes that compute `outputs` (the first layers), so probing them never runs the whole model."""
    needed, keep = set(outputs), []
    for n in reversed(model.graph.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(x for x in n.input if x)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in model.graph.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    ins = [i for i in model.graph.input if i.name in needed]
    del g.input[:]
    g.input.extend(ins)
    del g.output[:]
    g.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in outputs)
    return m


class Probe:
    """Runs a (truncated) server graph with an empty cache and returns the probed activations."""

    def __init__(self, model: onnx.ModelProto, outputs: list[str], base_dir: Path | None = None):
        m = truncated(model, outputs)
        if base_dir is not None:
            onnx.load_external_data_for_model(m, str(base_dir))
        self.outputs = outputs
        self.session = make_session(m.SerializeToString(), "cpu")
        self.inputs = self.session.get_inputs()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = next(iter(feeds.values())).shape[0]
        fed = {i.name: feeds[i.name] if i.name in feeds or not is_cache_input(i.name) else empty_past(i, batch)
               for i in self.inputs}
        return dict(zip(self.outputs, self.session.run(self.outputs, fed)))
