"""Load an ONNX model into a form the solver can reason about.

Why: exporters hide constants in Constant nodes and Identity chains, and the solver needs every tensor's rank and
(symbolic) dims. We normalise once here so that every later pass sees initializers and shapes in one place.
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from stip.passes.errors import StipError
from stip.passes.merged import MergedIf, specialise_merged
from stip.passes.state import pair_cache
from stip.passes.tensors import Constants, external_tensor, is_external, load_structure

Dim = int | str  # a static size, or a symbolic name for a dynamic axis


@dataclass
class Graph:
    """A normalised model: constants are numpy arrays, every tensor has a shape (dims may be symbolic)."""

    model: onnx.ModelProto
    path: Path
    constants: MutableMapping[str, np.ndarray]  # passes.tensors.Constants: external weights memory-mapped
    shapes: dict[str, list[Dim]]
    dtypes: dict[str, int]
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    cache: list[tuple[str, str]] = field(default_factory=list)  # (past input, present output) pairs
    merged: MergedIf | None = None  # a merged decoder's If, specialised on its with-past branch (passes/merged.py)
    # Server-held tensors that come from or go to another file of a multi-file model (passes/multifile.py): an
    # encoder's last_hidden_state, a prefill's presents, a with-past decoder's cross-attention cache. Like the
    # cache, they stay permuted on the server and never reach the client.
    held_in: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)

    @property
    def state_inputs(self) -> set[str]:
        """Inputs the server fills from its own state (cache inputs and held inputs), never the client."""
        return {i for i, _ in self.cache} | set(self.held_in)

    @property
    def state_outputs(self) -> set[str]:
        """Outputs the server keeps (cache outputs and held outputs), never returned to the client."""
        return {o for _, o in self.cache} | set(self.held_out)

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.model.graph.node)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.model.graph.input if i.name not in self.constants]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def node_label(self, idx: int) -> str:
        n = self.model.graph.node[idx]
        return f"{n.op_type} node '{n.name or n.output[0]}'"

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def index(self) -> None:
        self.producer = {}
        self.consumers = {}
        for i, n in enumerate(self.model.graph.node):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for j, x in enumerate(n.input):
                if x:
                    self.consumers.setdefault(x, []).append((i, j))


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read the graph without pulling external weights into the protobuf (they are read per tensor later)."""
    p = Path(path)
    if not p.exists():
        raise StipError(f"{p}: no such file")
    if p.is_dir():
        raise StipError(f"{p}: is a directory, expected an .onnx file")
    try:
        model = load_structure(p)  # inline weights of a large file stay in it, mapped per tensor when read
    except Exception as e:  # protobuf raises several unrelated types for junk input
        raise StipError(f"{p}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not model.graph.node:
        raise StipError(f"{p}: not an ONNX model (no graph nodes; is the file truncated or of another format?)")
    return model


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn Constant nodes into initializers and bypass Identity nodes over constants.

    TorchScript shares byte-identical weights through Identity nodes; resolving them lets each consumer of a
    shared weight get its own permuted copy later.
    """
    g = model.graph
    init_names = {t.name for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    alias: dict[str, str] = {}
    keep: list[onnx.NodeProto] = []
    for n in g.node:
        n.input[:] = [alias.get(x, x) for x in n.input]
        if n.op_type == "Constant" and n.output[0] not in graph_outputs:
            value = _constant_value(n)
            if value is not None:
                g.initializer.append(numpy_helper.from_array(value, n.output[0]))
                init_names.add(n.output[0])
                continue
        if n.op_type == "Identity" and n.input[0] in init_names and n.output[0] not in graph_outputs:
            alias[n.output[0]] = n.input[0]
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    # Initializers listed as graph inputs (old exporters) are constants, not user inputs.
    inputs = [i for i in g.input if i.name not in init_names]
    del g.input[:]
    g.input.extend(inputs)
    return model


def _tensor_array(t: onnx.TensorProto, path: Path) -> np.ndarray:
    if is_external(t):  # validated (location, length, truncation) and read by passes/tensors.py
        return np.array(external_tensor(t, path).load())
    try:
        return numpy_helper.to_array(t, base_dir=str(path.parent))
    except (FileNotFoundError, OSError) as e:
        raise StipError(f"{path}: external data of initializer '{t.name}' cannot be read ({e})")
    except Exception as e:
        raise StipError(f"{path}: initializer '{t.name}' is unreadable ({str(e).splitlines()[0][:120]})")


def _skeleton(model: onnx.ModelProto, path: Path, big: int = 4096) -> onnx.ModelProto:
    """A self-contained copy without large weights (they become typed inputs), for checking and shape inference.

    Why: the checker and shape inference then never copy or re-read the weights, which keeps compile time and
    peak memory near one copy of the model.
    """
    g = model.graph
    small, large = [], []
    for t in g.initializer:
        (small if int(np.prod(t.dims)) <= big else large).append(t)
    sk = helper.make_model(
        helper.make_graph(
            list(g.node),
            g.name or "graph",
            list(g.input) + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in large],
            list(g.output),
            [numpy_helper.from_array(_tensor_array(t, path), t.name) for t in small],
        ),
        opset_imports=list(model.opset_import),
    )
    sk.ir_version = model.ir_version
    for f in model.functions:
        sk.functions.append(f)
    return sk


def _light(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without initializers: weights live as numpy arrays in Graph.constants from here on."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.producer_name = model.producer_name
    m.producer_version = model.producer_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.metadata_props.extend(model.metadata_props)
    g = model.graph
    m.graph.name = g.name
    m.graph.node.extend(g.node)
    m.graph.input.extend(g.input)
    m.graph.output.extend(g.output)
    return m


def _dims(vi: onnx.ValueInfoProto) -> tuple[list[Dim] | None, int]:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None, tt.elem_type
    out: list[Dim] = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(f"?{vi.name}:{i}")
    return out, tt.elem_type


@functools.cache
def _symbolic_shape_inference():
    """ORT's symbolic shape inference, loaded from its file (importing `onnxruntime.tools` pulls in torch), with
    each op handler guarded: one that crashes (a TypeError in `_infer_Expand` on sentence-transformers exports)
    keeps the ONNX shape of that node, which inference computed just before, and the rest stays symbolic."""
    import importlib.util

    import onnxruntime

    path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
    spec = importlib.util.spec_from_file_location("stip_symbolic_shape_infer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.logger.setLevel("ERROR")  # its "Unable to determine if a <= b, treat as equal" is not the user's concern

    class Guarded(mod.SymbolicShapeInference):
        def __init__(self, *args):
            super().__init__(*args)
            self.stip_failures: list[str] = []
            # Opset 18 moved every Reduce op's axes to an input, as ReduceSum did at 13; the tool only knows
            # ReduceSum/Mean, so a ReduceL2 (sentence-transformers' Normalize) lost its shape and Expand crashed.
            for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMin",
                       "ReduceSumSquare"):
                self.dispatcher_.setdefault(op, self._infer_ReduceMean)
            # onnxruntime's own fusions of dynamic int8 (session graph optimization) lack handlers: a MatMul on
            # the quantized inputs, whose float output takes A's type, or the scale's for MatMulIntegerToFloat.
            self.dispatcher_.setdefault("DynamicQuantizeMatMul", self._infer_MatMul)
            self.dispatcher_.setdefault("MatMulIntegerToFloat", lambda node: self._compute_matmul_shape(
                node, self.known_vi_[node.input[2]].type.tensor_type.elem_type))
            for op in ("QLinearSoftmax", "QLinearSigmoid", "QLinearLeakyRelu"):  # QOperator's elementwise ops
                self.dispatcher_.setdefault(op, self._pass_on_shape_and_type)
            self.dispatcher_.setdefault("QGemm", self._stip_qgemm)
            for op in ("QLinearAdd", "QLinearMul"):  # the tool's handler leaves a merged symbolic dim unknown
                self.dispatcher_[op] = self._stip_qlinear_binary
            self.dispatcher_.setdefault("QLinearConcat", self._stip_qlinear_concat)
            for op, handler in list(self.dispatcher_.items()):
                self.dispatcher_[op] = self._guard(op, handler)

        def _stip_qgemm(self, node):
            """QGemm: Gemm's [M, N], quantized like y's zero point (input 8), else float."""
            from onnx import TensorProto, helper

            a, b = self._get_shape(node, 0), self._get_shape(node, 3)
            attrs = {x.name: x.i for x in node.attribute}
            shape = [a[1 if attrs.get("transA") else 0], b[0 if attrs.get("transB") else 1]]
            zp = node.input[8] if len(node.input) > 8 and node.input[8] else None
            dtype = self.known_vi_[zp].type.tensor_type.elem_type if zp else TensorProto.FLOAT
            self.known_vi_[node.output[0]].CopyFrom(helper.make_tensor_value_info(node.output[0], dtype, shape))

        def _stip_qlinear_binary(self, node):
            """QLinearAdd/Mul: A (0) and B (3) broadcast; two symbolic dims that must agree merge into A's."""
            from onnx import helper

            a, b = self._get_shape(node, 0), self._get_shape(node, 3)
            shape = self._broadcast_shapes(a, b)
            for i in range(1, len(shape) + 1):
                if shape[-i] is None:
                    shape[-i] = a[-i] if i <= len(a) else b[-i]
            dtype = self.known_vi_[node.input[0]].type.tensor_type.elem_type
            self.known_vi_[node.output[0]].CopyFrom(helper.make_tensor_value_info(node.output[0], dtype, shape))

        def _stip_qlinear_concat(self, node):
            """QLinearConcat (QOperator's KV cache): Concat of its data inputs 2, 5, 8, ... (the rest are scales)."""
            data = [node.input[j] for j in range(2, len(node.input), 3)]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            self._infer_Concat(helper.make_node("Concat", data, list(node.output), axis=axis))

        def _guard(self, op, handler):
            def run(node):
                try:
                    handler(node)
                except Exception as e:  # noqa: BLE001 - the third-party handler's bug, reported by the caller
                    self.stip_failures.append(f"{op} node '{node.name or node.output[0]}': {type(e).__name__}"
                                              f"{_crash_site(e)}: {str(e).splitlines()[0][:120] if str(e) else ''}")
            return run

        @staticmethod
        def infer_shapes(model, int_max=2**31 - 1, auto_merge=False, guess_output_rank=False, verbose=0):
            """Like the original, plus the list of guarded failures; never writes a temp file."""
            if (mod.get_opset(model) or 0) < 7:
                return None, []
            s = Guarded(int_max, auto_merge, guess_output_rank, verbose)
            done = False
            try:
                s._preprocess(model)
                while s.run_:
                    done = s._infer_impl()
                s._update_output_from_vi()
                if not done:
                    raise RuntimeError("incomplete symbolic shape inference")
            except Exception as e:
                e.stip_failures = s.stip_failures  # a guarded crash often causes the later one: report both
                raise
            return s.out_mp_, s.stip_failures

    return Guarded


def infer_shapes(sk: onnx.ModelProto, path: Path, initializers,
                 warnings: list[str] | None = None) -> tuple[dict[str, list[Dim]], dict[str, int]]:
    """Symbolic shapes for every tensor; ORT's symbolic inference follows Shape->Gather->Concat->Reshape chains.

    When one of its op handlers crashes, that node keeps its ONNX shape; when the whole inference fails, plain
    ONNX inference takes over and loses dims. Either is said in `warnings`, since lost dims can pin spaces."""
    failures: list[str] = []
    try:
        inferred, failures = _symbolic_shape_inference().infer_shapes(sk, auto_merge=True, guess_output_rank=True)
        why = "it gave no result"
    except Exception as e:  # noqa: BLE001 - any crash of the third-party inference falls back
        inferred = None
        failures = getattr(e, "stip_failures", [])
        why = f"it crashed with {type(e).__name__}{_crash_site(e)}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if failures and warnings is not None:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        warnings.append(f"onnxruntime's symbolic shape inference crashed on {failures[0]}{more}; those nodes "
                        "keep ONNX's shapes, which may lose dynamic dims")
    if inferred is None:
        if warnings is not None:
            warnings.append(f"onnxruntime's symbolic shape inference failed ({why}); fell back to ONNX shape "
                            "inference, which may lose dynamic dims")
        try:
            inferred = onnx.shape_inference.infer_shapes(sk, data_prop=True)
        except Exception as e:
            raise StipError(f"{path}: shape inference failed: {str(e).splitlines()[0][:200]}")
    shapes: dict[str, list[Dim]] = {}
    dtypes: dict[str, int] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        s, t = _dims(vi)
        if s is not None:
            shapes[vi.name] = s
        dtypes[vi.name] = t
    for t in initializers:
        shapes[t.name] = [int(d) for d in t.dims]
        dtypes[t.name] = t.data_type
    return shapes, dtypes


