"""Limits of `stip serve` in dims and in bytes: the memory budget, the estimate that charges a request against it
before it runs, and the cap on request bytes buffered across all connections.

Why an estimate from the graph: a valid request within every dim limit can still need gigabytes (attention scores
grow with batch x heads x sequence x total length), so dims alone do not bound memory. The estimate runs ONNX
Runtime's symbolic shape inference on the server graph once at startup, which gives every intermediate tensor's
size as an expression in the graph's dim symbols (batch, sequence, past_sequence, ...). For a request, those
symbols take the request's values, and a walk over the nodes in graph order, with a tensor live from the node that
makes it to the last node that reads it, gives the peak bytes of live tensors. ORT's own planner reuses buffers and
fuses ops, but its fused kernels keep workspaces of their own: measured peaks were about twice the liveness sum,
so the sum is multiplied by ACTIVATION_FACTOR; tests/test_serve_limits.py checks the estimate against the RSS of a
real server. Dims that shape inference cannot name are charged as the largest request dim.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stip.runtime.errors import StipError
from stip.runtime.serve_protocol import RequestError

log = logging.getLogger("stip.serve")

JSON_HEAP_PER_VALUE = 64      # a JSON value as a Python object while parsing or encoding (float + list slot + text)
# ONNX Runtime's measured peak on CPU was 1.9-2.0x the liveness sum (BERT and Llama, batch 1-8, 1k-4k tokens): its
# fused kernels keep workspaces the graph does not show. The margin above 2 covers what RSS sampling can miss.
ACTIVATION_FACTOR = 2.5      # a JSON value as a Python object while parsing or encoding (float + list slot + text)


@dataclass
class Limits:
    max_batch: int = 64               # dim 0 of every input whose dim 0 is dynamic
    max_seq: int = 2048               # every other dynamic dim of an input; also a sequence's cached tokens
    max_request_bytes: int = 64 << 20
    max_queue: int = 64               # requests waiting for a worker beyond the busy workers
    max_sequences: int = 256          # live sequences per model
    max_sequences_per_client: int = 0  # live sequences per model and client (0: --max-sequences)
    sequence_timeout: float = 300.0   # seconds idle before a sequence is freed
    workers: int = 2                  # threads running ONNX Runtime
    max_memory: int = 4 << 30         # budget for request activations, responses and every live KV cache
    max_json_response_bytes: int = 16 << 20
    max_buffered_bytes: int = 256 << 20   # request bodies being received, all connections together
    max_connections: int = 256
    max_connections_per_client: int = 64   # per client IP address; 0: no per-address cap (behind a proxy)
    header_timeout: float = 10.0      # seconds to receive a request's headers
    body_timeout: float = 60.0        # seconds to receive a request's body
    keep_alive: float = 5.0           # seconds an idle keep-alive connection stays open

    def check(self) -> None:
        for flag, v in (("--max-batch", self.max_batch), ("--max-seq", self.max_seq),
                        ("--max-request-bytes", self.max_request_bytes), ("--workers", self.workers),
                        ("--max-sequences", self.max_sequences), ("--max-memory", self.max_memory),
                        ("--max-json-response-bytes", self.max_json_response_bytes),
                        ("--max-buffered-bytes", self.max_buffered_bytes),
                        ("--max-connections", self.max_connections)):
            if v < 1:
                raise StipError(f"{flag} must be at least 1")
        for flag, t in (("--sequence-timeout", self.sequence_timeout), ("--header-timeout", self.header_timeout),
                        ("--body-timeout", self.body_timeout), ("--keep-alive", self.keep_alive)):
            if not t > 0:
                raise StipError(f"{flag} must be more than 0 seconds")
        for flag, v in (("--max-queue", self.max_queue), ("--max-sequences-per-client", self.max_sequences_per_client),
                        ("--max-connections-per-client", self.max_connections_per_client)):
            if v < 0:
                raise StipError(f"{flag} must be >= 0")
        if self.max_buffered_bytes < self.max_request_bytes:
            raise StipError("--max-buffered-bytes must be at least --max-request-bytes")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """'4GiB', '512MiB', '2G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise StipError(f"{flag} {text}: expected a size such as 4GiB, 512MiB or 1000000 (bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class MemoryBudget:
    """Bytes reserved by running requests plus bytes held by live KV caches, never above the total."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.lock = threading.Lock()

    def reserve(self, n: int, held_by_caller: int = 0) -> int:
        """Reserve n bytes or refuse: 413 if n could never fit (even with nothing else running; the caller's own
        sequence cache counts), 503 if it would fit but the budget is in use now."""
        if n + held_by_caller > self.total:
            raise RequestError(413, f"this request needs about {fmt_bytes(n)} of memory (activations, KV cache and "
                               f"response), over the server's budget of {fmt_bytes(self.total)} (--max-memory); "
                               "send a smaller batch or fewer tokens")
        with self.lock:
            if self.used + n > self.total:
                raise RequestError(503, f"server memory budget in use ({fmt_bytes(self.used)} of "
                                   f"{fmt_bytes(self.total)}); retry later", {"Retry-After": "1"})
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self.lock:
            self.used -= n

    def hold(self, seq, n: int) -> None:
        """Set the bytes a live sequence's cache holds (nothing once it is freed)."""
        with self.lock:
            if not seq.alive:
                n = 0
            self.used += n - seq.held
            seq.held = n

    def free(self, seq) -> None:
        with self.lock:
            seq.alive = False
            self.used -= seq.held
            seq.held = 0


