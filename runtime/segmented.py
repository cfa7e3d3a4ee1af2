"""Run a large ONNX model a slice of nodes at a time, so verify and the self-check fit a bounded memory budget.

Why: a session of the whole model holds every weight (and onnxruntime's pre-packed copies), about 1.2x the model,
and verify runs the original and then the bundle (2.9 GiB peak on a 2.7 GB fp32 Llama). This object looks like an
onnxruntime session (get_inputs, get_outputs, run) but cuts the graph, in its topological order, into segments of
at most SEGMENT_BYTES of weights (at their in-memory cost; one larger weight is a segment of its own). Each run
builds one segment's session at a time, with its weights memory-mapped from the model's files and handed to
onnxruntime in place (no copy, no pre-packing), runs it, and frees it before the next. Every node still runs, on the
same inputs, so the result is the whole model's; only peak memory changes (one segment's weights, plus the
activations crossing a cut, which are small for verify's few tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from stip.runtime.errors import StipError
from stip.runtime.sessions import providers_for

SEGMENT_BYTES = 256 << 20  # weight cost per segment; a model with more weight cost than this runs in segments
# onnxruntime's CPU provider computes fp16/bf16 MatMuls in fp32: it casts those weights, so a 2-byte weight costs
# its mapped bytes plus a 4-byte copy while its segment runs (measured: 2.4 GiB peak on the fp16 670M model with
# 512 MiB segments counted at 1x, against 1.4 GiB for fp32)
_COST = {TensorProto.FLOAT16: 3, TensorProto.BFLOAT16: 3}
_STUB = "stip-memory-mapped"  # location of a weight's stand-in: its bytes come from add_external_initializers


class _Arg:
    """The parts of onnxruntime's NodeArg that callers read: name, shape (int, str or None per dim), type."""

    def __init__(self, vi: onnx.ValueInfoProto):
        tt = vi.type.tensor_type
        self.name = vi.name
        self.type = f"tensor({TensorProto.DataType.Name(tt.elem_type).lower()})"
        self.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def weight_cost(model: onnx.ModelProto) -> int:
    return sum(_cost(t) for t in model.graph.initializer)