def _crash_site(e: BaseException) -> str:
    """' in _infer_Expand': the innermost function of the traceback, which names the op that crashed."""
    tb = e.__traceback__
    name = None
    while tb is not None:
        name = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return f" in {name}" if name else ""


def load_graph(path: str | Path, model: onnx.ModelProto | None = None, held: bool = False) -> Graph:
    """Load, specialise a merged decoder, normalise, check and shape-infer; the single entry point every command
    uses. With `held` (one file of a multi-file model), a cache input or output without its partner is held state
    shared with another file."""
    p = Path(path)
    model, merged = specialise_merged(model if model is not None else load_model(p), p)
    model = normalise(model)
    sk = _skeleton(model, p)
    warnings: list[str] = []
    try:
        onnx.checker.check_model(sk, full_check=False)
    except Exception as e:
        # Exporters emit graphs the checker rejects but onnxruntime runs (dynamo's opset-17 fallback keeps
        # Split(num_outputs)); the equivalence check is the real test, so this is a warning, not an error.
        warnings.append(f"onnx.checker: {str(e).splitlines()[0][:200]}")
    shapes, dtypes = infer_shapes(sk, p, model.graph.initializer, warnings)
    del sk
    constants = Constants()
    for t in model.graph.initializer:
        constants[t.name] = external_tensor(t, p) if is_external(t) else _tensor_array(t, p)
    g = Graph(model=_light(model), path=p, constants=constants, shapes=shapes, dtypes=dtypes, warnings=warnings,
              merged=merged)
    g.index()
    if held:
        from stip.runtime.bundle_format import expected_output, is_cache_input, is_cache_output

        outs = set(g.output_names)
        g.cache = [(i, expected_output(i)) for i in g.input_names if is_cache_input(i) and expected_output(i) in outs]
        paired = {x for pair in g.cache for x in pair}
        g.held_in = [i for i in g.input_names if is_cache_input(i) and i not in paired]
        g.held_out = [o for o in g.output_names if is_cache_output(o) and o not in paired]
    else:
        g.cache = pair_cache(g.input_names, g.output_names, str(p))
    return g