class BufferBudget:
    """Request body bytes being received, across every connection: a cap, so that many stalled uploads cannot
    pin memory (each is also bounded by --max-request-bytes and --body-timeout)."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            if self.used + n > self.total:
                raise RequestError(503, f"server busy: {fmt_bytes(self.used)} of request bodies are being received "
                                   "(--max-buffered-bytes); retry later", {"Retry-After": "1"})
            self.used += n

    def give(self, n: int) -> None:
        with self.lock:
            self.used -= n


class MemoryModel:
    """Peak bytes of a run of one server graph, as a function of its dim symbols (see the module docstring)."""

    def __init__(self, path: Path):
        import onnx
        import sympy
        model = onnx.load(str(path), load_external_data=False)
        declared = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
                    for o in model.graph.output}
        inferred, complete = _infer_shapes(model)
        if not complete:
            log.warning("%s: symbolic shape inference is incomplete; tensors without a shape are charged as the sum "
                        "of their node's inputs", path)
        g = inferred.graph
        infos = {v.name: v for v in [*g.value_info, *g.output]}
        produced: dict[str, int] = {}
        last_use: dict[str, int] = {}
        n = len(g.node)
        for k, node in enumerate(g.node):
            for i in node.input:
                if i:
                    last_use[i] = k
            for o in node.output:
                if o:
                    produced[o] = k
        for o in g.output:
            last_use[o.name] = n
        known = {re.sub(r"\W", "", d.dim_param) for i in g.input for d in i.type.tensor_type.shape.dim
                 if d.dim_param}
        subst: dict[str, str] = {}  # unnamed dims of graph outputs, named by the graph's declared output shapes
        for o in g.output:
            want = declared.get(o.name, [])
            got = [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
            for a, b in zip(got, want):
                if isinstance(a, str) and a not in known and re.fullmatch(r"\w+", a) and (
                        isinstance(b, int) or b in known):
                    subst[a] = str(b)
        key_of: dict[str, str] = {i.name: "*".join([str(_itemsize(i.type.tensor_type.elem_type)), *(
            f"({d.dim_param})" if d.dim_param else str(max(d.dim_value, 1)) for d in i.type.tensor_type.shape.dim)])
            for i in g.input}
        exprs: dict[str, int] = {}
        columns: list = []
        spans: list[tuple[int, int, int]] = []
        self.symbols: set[str] = set()
        for node in g.node:
            for name in node.output:
                info = infos.get(name)
                if not name:
                    continue
                if info is None or not info.type.tensor_type.HasField("shape"):
                    ins = [f"({key_of[i]})" for i in node.input if i in key_of]
                    if not ins:
                        continue
                    key_of[name] = key = "+".join(ins)
                    self.symbols.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", key))
                    if key not in exprs:
                        exprs[key] = len(columns)
                        columns.append(key)
                    spans.append((exprs[key], produced[name], last_use.get(name, produced[name])))
                    continue
                itemsize = _itemsize(info.type.tensor_type.elem_type)
                dims, unknown = [], False
                for d in info.type.tensor_type.shape.dim:
                    if d.dim_param:
                        param = re.sub(r"[A-Za-z_]\w*", lambda m: subst.get(m.group(0), m.group(0)), d.dim_param)
                        names = re.findall(r"[A-Za-z_]\w*", param)
                        unknown |= any(x not in known for x in names)
                        dims.append(f"({param})")
                    else:
                        dims.append(str(max(d.dim_value, 1)))
                key = "*".join([str(itemsize), *dims])
                if unknown and node.op_type in _SAME_SIZE and node.input and node.input[0] in key_of:
                    key = key_of[node.input[0]]  # a reshape keeps the element count its input has
                key_of[name] = key
                self.symbols.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", key))
                if key not in exprs:
                    exprs[key] = len(columns)
                    columns.append(key)
                spans.append((exprs[key], produced[name], last_use.get(name, produced[name])))
        self.output_cols = {o.name: exprs[key_of[o.name]] for o in g.output if key_of.get(o.name) in exprs}
        live = np.zeros((n + 2, len(columns)), np.int32)
        for col, start, end in spans:
            live[start, col] += 1
            live[end + 1, col] -= 1
        self.live = np.cumsum(live, axis=0)[: n + 1]
        syms = sorted(self.symbols)
        sym_objs = [sympy.Symbol(s) for s in syms]
        local = dict(zip(syms, sym_objs))
        self.sym_order = syms
        self.fns = [sympy.lambdify(sym_objs, sympy.sympify(c, locals=local), "math") for c in columns]

    def sizes(self, values: dict[str, int]) -> tuple[int, dict[str, int]]:
        """(peak live bytes x ACTIVATION_FACTOR, bytes of each graph output) with the given symbol values; unnamed
        symbols are charged as the largest value."""
        default = max(values.values(), default=1)
        args = [values.get(s, default) for s in self.sym_order]
        sizes = np.array([float(f(*args)) for f in self.fns], dtype=np.float64)
        peak = int((self.live @ sizes).max() * ACTIVATION_FACTOR) if len(sizes) else 0
        return peak, {name: int(sizes[col]) for name, col in self.output_cols.items()}


def _infer_shapes(model):
    """ONNX Runtime's symbolic shape inference, and whether it finished. Its public `infer_shapes` saves the model
    into the working directory when it cannot finish, so the steps are run here, with the public call (inside a
    scratch directory) only as a fallback for an onnxruntime whose internals differ."""
    import os
    import tempfile

    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    ssi = SymbolicShapeInference(2**31 - 1, True, False, 0)
    try:
        ssi._preprocess(model)
        complete = False
        while ssi.run_:
            complete = ssi._infer_impl()
        ssi._update_output_from_vi()
        return ssi.out_mp_, bool(complete)
    except AttributeError:
        old = os.getcwd()
        with tempfile.TemporaryDirectory() as scratch:
            os.chdir(scratch)
            try:
                return SymbolicShapeInference.infer_shapes(model, auto_merge=True), True
            finally:
                os.chdir(old)


_SAME_SIZE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"}


def _itemsize(elem_type: int) -> int:
    import onnx

    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 8
