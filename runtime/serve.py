"""`stip serve`: the server graph as a network service, on the KServe v2 / Open Inference Protocol (OIP).

Why this protocol: NVIDIA Triton and KServe speak it, so the official `tritonclient` works against this server, and
an operator who outgrows one machine serves the same server/model.onnx on Triton (`stip export-triton`) with no
change to clients.

What the server holds: the permuted server graph (never the key) and, per generation sequence, that sequence's
permuted KV cache. Clients send only the server graph's non-cache inputs; `past_key_values.*` / `present.*` never
appear in the metadata, in requests or in responses.

Conventions, as Triton implements them:

- JSON tensors: {"name", "datatype" (FP32, INT64, ...), "shape", "data" (row-major, flat or nested)}.
- Binary tensor extension: the request header `Inference-Header-Content-Length` gives the length of the JSON part;
  the raw little-endian bytes of the inputs whose "parameters" carry "binary_data_size" follow it, in input order.
  Outputs asked for with "parameters": {"binary_data": true} (or the request parameter "binary_data_output": true)
  come back the same way: response header `Inference-Header-Content-Length`, per output "binary_data_size".
- Sequences (decoders with a KV cache), from the request "parameters": "sequence_id" (a non-zero integer or a
  non-empty string), "sequence_start", "sequence_end" (booleans), exactly as `tritonclient` sends them.
  sequence_start creates the sequence with an empty cache (a start for a live id replaces it, as in Triton);
  requests with its id continue it, one at a time; sequence_end frees it after the request. A request that fails
  changes nothing: the cache is only advanced by a successful step. An unknown id without sequence_start is a 400.
  Without sequence_id, a cache model runs with an empty cache and keeps nothing. Idle sequences are freed after
  --sequence-timeout seconds; --max-sequences caps live ones (a new one beyond it gets 429).
- Errors: {"error": "<one line>"} with a 4xx status for every bad request (404 unknown model or version, 413 body
  too large, 429 too many sequences, 503 queue full, 400 for the rest); the server keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Request

from stip.runtime.bundle_format import model_key_id, pair_cache
from stip.runtime.cache import CachedSession, empty_past
from stip.runtime.errors import StipError
from stip.runtime.sessions import make_session

log = logging.getLogger("stip.serve")

SERVER_NAME = "stip"
MODEL_VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "sequence", "model_configuration", "model_repository"]
HEADER_LENGTH = "Inference-Header-Content-Length"

# ORT type -> (OIP datatype, numpy dtype, little-endian)
DATATYPES: dict[str, tuple[str, np.dtype]] = {
    ort_t: (oip, np.dtype(np_t).newbyteorder("<"))
    for ort_t, oip, np_t in [
        ("tensor(float)", "FP32", np.float32), ("tensor(float16)", "FP16", np.float16),
        ("tensor(double)", "FP64", np.float64), ("tensor(int64)", "INT64", np.int64),
        ("tensor(int32)", "INT32", np.int32), ("tensor(int16)", "INT16", np.int16),
        ("tensor(int8)", "INT8", np.int8), ("tensor(uint8)", "UINT8", np.uint8),
        ("tensor(uint16)", "UINT16", np.uint16), ("tensor(uint32)", "UINT32", np.uint32),
        ("tensor(uint64)", "UINT64", np.uint64), ("tensor(bool)", "BOOL", np.bool_),
    ]
}


class RequestError(Exception):
    """A bad request: its HTTP status and one clear line for {"error": ...}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Limits:
    max_batch: int = 64               # dim 0 of every input whose dim 0 is dynamic
    max_seq: int = 2048               # dim 1 of every input whose dim 1 is dynamic; also a sequence's cached tokens
    max_request_bytes: int = 64 << 20
    max_queue: int = 64               # requests waiting for a worker beyond the busy workers
    max_sequences: int = 256          # live sequences per model
    sequence_timeout: float = 300.0   # seconds idle before a sequence is freed
    workers: int = 2                  # threads running ONNX Runtime


@dataclass
class TensorSpec:
    name: str
    datatype: str                     # OIP spelling: FP32, INT64, ...
    dtype: np.dtype
    shape: list                       # ORT shape: int for a static dim, str (symbol) or None for a dynamic one

    @property
    def dims(self) -> list[int]:
        return [d if isinstance(d, int) and d >= 0 else -1 for d in self.shape]

    def static(self, axis: int) -> int | None:
        d = self.shape[axis]
        return d if isinstance(d, int) and d >= 0 else None

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.dims}


