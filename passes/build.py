"""Assemble the three party graphs (pre, server, post) with the permutations folded into their constants."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stip.passes.errors import StipError
from stip.passes.graph import Graph
from stip.passes.packed import Packing
from stip.passes.partition import Partition
from stip.passes.permute import Permutations, fold, fold_into, inverse
from stip.passes.solve import Solution, use_key
from stip.runtime.bundle_format import CACHE_SHAPE_SUFFIX, KEY_ID_PROP, ROLE_PROP, ROLES

SERVER_SUFFIX = ".stip_server"
CLIENT_SUFFIX = ".stip_client"  # pre's copy of an output it computes itself; post turns it into the output
Sink = Callable[[onnx.GraphProto, np.ndarray, str, "int | None"], None]  # (graph, tensor, name, onnx data_type)


@dataclass
class Bundle:
    pre: onnx.ModelProto
    server: onnx.ModelProto
    post: onnx.ModelProto


def server_output_name(name: str) -> str:
    return name + SERVER_SUFFIX


def _value_info(g: Graph, name: str, new_name: str | None = None) -> onnx.ValueInfoProto:
    for vi in list(g.model.graph.input) + list(g.model.graph.output):
        if vi.name == name:
            out = onnx.ValueInfoProto()
            out.CopyFrom(vi)
            out.name = new_name or name
            return out
    dims = g.shapes.get(name)
    return helper.make_tensor_value_info(new_name or name, g.dtypes.get(name, TensorProto.FLOAT), dims)


SUB_BYTE = ("int4", "uint4", "float4_e2m1fn")  # ml_dtypes' names


def add_initializer(graph: onnx.GraphProto, arr: np.ndarray, name: str, data_type: int | None = None) -> None:
    """Write a tensor straight into the graph: one copy of the bytes, not the three that make_graph/make_model do.
    `data_type` (the original's) keeps a bf16 tensor bf16 even when it arrives as raw uint16 words."""
    t = graph.initializer.add()
    if arr.dtype.kind in "OUS" or arr.dtype.name in SUB_BYTE:  # onnx packs 4-bit values two to a byte
        t.CopyFrom(numpy_helper.from_array(arr, name))
        return
    t.name = name
    t.data_type = data_type or helper.np_dtype_to_tensor_dtype(arr.dtype)
    t.dims.extend(arr.shape)
    t.raw_data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def new_model(g: Graph, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.ir_version = g.model.ir_version
    m.producer_name = "stip"
    m.opset_import.extend(g.model.opset_import)
    m.functions.extend(g.model.functions)
    m.graph.name = name
    return m


class _ConstantFolder:
    """Gives each constant use its permuted copy, sharing copies between uses that need the same permutation.

    With `remaining` (use counts), a constant's numpy array is dropped after its last use, so the original
    weights and the bundle's permuted weights are never both fully in memory. Large constants fold on
    FOLD_THREADS threads (numpy releases the GIL while gathering) with at most that many folded copies alive;
    the sink still receives every tensor in use order, from this thread, so files and graphs are as if serial.
    A file sink with `reserve` places each tensor first, in use order; its fold threads then write blocks
    straight into the file (passes.permute.fold_into), so no folded copy of a whole tensor exists at all.
    """

    def __init__(self, g: Graph, sol: Solution, perms: Permutations, graph: onnx.GraphProto,
                 progress: Callable[[], None] | None, remaining: dict[str, int] | None,
                 identity: frozenset[int] = frozenset(), sink: Sink | None = None):
        self.g, self.sol, self.perms, self.graph = g, sol, perms, graph
        self.sink = sink or add_initializer  # where folded tensors go: into the graph, or streamed to disk
        self.identity = identity  # spaces left unpermuted in this graph (the vocabulary inside a client-side head)
        self.made: dict[tuple, str] = {}
        self.progress = progress
        self.remaining = remaining
        self._pending: deque[tuple[Future | np.ndarray, str, int | None]] = deque()
        self._writing: deque[Future] = deque()  # placed tensors being folded into their files
        self._pool: ThreadPoolExecutor | None = None

    def _axis_key(self, c: int | None, size) -> object:
        """What a folded axis looks like: its permutation's bytes (None for the identity), so that two uses whose
        spaces differ but whose permutations coincide share one copy. Per-head spaces keep their class."""
        if c is None or size == 1 or c in self.identity:
            return None
        if c in self.sol.dependent:
            return ("per-head", c)
        v = self.perms.vector(c)
        return None if np.array_equal(v, np.arange(len(v))) else v.tobytes()

    def name_for(self, name: str, idx: int, j: int) -> str:
        packing = self.sol.views.get(use_key(name, idx, j))  # packed 4-bit values, flattened blocks: packed.py
        dims = list(packing.shape) if packing else self.g.shapes[name]
        classes = self.sol.classes(use_key(name, idx, j), len(dims))
        keys = tuple(self._axis_key(c, dims[a]) for a, c in enumerate(classes))
        sig = (name, keys, packing)
        if sig not in self.made:
            value = self.g.constants[name]
            permuted = any(k is not None for k in keys)
            heads = {self.sol.dependent[c] for c, k in zip(classes, keys) if k is not None and c in self.sol.dependent}
            fold_classes = [c if k is not None or c in heads else None for c, k in zip(classes, keys)]
            new = f"{name}.p{len(self.made)}" if permuted else name
            self._emit(value, fold_classes if permuted else None, new, self.g.dtypes.get(name), packing)
            self.made[sig] = new
        if self.remaining is not None:
            self.remaining[name] -= 1
            if self.remaining[name] == 0:
                del self.g.constants[name]
        if self.progress:
            self.progress()
        return self.made[sig]

    def _emit(self, value: np.ndarray, classes: list[int | None] | None, name: str, data_type: int | None,
              packing: Packing | None = None) -> None:
        if classes is not None and packing is not None:  # packed 4-bit blocks: unpack, fold, repack (inline)
            value, classes = packing.pack(fold(packing.unpack(value), classes, self.perms), value), None
        if classes is not None:
            for c in classes:  # compose linked vectors here: the worker threads only read them
                if c is not None and c not in self.sol.dependent:
                    self.perms.vector(c)
        reserve = getattr(self.sink, "reserve", None)  # a file sink (compiler/external.py) places tensors first
        write = reserve(self.graph, name, value.shape, value.dtype, data_type) if reserve else None
        if write is not None:
            self._emit_placed(value, classes, write)
            return
        if classes is None or value.nbytes < ASYNC_FOLD_BYTES:
            result = value if classes is None else fold(value, classes, self.perms)
            if self._pending:
                self._pending.append((result, name, data_type))
            else:
                self.sink(self.graph, result, name, data_type)
            return
        while sum(isinstance(f, Future) for f, _, _ in self._pending) >= FOLD_THREADS:
            self._sink_oldest()
        self._pending.append((self._executor().submit(fold, value, classes, self.perms), name, data_type))

    def _emit_placed(self, value: np.ndarray, classes: list[int | None] | None, write) -> None:
        """The tensor already has its place in the file: fold it block by block into it, on a fold thread when
        large (at most FOLD_THREADS in flight, each holding one block, never a whole folded copy)."""
        if value.nbytes < ASYNC_FOLD_BYTES:
            fold_into(value, classes, self.perms, write)
            return
        while len(self._writing) >= FOLD_THREADS:
            self._writing.popleft().result()
        self._writing.append(self._executor().submit(fold_into, value, classes, self.perms, write))

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(FOLD_THREADS, thread_name_prefix="stip-fold")
        return self._pool

    def _sink_oldest(self) -> None:
        job, name, data_type = self._pending.popleft()
        self.sink(self.graph, job.result() if isinstance(job, Future) else job, name, data_type)

    def flush(self) -> None:
        """Sink every pending tensor, in order, and wait for every placed write; on error, wait for the threads
        and drop their results."""
        try:
            while self._pending:
                self._sink_oldest()
            while self._writing:
                self._writing.popleft().result()
        finally:
            self.close()

    def close(self) -> None:
        self._pending.clear()
        self._writing.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


FOLD_THREADS = 2
ASYNC_FOLD_BYTES = 1 << 20  # smaller constants fold inline: a thread hand-off would cost more than the copy


def _subgraph(g, sol, perms, node_ids, inputs, outputs, name, progress=None, remaining=None,
              identity: frozenset[int] = frozenset(), sink: Sink | None = None) -> onnx.ModelProto:
    m = new_model(g, name)
    folder = _ConstantFolder(g, sol, perms, m.graph, progress, remaining, identity, sink)
    try:
        for idx in node_ids:
            src = g.model.graph.node[idx]
            n = m.graph.node.add()
            n.CopyFrom(src)
            for j, x in enumerate(src.input):
                if x in g.constants:
                    n.input[j] = folder.name_for(x, idx, j)
        folder.flush()
    finally:
        folder.close()
    m.graph.input.extend(inputs)
    m.graph.output.extend(outputs)
    return m


def _rename_outputs(nodes: list[onnx.NodeProto], renames: dict[str, str]) -> None:
    for n in nodes:
        n.output[:] = [renames.get(o, o) for o in n.output]
        n.input[:] = [renames.get(x, x) for x in n.input]


LARGE_AXIS = 4096


def _unpermute_nodes(g: Graph, sol: Solution, perms: Permutations, src: str, dst: str, skip: set[int] = frozenset()):
    """Nodes that undo the permutation of each permuted axis of one output tensor.

    ORT's CPU Gather is slow on an inner axis, so the choice is per axis, from measurements: a small inner axis
    (hidden, 384) is moved to the front, gathered on axis 0 and moved back (32 us vs 356 us at [1,128,384]); a
    vocabulary-sized last axis uses GatherElements with the index broadcast (60 us vs 420 us at [1,1,50257]).
    """
    rank = len(g.shapes.get(dst, []))
    classes = [None if c in skip else c for c in sol.classes(dst, rank)]
    nodes, inits = [], []
    cur = src
    steps = [(a, c) for a, c in enumerate(classes) if c is not None]
    if not steps:
        nodes.append(helper.make_node("Identity", [src], [dst], name=f"unpermute_{dst}"))
        return nodes, inits
    for k, (a, c) in enumerate(steps):
        idx_name = f"{dst}.inverse{a}"
        inits.append(numpy_helper.from_array(inverse(perms.vector(c)).astype(np.int64), idx_name))
        out = dst if k == len(steps) - 1 else f"{dst}.unpermuted{a}"
        if a == 0:
            nodes.append(helper.make_node("Gather", [cur, idx_name], [out], axis=0, name=f"unpermute_{dst}_{a}"))
        elif a == rank - 1 and sol.sizes.get(c, 0) >= LARGE_AXIS:
            shape, expanded = f"{dst}.shape{a}", f"{dst}.index{a}"
            nodes += [
                helper.make_node("Shape", [cur], [shape], name=f"unpermute_{dst}_{a}_shape"),
                helper.make_node("Expand", [idx_name], [expanded], name=f"unpermute_{dst}_{a}_index"),
                helper.make_node("GatherElements", [cur, expanded], [out], axis=a, name=f"unpermute_{dst}_{a}"),
            ]
            nodes[-2].input.append(shape)
        else:
            front = [a] + [i for i in range(rank) if i != a]
            back = [front.index(i) for i in range(rank)]
            t1, t2 = f"{dst}.front{a}", f"{dst}.gathered{a}"
            nodes += [
                helper.make_node("Transpose", [cur], [t1], perm=front, name=f"unpermute_{dst}_{a}_front"),
                helper.make_node("Gather", [t1, idx_name], [t2], axis=0, name=f"unpermute_{dst}_{a}"),
                helper.make_node("Transpose", [t2], [out], perm=back, name=f"unpermute_{dst}_{a}_back"),
            ]
        cur = out
    return nodes, inits


def client_reads_cache(g: Graph, nodes) -> str | None:
    """The refusal when a client-side node (index into g, or NodeProto) reads a cache input's values."""
    cache_inputs = g.state_inputs
    for n in nodes:
        n = g.model.graph.node[n] if isinstance(n, int) else n
        for x in n.input:
            if x in cache_inputs and n.op_type != "Shape":
                return (f"{g.path}: the client graph would read the values of cache input '{x}' "
                        f"({n.op_type} node '{n.name}'); only its shape may be used there")
    return None


def _cache_shapes_as_inputs(g: Graph, pre: onnx.ModelProto) -> None:
    """The user never holds the KV cache, but pre may need its shape (positions start at the past length):
    such Shape nodes read a small int64 input `<cache input>.shape` that the client fills in instead."""
    cache_inputs = g.state_inputs
    keep = [i for i in pre.graph.input if i.name not in cache_inputs]
    used = [i.name for i in pre.graph.input if i.name in cache_inputs]
    if not used:
        return
    problem = client_reads_cache(g, pre.graph.node)
    if problem:
        raise StipError(problem)
    for n in pre.graph.node:
        if n.op_type == "Shape" and n.input[0] in cache_inputs:
            src = n.input[0] + CACHE_SHAPE_SUFFIX
            start = next((a.i for a in n.attribute if a.name == "start"), 0)
            end = next((a.i for a in n.attribute if a.name == "end"), None)
            rank = len(g.shapes[n.input[0]])
            end = rank if end is None else (end + rank if end < 0 else end)
            start = start + rank if start < 0 else start
            bounds = [f"{n.output[0]}.start", f"{n.output[0]}.end"]
            pre.graph.initializer.extend([numpy_helper.from_array(np.array([start], np.int64), bounds[0]),
                                          numpy_helper.from_array(np.array([end], np.int64), bounds[1])])
            n.op_type = "Slice"
            del n.attribute[:]
            n.input[:] = [src, *bounds]
    del pre.graph.input[:]
    pre.graph.input.extend(keep + [helper.make_tensor_value_info(x + CACHE_SHAPE_SUFFIX, TensorProto.INT64,
                                                                 [len(g.shapes[x])]) for x in used])


def build(g: Graph, sol: Solution, perms: Permutations, part: Partition, key_id: str,
          progress: Callable[[], None] | None = None, release_constants: bool = False,
          sinks: dict[str, Sink] | None = None) -> Bundle:
    """The three graphs. With release_constants, g.constants is consumed (emptied) as weights are folded.
    `sinks` ("pre", "server", "post") receive each folded tensor instead of the graph holding it (streaming)."""
    sinks = sinks or {}
    graph_inputs = {i.name for i in g.model.graph.input}
    nodes = g.model.graph.node
    remaining: dict[str, int] | None = None
    if release_constants:
        remaining = {}
        for i in part.pre_nodes + part.server_nodes + part.post_nodes:
            for x in nodes[i].input:
                if x in g.constants:
                    remaining[x] = remaining.get(x, 0) + 1

    # A plaintext tail in post (solve.solve) reads server tensors, which the server returns, and client tensors
    # (inputs, pre's results), which pre hands to post as copies.
    server_set = set(part.server_nodes)
    tail_server = [t for t in part.tail_inputs if g.producer.get(t) in server_set]
    tail_client = [t for t in part.tail_inputs if t not in tail_server]

    # pre: private inputs (and any other input it needs) -> crossing tensors
    pre_needed = {x for i in part.pre_nodes for x in nodes[i].input if x in graph_inputs} | {
        o for o in part.pre_outputs + tail_client if o in graph_inputs}
    pre_inputs = [_value_info(g, n) for n in g.input_names if n in pre_needed]
    pre_out_names = [t for t in part.crossing if g.producer.get(t) in set(part.pre_nodes)]
    # An output pre computes goes to post under its own name: post defines the output (un-permuted) exactly once.
    client_copies = {o: o + CLIENT_SUFFIX for o in part.pre_outputs + tail_client}
    pre = _subgraph(g, sol, perms, part.pre_nodes, pre_inputs,
                    [_value_info(g, t) for t in pre_out_names] +
                    [_value_info(g, o, c) for o, c in client_copies.items()],
                    "stip_pre", progress, remaining, sink=sinks.get("pre"))
    pre.graph.node.extend(helper.make_node("Identity", [o], [c], name=f"client_copy_{o}")
                          for o, c in client_copies.items())
    _cache_shapes_as_inputs(g, pre)

    # server: crossing tensors + public inputs (+ its KV cache) -> outputs still permuted, renamed; the cache
    # outputs keep their names so they can be fed back as the next step's past
    post_set = set(part.post_nodes)
    server_needed = {x for i in part.server_nodes for x in nodes[i].input if x}
    server_inputs = [_value_info(g, t) for t in part.crossing] + [
        _value_info(g, n) for n in g.input_names if n in server_needed and n not in part.private]
    returned = [o for o in part.user_outputs if o not in part.pre_outputs and g.producer.get(o) not in post_set]
    returned += [t for t in part.to_post + tail_server if t not in returned]
    renames = {o: server_output_name(o) for o in returned}
    server_outputs = [_value_info(g, o, renames[o]) for o in returned] + [_value_info(g, o) for _, o in part.cache] + [
        _value_info(g, o) for o in part.held_out]
    server = _subgraph(g, sol, perms, part.server_nodes, server_inputs, server_outputs, "stip_server", progress,
                       remaining, sink=sinks.get("server"))
    _rename_outputs(list(server.graph.node), renames)

    # post: the LM head when it runs on the client, then undo the output permutations
    post_renames = {**renames, **client_copies, **{o: server_output_name(o) for o in part.user_outputs
                                                   if g.producer.get(o) in post_set}}
    for t in part.tail_inputs:  # the tail reads the un-permuted tensor under its own name
        post_renames.pop(t, None)
    # With the head on the client, the vocabulary never leaves the user: spaces that only the head's nodes see
    # stay unpermuted there, so post needs no un-permute for them.
    head_spaces = {c for o in part.user_outputs if g.producer.get(o) in post_set
                   for c in sol.classes(o, len(g.shapes.get(o, []))) if c is not None}
    boundary = {c for t in part.to_post for c in sol.classes(t, len(g.shapes.get(t, []))) if c is not None}
    identity = frozenset(head_spaces - boundary)
    post = _subgraph(g, sol, perms, part.post_nodes, [], [], "stip_post", progress, remaining, identity,
                     sinks.get("post"))
    _rename_outputs(list(post.graph.node), post_renames)
    post.graph.input.extend([_value_info(g, o, renames[o]) for o in returned] +
                            [_value_info(g, o, c) for o, c in client_copies.items()])
    unpermuted = []
    for t in part.tail_inputs:
        ns, inits = _unpermute_nodes(g, sol, perms, renames.get(t) or client_copies[t], t)
        unpermuted += ns
        post.graph.initializer.extend(inits)
    tail_nodes = list(post.graph.node)
    del post.graph.node[:]
    post.graph.node.extend(unpermuted + tail_nodes)
    for o in part.user_outputs:
        if o in part.tail_inputs:  # already un-permuted for the tail
            post.graph.output.append(_value_info(g, o))
            continue
        src = post_renames.get(o, o)
        ns, inits = _unpermute_nodes(g, sol, perms, src, o, skip=identity if g.producer.get(o) in post_set
                                     else frozenset())
        post.graph.node.extend(ns)
        post.graph.initializer.extend(inits)
        post.graph.output.append(_value_info(g, o))

    for part_name, m in (("pre", pre), ("server", server), ("post", post)):
        helper.set_model_props(m, {KEY_ID_PROP: key_id, ROLE_PROP: ROLES[part_name]})
    return Bundle(pre, server, post)