def _used_names(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, including the outer values its subgraphs (If, Loop, Scan branches) read."""
    names = {x for x in node.input if x}
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in sub.node:
                names |= _used_names(n)
    return names


class SegmentedSession:
    """An onnxruntime session look-alike over `path` that never loads more than one segment's weights."""

    def __init__(self, path: str | Path, device: str = "cpu", segment_bytes: int = SEGMENT_BYTES):
        from stip.passes.tensors import external_tensor, is_external, load_structure

        self.path = Path(path)
        self.providers = providers_for(device)
        self.model = load_structure(self.path)  # large inline weights are mapped from the .onnx, not parsed
        g = self.model.graph
        self._weights = {t.name: t for t in g.initializer}
        self._external = {t.name: external_tensor(t, self.path) for t in g.initializer if is_external(t)}
        self._inputs = [_Arg(vi) for vi in g.input if vi.name not in self._weights]
        self._outputs = [_Arg(vi) for vi in g.output]
        self._types = self._value_types()
        self.segments = self._cut(segment_bytes)

    def get_inputs(self) -> list[_Arg]:
        return self._inputs

    def get_outputs(self) -> list[_Arg]:
        return self._outputs

    def get_providers(self) -> list[str]:
        return self.providers

    def _value_types(self) -> dict[str, int]:
        """Every value's element type, from ONNX type inference over the graph with its weights as typed inputs
        (no weight bytes are read)."""
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        g = m.graph
        weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer]
        del g.initializer[:]
        g.input.extend(weights)
        try:
            m = onnx.shape_inference.infer_shapes(m)
        except Exception:  # noqa: BLE001 - without types, cuts only fall where types are declared
            pass
        g = m.graph
        return {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)
                if vi.type.tensor_type.elem_type}

    def _cut(self, segment_bytes: int) -> list[tuple[int, int]]:
        """[start, end) node ranges of at most segment_bytes of weight cost each (a node whose weights alone cost
        more gets a segment of its own), cut only where every value crossing the cut has a known type."""
        nodes = self.model.graph.node
        outputs = {o.name for o in self.model.graph.output}
        last: dict[str, int] = {}
        uses = [_used_names(n) for n in nodes]
        for i, names in enumerate(uses):
            for x in names:
                last[x] = i
        segments, start, size, seen, live = [], 0, 0, set(), set()
        for i, n in enumerate(nodes):
            new = {x for x in uses[i] if x in self._weights and x not in seen}
            cost = sum(_cost(self._weights[x]) for x in new)
            if size and size + cost > segment_bytes and all(x in self._types for x in live):
                segments.append((start, i))
                start, size, seen = i, 0, set()
                new = {x for x in uses[i] if x in self._weights}
                cost = sum(_cost(self._weights[x]) for x in new)
            seen |= new
            size += cost
            live |= {o for o in n.output if o}
            live = {x for x in live if x in outputs or last.get(x, -1) > i}
        segments.append((start, len(nodes)))
        return segments

    def _segment(self, start: int, end: int, env: dict[str, np.ndarray], keep: set[str]):
        g = self.model.graph
        nodes = list(g.node)[start:end]
        made = {o for n in nodes for o in n.output if o}
        needed = set().union(*(_used_names(n) for n in nodes))
        m = onnx.ModelProto()
        m.ir_version = self.model.ir_version
        m.opset_import.extend(self.model.opset_import)
        m.functions.extend(self.model.functions)
        m.graph.name = f"{g.name or 'graph'}[{start}:{end}]"
        m.graph.node.extend(nodes)
        arrays = {}
        for x in sorted(needed):
            if x in self._weights:
                t = self._weights[x]
                if x in self._external:
                    stub = m.graph.initializer.add()
                    stub.name, stub.data_type = x, t.data_type
                    stub.dims.extend(t.dims)
                    stub.data_location = TensorProto.EXTERNAL
                    e = stub.external_data.add()
                    e.key, e.value = "location", _STUB
                    arrays[x] = self._external[x].load()
                else:
                    m.graph.initializer.append(t)
            elif x in env and x not in made:
                m.graph.input.append(helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(env[x].dtype),
                                                                   None))
        for x in sorted(made & keep):
            m.graph.output.append(helper.make_tensor_value_info(x, self._types.get(x, 0), None))
        return m, arrays

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray], run_options=None) -> list:
        """Every segment in order, each session freed before the next; values are dropped after their last use."""
        env = dict(feeds)
        wanted = output_names or [o.name for o in self._outputs]
        later: list[set[str]] = []
        need = set(wanted)
        for start, end in reversed(self.segments):  # what each segment must hand on to the ones after it
            later.append(set(need))
            for n in list(self.model.graph.node)[start:end]:
                need |= _used_names(n)
        later.reverse()
        for (start, end), keep in zip(self.segments, later):
            m, arrays = self._segment(start, end, env, keep)
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.enable_cpu_mem_arena = False
            so.add_session_config_entry("session.disable_prepacking", "1")
            values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays.values()]
            if values:
                so.add_external_initializers(list(arrays), values)
            try:
                sess = ort.InferenceSession(m.SerializeToString(), so, providers=self.providers)
                ins = [i.name for i in sess.get_inputs()]
                result = sess.run(None, {k: env[k] for k in ins}, run_options)
            except Exception as e:  # noqa: BLE001 - onnxruntime's own types; one line naming the segment
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise StipError(f"{self.path}: nodes {start}..{end - 1} in onnxruntime: {msg}") from None
            env.update(zip([o.name for o in sess.get_outputs()], result))
            del sess, values, arrays, result
            env = {k: v for k, v in env.items() if k in keep}
        return [env[n] for n in wanted]


def _cost(t: onnx.TensorProto) -> int:
    """A weight's memory while its segment runs (see _COST)."""
    if t.data_type == TensorProto.STRING:
        return 0
    size = int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return size * _COST.get(t.data_type, 1)


def session_for(path: str | Path, device: str = "cpu", segment_bytes: int | None = None):
    """A whole-model session when its weights fit one segment (or on a GPU), else a SegmentedSession."""
    from stip.passes.tensors import load_structure
    from stip.runtime.sessions import make_session

    limit = SEGMENT_BYTES if segment_bytes is None else segment_bytes
    if device == "cpu" or providers_for(device) == ["CPUExecutionProvider"]:
        if weight_cost(load_structure(path)) > limit:
            return SegmentedSession(path, device, limit)
    return make_session(path, device)