def _spec(info, where: str) -> TensorSpec:
    if info.type not in DATATYPES:
        raise StipError(f"{where}: tensor '{info.name}' has type {info.type}, which stip serve does not support")
    oip, dt = DATATYPES[info.type]
    return TensorSpec(info.name, oip, dt, list(info.shape))


def resolve_server_dir(path: str | Path) -> Path:
    """A bundle's server/ directory, or the bundle root (its server/ is used)."""
    p = Path(path)
    if (p / "model.onnx").is_file():
        return p
    if (p / "server" / "model.onnx").is_file():
        return p / "server"
    raise StipError(f"{p}: not a stip server bundle (no model.onnx, nor server/model.onnx)")


class BoundCache:
    """CachedSession's contract with IO binding: the permuted KV cache stays on the device between steps as
    OrtValues (CUDA memory on a GPU) instead of a round trip through host memory per token."""

    def __init__(self, session, pairs: list[tuple[str, str]], device: str, batch: int = 1):
        import onnxruntime as ort

        self.session = session
        self.device = device
        ins = {i.name: i for i in session.get_inputs()}
        self.pairs = pairs
        self.outputs = [o.name for o in session.get_outputs()]
        self.cache_outputs = {o: p for p, o in pairs}
        self.past = {}
        for past, _ in pairs:
            self.past[past] = ort.OrtValue.ortvalue_from_numpy(empty_past(ins[past], batch), device, 0)
        self.inputs = [n for n in ins if n not in self.past]

    @property
    def past_length(self) -> int:
        return next((int(v.shape()[2]) for v in self.past.values()), 0)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = self.session.io_binding()
        for n in self.inputs:
            b.bind_cpu_input(n, feeds[n])
        for n, v in self.past.items():
            b.bind_ortvalue_input(n, v)
        for o in self.outputs:
            b.bind_output(o, self.device if o in self.cache_outputs else "cpu")
        self.session.run_with_iobinding(b)
        result, past = {}, {}
        for o, v in zip(self.outputs, b.get_outputs()):
            if o in self.cache_outputs:
                past[self.cache_outputs[o]] = v
            else:
                result[o] = v.numpy()
        self.past = past
        return result


class Sequence:
    """One generation sequence: its cache (CachedSession or BoundCache), a lock so that its requests run one at
    a time, and when it was last used (for the idle reaper)."""

    def __init__(self, state, batch: int):
        self.state = state
        self.batch = batch
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self.alive = True


class SequenceStore:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.items: dict[int | str, Sequence] = {}
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def check_room(self, sid) -> None:
        with self.lock:
            if sid not in self.items and len(self.items) >= self.limits.max_sequences:
                raise RequestError(429, f"too many live sequences ({len(self.items)}, the server's limit "
                                   "--max-sequences); end finished sequences or retry later")

    def get(self, sid, model: str) -> Sequence:
        with self.lock:
            seq = self.items.get(sid)
            if seq is not None:
                seq.last_used = time.monotonic()  # a queued request keeps its sequence from idling out
        if seq is None:
            raise RequestError(400, f"unknown sequence id {sid!r} for model '{model}': start a sequence with "
                               "sequence_start=true (it may have ended or idled out)")
        return seq

    def register(self, sid, seq: Sequence) -> None:
        """After a successful start: replaces a live sequence of the same id (as Triton does)."""
        with self.lock:
            old = self.items.get(sid)
            if old is None and len(self.items) >= self.limits.max_sequences:
                raise RequestError(429, f"too many live sequences ({len(self.items)}, the server's limit "
                                   "--max-sequences); end finished sequences or retry later")
            if old is not None:
                old.alive = False
            self.items[sid] = seq

    def drop(self, sid, seq: Sequence) -> None:
        with self.lock:
            if self.items.get(sid) is seq:
                del self.items[sid]
            seq.alive = False

    def discard(self, sid) -> None:
        with self.lock:
            seq = self.items.pop(sid, None)
            if seq is not None:
                seq.alive = False

    def reap(self, now: float) -> int:
        """Free sequences idle for longer than the timeout; one busy with a request is never freed."""
        freed = 0
        with self.lock:
            for sid, seq in list(self.items.items()):
                if now - seq.last_used > self.limits.sequence_timeout and seq.lock.acquire(blocking=False):
                    try:
                        del self.items[sid]
                        seq.alive = False
                        freed += 1
                    finally:
                        seq.lock.release()
        return freed


@dataclass
class Parsed:
    feeds: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]            # (name, binary) in response order
    request_id: str | None = None
    sequence_id: int | str | None = None
    start: bool = False
    end: bool = False
    batch: int = 1


class Model:
    """One served server graph: its ORT session, its OIP metadata, and its live sequences."""

    def __init__(self, name: str, server_dir: str | Path, device: str = "auto", threads: int = 0,
                 io_binding: str = "auto", limits: Limits | None = None):
        self.name = name
        self.dir = resolve_server_dir(server_dir)
        self.path = self.dir / "model.onnx"
        self.key_id = model_key_id(self.path)
        self.session = make_session(self.path, device, threads)
        self.providers = self.session.get_providers()
        self.limits = limits or Limits()
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        self.pairs = pair_cache([i.name for i in ins], [o.name for o in outs], str(self.path))
        cache_in = {p for p, _ in self.pairs}
        cache_out = {o for _, o in self.pairs}
        self.inputs = [_spec(i, str(self.path)) for i in ins if i.name not in cache_in]
        self.outputs = [_spec(o, str(self.path)) for o in outs if o.name not in cache_out]
        self.cache_specs = [_spec(i, str(self.path)) for i in ins if i.name in cache_in]
        self.input_by_name = {t.name: t for t in self.inputs}
        self.output_by_name = {t.name: t for t in self.outputs}
        self.sequences = SequenceStore(self.limits)
        on_gpu = self.providers[0] == "CUDAExecutionProvider"
        if io_binding not in ("auto", "on", "off"):
            raise StipError(f"--io-binding {io_binding}: expected auto, on or off")
        self.io_binding = io_binding == "on" or (io_binding == "auto" and on_gpu)
        self.binding_device = "cuda" if on_gpu else "cpu"
        self.batch_source = self._batch_source()

    @property
    def stateful(self) -> bool:
        return bool(self.pairs)

    def _batch_source(self) -> str | None:
        """The input whose dim 0 is the cache's batch dim: the batch of a new sequence is read from it."""
        if not self.cache_specs:
            return None
        sym = self.cache_specs[0].shape[0]
        for t in self.inputs:
            if t.shape and not isinstance(sym, int) and t.shape[0] == sym:
                return t.name
        return next((t.name for t in self.inputs if len(t.shape) >= 2 and t.static(0) is None), None)

    def new_state(self, batch: int):
        if self.io_binding:
            return BoundCache(self.session, self.pairs, self.binding_device, batch)
        return CachedSession(self.session, batch)

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [MODEL_VERSION], "platform": "onnxruntime_onnx",
                "inputs": [t.metadata() for t in self.inputs], "outputs": [t.metadata() for t in self.outputs],
                "parameters": {"stip_key_id": self.key_id}}

    def config(self) -> dict:
        """Triton's model configuration (GET /v2/models/{name}/config), as `stip export-triton` writes it."""
        from stip.runtime.triton_config import config_json, model_config

        return config_json(model_config(self.name, self.inputs, self.outputs, self.pairs, self.cache_specs,
                                        self.key_id, sequence_timeout=self.limits.sequence_timeout,
                                        max_sequences=self.limits.max_sequences))

    # ---- one request, in a worker thread ----

    def parse(self, body: bytes, header_length: str | None) -> Parsed:
        if header_length is None:
            head, binary = body, memoryview(b"")
        else:
            try:
                n = int(header_length)
            except ValueError:
                raise RequestError(400, f"{HEADER_LENGTH} must be an integer, got {header_length[:40]!r}")
            if not 0 < n <= len(body):
                raise RequestError(400, f"{HEADER_LENGTH} is {n} but the request body has {len(body)} bytes")
            head, binary = body[:n], memoryview(body)[n:]
        try:
            req = json.loads(head)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"malformed JSON in the inference request: {str(e)[:200]}")
        if not isinstance(req, dict):
            raise RequestError(400, "the inference request must be a JSON object")
        params = _dict(req.get("parameters"), "parameters")
        rid = req.get("id")
        if rid is not None and not isinstance(rid, str):
            raise RequestError(400, "'id' must be a string")
        raw_inputs = req.get("inputs")
        if not isinstance(raw_inputs, list) or not raw_inputs:
            raise RequestError(400, "the request needs a non-empty 'inputs' list")
        feeds: dict[str, np.ndarray] = {}
        offset = 0
        for k, t in enumerate(raw_inputs):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise RequestError(400, f"inputs[{k}] must be an object with a string 'name'")
            name = t["name"]
            spec = self.input_by_name.get(name)
            if spec is None:
                raise RequestError(400, f"unknown input '{name[:100]}' for model '{self.name}'; its inputs are "
                                   + ", ".join(f"'{i.name}'" for i in self.inputs))
            if name in feeds:
                raise RequestError(400, f"input '{name}' is given twice")
            if t.get("datatype") != spec.datatype:
                raise RequestError(400, f"input '{name}': datatype {t.get('datatype')!r} does not match the "
                                   f"model's {spec.datatype}")
            shape = _shape(t.get("shape"), name)
            self._check_shape(spec, shape)
            count = math.prod(shape)
            tp = _dict(t.get("parameters"), f"input '{name}' parameters")
            if "shared_memory_region" in tp:
                raise RequestError(400, f"input '{name}': shared memory is not supported by this server")
            if "binary_data_size" in tp:
                size = tp["binary_data_size"]
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise RequestError(400, f"input '{name}': binary_data_size must be a non-negative integer")
                if "data" in t:
                    raise RequestError(400, f"input '{name}' has both 'data' and binary_data_size")
                want = count * spec.dtype.itemsize
                if size != want:
                    raise RequestError(400, f"input '{name}': binary_data_size is {size} bytes, but shape "
                                       f"{shape} of {spec.datatype} needs {want}")
                if offset + size > len(binary):
                    raise RequestError(400, f"truncated binary data: input '{name}' needs bytes {offset}.."
                                       f"{offset + size} after the JSON header, the body has {len(binary)}")
                feeds[name] = np.frombuffer(binary[offset:offset + size], dtype=spec.dtype).reshape(shape)
                offset += size
            elif "data" in t:
                feeds[name] = _json_tensor(t["data"], spec, shape, count)
            else:
                raise RequestError(400, f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        if offset != len(binary):
            raise RequestError(400, f"{len(binary)} bytes of binary data follow the JSON header, but the inputs "
                               f"declare {offset}")
        missing = [i.name for i in self.inputs if i.name not in feeds]
        if missing:
            raise RequestError(400, f"missing input(s) for model '{self.name}': "
                               + ", ".join(f"'{n}'" for n in missing))
        self._check_symbols(feeds)
        p = Parsed(feeds, self._requested_outputs(req.get("outputs"), params), rid)
        self._sequence_params(params, p)
        if self.batch_source is not None:
            p.batch = int(feeds[self.batch_source].shape[0])
        return p

    def _check_shape(self, spec: TensorSpec, shape: list[int]) -> None:
        if len(shape) != len(spec.shape):
            raise RequestError(400, f"input '{spec.name}': shape {shape} has rank {len(shape)}, the model expects "
                               f"rank {len(spec.shape)} ({spec.dims})")
        for a, got in enumerate(shape):
            want = spec.static(a)
            if want is not None and got != want:
                raise RequestError(400, f"input '{spec.name}': dim {a} is {got}, the model requires {want} "
                                   f"(shape {spec.dims})")
        if shape and spec.static(0) is None:
            if shape[0] < 1:
                raise RequestError(400, f"input '{spec.name}': batch (dim 0) must be at least 1")
            if shape[0] > self.limits.max_batch:
                raise RequestError(400, f"input '{spec.name}': batch {shape[0]} exceeds the server's limit of "
                                   f"{self.limits.max_batch} (--max-batch)")
        if len(shape) >= 2 and spec.static(1) is None and shape[1] > self.limits.max_seq:
            raise RequestError(400, f"input '{spec.name}': dim 1 is {shape[1]}, over the server's limit of "
                               f"{self.limits.max_seq} (--max-seq)")

    def _check_symbols(self, feeds: dict[str, np.ndarray]) -> None:
        """Dims that share a symbolic name in the graph (batch, sequence) must agree across inputs."""
        seen: dict[str, tuple[int, str, int]] = {}
        for spec in self.inputs:
            for a, sym in enumerate(spec.shape):
                if not isinstance(sym, str):
                    continue
                got = int(feeds[spec.name].shape[a])
                if sym in seen and seen[sym][0] != got:
                    v, other, oa = seen[sym]
                    raise RequestError(400, f"input '{spec.name}' dim {a} is {got} but input '{other}' dim {oa} "
                                       f"is {v}; the model requires them equal ('{sym}')")
                seen.setdefault(sym, (got, spec.name, a))

    def _requested_outputs(self, outs, params: dict) -> list[tuple[str, bool]]:
        default = params.get("binary_data_output", False)
        if not isinstance(default, bool):
            raise RequestError(400, "parameters.binary_data_output must be a boolean")
        if outs is None:
            return [(o.name, default) for o in self.outputs]
        if not isinstance(outs, list):
            raise RequestError(400, "'outputs' must be a list")
        result: list[tuple[str, bool]] = []
        for k, o in enumerate(outs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise RequestError(400, f"outputs[{k}] must be an object with a string 'name'")
            name = o["name"]
            if name not in self.output_by_name:
                raise RequestError(400, f"unknown output '{name[:100]}' for model '{self.name}'; its outputs are "
                                   + ", ".join(f"'{t.name}'" for t in self.outputs))
            if any(name == n for n, _ in result):
                raise RequestError(400, f"output '{name}' is requested twice")
            op = _dict(o.get("parameters"), f"output '{name}' parameters")
            for unsupported in ("classification", "shared_memory_region"):
                if unsupported in op:
                    raise RequestError(400, f"output '{name}': {unsupported} is not supported by this server")
            binary = op.get("binary_data", default)
            if not isinstance(binary, bool):
                raise RequestError(400, f"output '{name}': binary_data must be a boolean")
            result.append((name, binary))
        return result

    def _sequence_params(self, params: dict, p: Parsed) -> None:
        sid = params.get("sequence_id", 0)
        if isinstance(sid, bool) or not isinstance(sid, (int, str)):
            raise RequestError(400, "parameters.sequence_id must be an integer or a string")
        if isinstance(sid, int) and not 0 <= sid < 2**64:
            raise RequestError(400, "parameters.sequence_id must be an unsigned 64-bit integer")
        if isinstance(sid, str) and len(sid) > 256:
            raise RequestError(400, "parameters.sequence_id: a string id is at most 256 characters")
        for flag in ("sequence_start", "sequence_end"):
            if not isinstance(params.get(flag, False), bool):
                raise RequestError(400, f"parameters.{flag} must be a boolean")
        p.start, p.end = params.get("sequence_start", False), params.get("sequence_end", False)
        if sid in (0, ""):
            if p.start or p.end:
                raise RequestError(400, "sequence_start/sequence_end need a non-zero sequence_id")
            return
        p.sequence_id = sid

    def execute(self, p: Parsed) -> dict[str, np.ndarray]:
        if not self.stateful:  # stateless graphs ignore sequence parameters, as a model without a cache has none
            names = [n for n, _ in p.outputs]
            return dict(zip(names, _ort(self.session.run, names, p.feeds)))
        if p.sequence_id is None:
            return _ort(self.new_state(p.batch).run, p.feeds)
        sid = p.sequence_id
        if p.start and p.end:  # a one-request sequence: nothing to keep (and a live one of that id is ended)
            out = _ort(self.new_state(p.batch).run, p.feeds)
            self.sequences.discard(sid)
            return out
        if p.start:
            self.sequences.check_room(sid)
            seq = Sequence(self.new_state(p.batch), p.batch)
        else:
            seq = self.sequences.get(sid, self.name)
        with seq.lock:
            if not seq.alive:
                raise RequestError(400, f"sequence {sid!r} ended or idled out while this request waited")
            if seq.batch != p.batch:
                raise RequestError(400, f"sequence {sid!r} has batch {seq.batch}, this request has {p.batch}")
            if seq.state.past_length >= self.limits.max_seq:
                raise RequestError(400, f"sequence {sid!r} already holds {seq.state.past_length} tokens, the "
                                   f"server's limit (--max-seq)")
            out = _ort(seq.state.run, p.feeds)
            seq.last_used = time.monotonic()
        if p.start:
            self.sequences.register(sid, seq)
        if p.end:
            self.sequences.drop(sid, seq)
        return out

    def encode(self, p: Parsed, out: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
        entries, blobs = [], []
        for name, binary in p.outputs:
            spec = self.output_by_name[name]
            arr = np.ascontiguousarray(out[name], dtype=spec.dtype)
            e = {"name": name, "datatype": spec.datatype, "shape": list(arr.shape)}
            if binary:
                blob = arr.tobytes()
                e["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                e["data"] = arr.ravel().tolist()
            entries.append(e)
        resp: dict = {"model_name": self.name, "model_version": MODEL_VERSION}
        if p.request_id is not None:
            resp["id"] = p.request_id
        resp["outputs"] = entries
        head = json.dumps(resp, separators=(",", ":")).encode()
        if not blobs:
            return head, None
        return b"".join([head, *blobs]), len(head)


def _dict(v, what: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise RequestError(400, f"{what} must be a JSON object")
    return v


def _shape(shape, name: str) -> list[int]:
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise RequestError(400, f"input '{name}': 'shape' must be a list of non-negative integers")
    return shape


def _json_tensor(data, spec: TensorSpec, shape: list[int], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(400, f"input '{spec.name}': 'data' must be a list")
    try:
        arr = np.array(data)
    except (ValueError, OverflowError):
        raise RequestError(400, f"input '{spec.name}': 'data' is ragged or out of range")
    if arr.size != count:
        raise RequestError(400, f"input '{spec.name}': {arr.size} values for shape {shape} ({count} expected)")
    if count == 0:
        return np.zeros(shape, dtype=spec.dtype)
    kind, want = arr.dtype.kind, spec.dtype.kind
    ok = {"b": kind == "b", "i": kind in "iu", "u": kind in "iu", "f": kind in "iuf"}.get(want, False)
    if not ok:
        what = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}.get(want, spec.datatype)
        raise RequestError(400, f"input '{spec.name}': 'data' must be {what} for {spec.datatype}")
    if want in "iu":
        info = np.iinfo(spec.dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise RequestError(400, f"input '{spec.name}': a value is out of range for {spec.datatype}")
    return arr.astype(spec.dtype).reshape(shape)


def _ort(fn: Callable, *args):
    """ONNX Runtime's complaints about inputs (shapes that disagree inside the graph, indices out of range) are
    the request's fault: a 400 naming the first line, never a dead worker."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    try:
        return fn(*args)
    except (st.InvalidArgument, st.Fail, st.RuntimeException) as e:
        line = str(e).replace("\n", " ")
        raise RequestError(400, f"the model rejected these inputs: {line[:300]}")


# ---------------------------------------------------------------------------------------------------------------
# HTTP


class Metrics:
    def __init__(self, models: dict[str, Model], pool_state: PoolState):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("stip_requests", "HTTP requests by model, endpoint and status",
                                ["model", "endpoint", "status"], registry=self.registry)
        buckets = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30)
        self.latency = Histogram("stip_request_duration_seconds", "HTTP request latency (receive to response)",
                                 ["model", "endpoint"], buckets=buckets, registry=self.registry)
        self.compute = Histogram("stip_inference_duration_seconds", "time in a worker: parse, ONNX Runtime, encode",
                                 ["model"], buckets=buckets, registry=self.registry)
        live = Gauge("stip_live_sequences", "live generation sequences (server-held KV caches)", ["model"],
                     registry=self.registry)
        for m in models.values():
            live.labels(model=m.name).set_function(lambda m=m: len(m.sequences))
        self.expired = Counter("stip_sequences_expired", "sequences freed by the idle timeout", ["model"],
                               registry=self.registry)
        Gauge("stip_queue_depth", "inference requests waiting for a worker", registry=self.registry) \
            .set_function(lambda: pool_state.waiting)
        Gauge("stip_inflight_requests", "inference requests running in a worker", registry=self.registry) \
            .set_function(lambda: pool_state.running)
        self.rejected = Counter("stip_rejected_requests", "inference requests refused because the queue was full",
                                ["model"], registry=self.registry)


@dataclass
class PoolState:
    waiting: int = 0
    running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _classify(path: str, models: dict[str, Model]) -> tuple[str, str]:
    """(endpoint, model) labels; an unknown model name is never a label (no cardinality from clients)."""
    parts = [p for p in path.split("/") if p]
    if parts == ["metrics"]:
        return "metrics", ""
    if parts[:1] != ["v2"]:
        return "other", ""
    if len(parts) == 1:
        return "server_metadata", ""
    if parts[1] == "health" and len(parts) == 3 and parts[2] in ("live", "ready"):
        return "health_" + parts[2], ""
    if parts[1] == "repository":
        return "repository", ""
    if parts[1] == "models" and len(parts) >= 3:
        model = parts[2] if parts[2] in models else ""
        rest = parts[3:]
        if rest[:1] == ["versions"]:
            rest = rest[2:]
        tail = rest[0] if rest else ""
        return {"": "model_metadata", "infer": "infer", "ready": "model_ready",
                "config": "model_config"}.get(tail, "other"), model
    return "other", ""


class _MetricsMiddleware:
    def __init__(self, app, metrics: Metrics, models: dict[str, Model]):
        self.app, self.metrics, self.models = app, metrics, models

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint, model = _classify(scope["path"], self.models)
        status = 500
        t0 = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(model, endpoint, str(status)).inc()
            self.metrics.latency.labels(model, endpoint).observe(time.perf_counter() - t0)


def _error(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request, limit: int) -> bytes:
    too_big = RequestError(413, f"request body over the server's limit of {limit} bytes (--max-request-bytes)")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise RequestError(400, "Content-Length must be an integer")
        if n > limit:
            raise too_big
    from starlette.requests import ClientDisconnect

    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected before sending the whole request body")
    body = b"".join(chunks)
    enc = request.headers.get("content-encoding", "").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate"):
        raise RequestError(415, f"Content-Encoding {enc!r} is not supported (gzip, deflate)")
    d = zlib.decompressobj(31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise RequestError(400, f"the {enc} request body is corrupt: {e}")
    if len(out) > limit or d.unconsumed_tail:
        raise too_big
    if not d.eof:
        raise RequestError(400, f"the {enc} request body is truncated")
    return out


def build_app(models: list[Model], limits: Limits):
    """The FastAPI app: OIP endpoints for `models`, /metrics, and the sequence reaper."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    by_name = {m.name: m for m in models}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="stip-ort")
    state = PoolState()
    metrics = Metrics(by_name, state)
    stopping = threading.Event()

    async def reaper():
        interval = max(0.05, min(1.0, limits.sequence_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for m in models:
                freed = m.sequences.reap(now)
                if freed:
                    metrics.expired.labels(m.name).inc(freed)
                    log.info("model '%s': freed %d idle sequence(s)", m.name, freed)

    @asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            stopping.set()
            task.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="stip", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc):
        msg = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(exc.status_code,
                                                                                       str(exc.detail))
        return _error(exc.status_code, f"{msg}: {_request.method} {_request.url.path}")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc):
        return _error(400, f"bad request: {' '.join(str(exc).split())[:200]}")

    def model_or_404(name: str, version: str | None) -> Model:
        m = by_name.get(name)
        if m is None:
            raise RequestError(404, f"unknown model '{name[:100]}'; this server has "
                               + ", ".join(f"'{n}'" for n in by_name))
        if version not in (None, "", MODEL_VERSION):
            raise RequestError(404, f"unknown version '{version[:100]}' of model '{name}'; it has version "
                               f"{MODEL_VERSION}")
        return m

    @app.exception_handler(RequestError)
    async def request_error(_request, exc: RequestError):
        return _error(exc.status, exc.message)

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        if stopping.is_set():
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata():
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("stip")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            v = "0"
        return {"name": SERVER_NAME, "version": v, "extensions": EXTENSIONS}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        return model_or_404(name, version).metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        m = model_or_404(name, version)
        return {"name": m.name, "version": MODEL_VERSION, "ready": True}

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None):
        return model_or_404(name, version).config()

    @app.post("/v2/repository/index")
    async def repository_index():
        return [{"name": m.name, "version": MODEL_VERSION, "state": "READY"} for m in models]

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def work(m: Model, body: bytes, header_length: str | None):
        with state.lock:
            state.waiting -= 1
            state.running += 1
        t0 = time.perf_counter()
        try:
            p = m.parse(body, header_length)
            return m.encode(p, m.execute(p))
        finally:
            metrics.compute.labels(m.name).observe(time.perf_counter() - t0)
            with state.lock:
                state.running -= 1

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None):
        m = model_or_404(name, version)
        body = await _read_body(request, limits.max_request_bytes)
        with state.lock:
            if state.waiting + state.running >= limits.workers + limits.max_queue:
                metrics.rejected.labels(m.name).inc()
                raise RequestError(503, f"server busy: {state.waiting} requests queued (--max-queue "
                                   f"{limits.max_queue}); retry later")
            state.waiting += 1
        def unqueue() -> None:
            with state.lock:
                state.waiting -= 1

        try:
            fut = pool.submit(work, m, body, request.headers.get(HEADER_LENGTH))
        except RuntimeError:  # the pool is shut down: the server is stopping
            unqueue()
            raise RequestError(503, "server is shutting down")
        # a request cancelled before a worker took it (client gone, shutdown) must give its queue place back
        fut.add_done_callback(lambda f: unqueue() if f.cancelled() else None)
        try:
            content, header_len = await asyncio.wrap_future(fut)
        except RequestError:
            raise
        except Exception as e:  # a bug, not the request's fault: 500, logged, and the server keeps serving
            log.exception("model '%s': inference failed", m.name)
            return _error(500, f"internal error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        if header_len is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_len)})

    return _MetricsMiddleware(app, metrics, by_name)


def parse_model_args(specs: list[str], default_name: str) -> list[tuple[str, str]]:
    """`DIR` (named --model-name) or `NAME=DIR`, repeatable: (name, dir) pairs."""
    out: list[tuple[str, str]] = []
    for s in specs:
        name, sep, path = s.partition("=")
        if sep and name and not Path(s).exists():
            out.append((name, path))
        else:
            out.append((default_name, s))
    names = [n for n, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise StipError(f"model name '{dup}' is used twice; serve several bundles as NAME=DIR")
    for n in names:
        if not n or "/" in n or n.strip() != n:
            raise StipError(f"model name {n!r}: use a non-empty name without '/' or spaces")
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(specs: list[str], *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          model_name: str = "stip", limits: Limits | None = None, threads: int = 0, io_binding: str = "auto",
          log_level: str = "info", access_log: bool = False) -> int:
    import uvicorn

    limits = limits or Limits()
    for flag, v in (("--max-batch", limits.max_batch), ("--max-seq", limits.max_seq),
                    ("--max-request-bytes", limits.max_request_bytes), ("--workers", limits.workers),
                    ("--max-sequences", limits.max_sequences)):
        if v < 1:
            raise StipError(f"{flag} must be at least 1")
    if limits.max_queue < 0 or limits.sequence_timeout <= 0:
        raise StipError("--max-queue must be >= 0 and --sequence-timeout > 0")
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="stip serve: %(message)s")
    log.setLevel(getattr(logging, log_level.upper(), logging.INFO))
    sock = listen(host, port)  # before loading models: a busy port is one clear line, not a late crash
    try:
        models = [Model(n, d, device=device, threads=threads, io_binding=io_binding, limits=limits)
                  for n, d in parse_model_args(specs, model_name)]
        for m in models:
            kind = f"KV cache ({len(m.pairs)} tensors, server-held)" if m.stateful else "stateless"
            log.info("model '%s' from %s: key id %s, ONNX Runtime providers %s%s, %s", m.name, m.path, m.key_id,
                     m.providers, " (IO binding)" if m.io_binding and m.stateful else "", kind)
        if not is_loopback(host):
            log.warning("listening on %s: reachable beyond this machine; put TLS and authentication in front",
                        host)
        bound = sock.getsockname()
        log.info("listening on http://%s:%d (KServe v2 / Open Inference Protocol), %d workers, pid %d",
                 f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0], bound[1], limits.workers,
                 os.getpid())
        app = build_app(models, limits)
        config = uvicorn.Config(app, log_level="warning" if log_level == "info" else log_level,
                                access_log=access_log, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def listen(host: str, port: int) -> socket.socket:
    if not 0 <= port < 65536:
        raise StipError(f"--port {port}: expected 0..65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as e:
        raise StipError(f"--host {host}: cannot resolve it: {e}")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise StipError(f"cannot listen on {host}:{port}: {e.strerror or e}")
    sock.set_inheritable(True)
    return sock
