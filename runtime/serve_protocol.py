"""KServe v2 / Open Inference Protocol wire format: request parsing (JSON tensors and the binary tensor extension)
and response encoding, with no knowledge of ONNX Runtime, sequences or HTTP.

Why its own module: every byte a stranger sends passes through here, so it is kept small enough to read in one go.
Rules beyond the protocol (all refusals are a RequestError with a 4xx):
- JSON is strict: NaN/Infinity literals are refused (they are not JSON), and nesting deeper than the tensor's
  rank is refused before numpy sees it (a RecursionError is a 400 too).
- Every dynamic dim of a request tensor is at least 1, and within --max-batch / --max-seq.
- Shape-value inputs (a 1-D integer input of fixed length, e.g. the `Shape` of the user's tokens) hold no value
  beyond the largest dim a request may have: a lying shape must not make the graph allocate a huge tensor.
- JSON outputs: NaN or Infinity in an output is an error (JSON cannot carry it), and JSON outputs are capped in
  elements (--max-json-response-bytes); both errors say to ask for the binary extension.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from stip.runtime.errors import StipError

HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL_VERSION = "1"
JSON_BYTES_PER_VALUE = 16  # a float32 as JSON text averages 10-20 characters; used for the response cap

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

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def __reduce__(self):  # raised in the JSON parser process, re-raised here
        return RequestError, (self.status, self.message, self.headers)


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

    @property
    def is_shape_value(self) -> bool:
        """A 1-D integer tensor of fixed length: the graph reads its values as dims."""
        return len(self.shape) == 1 and self.static(0) is not None and self.dtype.kind in "iu"

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.dims}


def tensor_spec(info, where: str) -> TensorSpec:
    if info.type not in DATATYPES:
        raise StipError(f"{where}: tensor '{info.name}' has type {info.type}, which stip serve does not support")
    oip, dt = DATATYPES[info.type]
    return TensorSpec(info.name, oip, dt, list(info.shape))


@dataclass
class Signature:
    """What a request is checked against: a model's name, its request-visible tensors and the dim limits."""
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch: int
    max_seq: int
    max_json_values: int
    max_dim: int = 0                  # the largest value a shape-value input may hold
    by_name: dict = field(default_factory=dict)
    out_by_name: dict = field(default_factory=dict)

    def __post_init__(self):
        self.by_name = {t.name: t for t in self.inputs}
        self.out_by_name = {t.name: t for t in self.outputs}
        statics = [d for t in self.inputs + self.outputs for d in t.dims if d > 0]
        self.max_dim = max([self.max_batch, self.max_seq, *statics])


@dataclass
class Parsed:
    feeds: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]            # (name, binary) in response order
    request_id: str | None = None
    sequence_id: int | str | None = None
    start: bool = False
    end: bool = False
    batch: int = 1


def _no_constants(token: str):
    raise RequestError(400, f"'{token}' is not valid JSON; non-finite numbers cannot be sent as JSON (use the "
                       "binary tensor extension, and finite values)")


def loads(text: bytes | memoryview) -> object:
    """Strict JSON: NaN/Infinity literals refused, deep nesting a 400 rather than a RecursionError."""
    try:
        return json.loads(bytes(text), parse_constant=_no_constants)
    except RecursionError:
        raise RequestError(400, "the JSON request is nested too deeply")
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON in the inference request: {str(e)[:200]}")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    """(JSON part, binary part) of a request body."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise RequestError(400, f"{HEADER_LENGTH} must be an integer, got {header_length[:40]!r}")
    if not 0 < n <= len(body):
        raise RequestError(400, f"{HEADER_LENGTH} is {n} but the request body has {len(body)} bytes")
    view = memoryview(body)
    return view[:n], view[n:]


def parse_request(sig: Signature, body: bytes, header_length: str | None) -> tuple[Parsed, dict]:
    """Parse and check an inference request; returns it and its "parameters" object."""
    head, binary = split_body(body, header_length)
    return parse_object(sig, loads(head), binary)


def parse_object(sig: Signature, req, binary: bytes | memoryview) -> tuple[Parsed, dict]:
    """Check a decoded request object with its binary tensor data (HTTP JSON + binary extension, or gRPC turned
    into the same shape by serve_grpc): one set of rules for both transports."""
    binary = memoryview(binary)
    if not isinstance(req, dict):
        raise RequestError(400, "the inference request must be a JSON object")
    params = as_dict(req.get("parameters"), "parameters")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise RequestError(400, "'id' must be a string")
    raw_inputs = req.get("inputs")
    if raw_inputs == [] and params.get("sequence_end") is True and not params.get("sequence_start"):
        if len(binary):
            raise RequestError(400, "an end-of-sequence request without inputs carries no binary data")
        return Parsed({}, [], rid), params  # ends a sequence without running a step (RemoteSequence.close)
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError(400, "the request needs a non-empty 'inputs' list")
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for k, t in enumerate(raw_inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise RequestError(400, f"inputs[{k}] must be an object with a string 'name'")
        name = t["name"]
        spec = sig.by_name.get(name)
        if spec is None:
            raise RequestError(400, f"unknown input '{name[:100]}' for model '{sig.name}'; its inputs are "
                               + ", ".join(f"'{i.name}'" for i in sig.inputs))
        if name in feeds:
            raise RequestError(400, f"input '{name}' is given twice")
        if t.get("datatype") != spec.datatype:
            raise RequestError(400, f"input '{name}': datatype {str(t.get('datatype'))[:20]!r} does not match "
                               f"the model's {spec.datatype}")
        shape = _shape(t.get("shape"), name)
        check_shape(sig, spec, shape)
        count = math.prod(shape)
        tp = as_dict(t.get("parameters"), f"input '{name}' parameters")
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
            arr = np.frombuffer(binary[offset:offset + size], dtype=spec.dtype).reshape(shape)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise RequestError(400, f"input '{name}': NaN or infinite values are not accepted")
            feeds[name] = arr
            offset += size
        elif "data" in t:
            feeds[name] = _json_tensor(t["data"], spec, shape, count)
        else:
            raise RequestError(400, f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        if spec.is_shape_value:
            _check_shape_value(sig, spec, feeds[name])
    if offset != len(binary):
        raise RequestError(400, f"{len(binary)} bytes of binary data follow the JSON header, but the inputs "
                           f"declare {offset}")
    missing = [i.name for i in sig.inputs if i.name not in feeds]
    if missing:
        raise RequestError(400, f"missing input(s) for model '{sig.name}': " + ", ".join(f"'{n}'" for n in missing))
    check_symbols(sig, feeds)
    p = Parsed(feeds, requested_outputs(sig, req.get("outputs"), params), rid)
    return p, params


def check_shape(sig: Signature, spec: TensorSpec, shape: list[int]) -> None:
    if len(shape) != len(spec.shape):
        raise RequestError(400, f"input '{spec.name}': shape {shape[:8]} has rank {len(shape)}, the model expects "
                           f"rank {len(spec.shape)} ({spec.dims})")
    for a, got in enumerate(shape):
        want = spec.static(a)
        if want is not None and got != want:
            raise RequestError(400, f"input '{spec.name}': dim {a} is {got}, the model requires {want} "
                               f"(shape {spec.dims})")
        if want is None and got < 1:
            raise RequestError(400, f"input '{spec.name}': dim {a} is {got}; every dynamic dim must be at least 1")
    if shape and spec.static(0) is None and shape[0] > sig.max_batch:
        raise RequestError(400, f"input '{spec.name}': batch {shape[0]} exceeds the server's limit of "
                           f"{sig.max_batch} (--max-batch)")
    for a in range(1, len(shape)):
        if spec.static(a) is None and shape[a] > sig.max_seq:
            raise RequestError(400, f"input '{spec.name}': dim {a} is {shape[a]}, over the server's limit of "
                               f"{sig.max_seq} (--max-seq)")


def _check_shape_value(sig: Signature, spec: TensorSpec, arr: np.ndarray) -> None:
    if arr.size and (int(arr.max()) > sig.max_dim or int(arr.min()) < -1):
        raise RequestError(400, f"input '{spec.name}' holds dims for the graph; its values must lie in "
                           f"-1..{sig.max_dim} (the largest dim a request may have), got {arr.tolist()[:8]}")


def check_symbols(sig: Signature, feeds: dict[str, np.ndarray]) -> None:
    """Dims that share a symbolic name in the graph (batch, sequence) must agree across inputs."""
    seen: dict[str, tuple[int, str, int]] = {}
    for spec in sig.inputs:
        for a, sym in enumerate(spec.shape):
            if not isinstance(sym, str):
                continue
            got = int(feeds[spec.name].shape[a])
            if sym in seen and seen[sym][0] != got:
                v, other, oa = seen[sym]
                raise RequestError(400, f"input '{spec.name}' dim {a} is {got} but input '{other}' dim {oa} "
                                   f"is {v}; the model requires them equal ('{sym}')")
            seen.setdefault(sym, (got, spec.name, a))


def requested_outputs(sig: Signature, outs, params: dict) -> list[tuple[str, bool]]:
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise RequestError(400, "parameters.binary_data_output must be a boolean")
    if outs is None:
        return [(o.name, default) for o in sig.outputs]
    if not isinstance(outs, list):
        raise RequestError(400, "'outputs' must be a list")
    result: list[tuple[str, bool]] = []
    for k, o in enumerate(outs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise RequestError(400, f"outputs[{k}] must be an object with a string 'name'")
        name = o["name"]
        if name not in sig.out_by_name:
            raise RequestError(400, f"unknown output '{name[:100]}' for model '{sig.name}'; its outputs are "
                               + ", ".join(f"'{t.name}'" for t in sig.outputs))
        if any(name == n for n, _ in result):
            raise RequestError(400, f"output '{name}' is requested twice")
        op = as_dict(o.get("parameters"), f"output '{name}' parameters")
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in op:
                raise RequestError(400, f"output '{name}': {unsupported} is not supported by this server")
        binary = op.get("binary_data", default)
        if not isinstance(binary, bool):
            raise RequestError(400, f"output '{name}': binary_data must be a boolean")
        result.append((name, binary))
    return result


def sequence_params(params: dict, p: Parsed) -> None:
    """Triton's sequence parameters, type-checked; sequence_id 0 or "" means no sequence."""
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


def json_values(sig: Signature, p: Parsed, out_shapes: dict[str, tuple]) -> int:
    return sum(math.prod(out_shapes[n]) for n, binary in p.outputs if not binary)


def encode_response(sig: Signature, p: Parsed, out: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    n_json = json_values(sig, p, {n: np.shape(v) for n, v in out.items()})
    if n_json > sig.max_json_values:
        raise RequestError(413, f"the JSON response would hold {n_json} values, over the server's limit of "
                           f"{sig.max_json_values} (--max-json-response-bytes); ask for binary outputs "
                           "(parameters.binary_data_output: true, the binary tensor extension)")
    entries, blobs = [], []
    for name, binary in p.outputs:
        spec = sig.out_by_name[name]
        arr = np.ascontiguousarray(out[name], dtype=spec.dtype)
        e = {"name": name, "datatype": spec.datatype, "shape": list(arr.shape)}
        if binary:
            blob = arr.tobytes()
            e["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise RequestError(422, f"output '{name}' holds NaN or Infinity, which JSON cannot carry; ask for "
                                   "binary outputs (parameters.binary_data_output: true)")
            e["data"] = arr.ravel().tolist()
        entries.append(e)
    resp: dict = {"model_name": sig.name, "model_version": MODEL_VERSION}
    if p.request_id is not None:
        resp["id"] = p.request_id
    resp["outputs"] = entries
    head = json.dumps(resp, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def as_dict(v, what: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise RequestError(400, f"{what} must be a JSON object")
    return v


def _shape(shape, name: str) -> list[int]:
    if not isinstance(shape, list) or len(shape) > 16 or any(
            isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < 2**62 for d in shape):
        raise RequestError(400, f"input '{name}': 'shape' must be a list of at most 16 non-negative integers")
    return shape


def _depth_ok(data, rank: int) -> bool:
    """Nesting no deeper than the rank, checked iteratively along the first element (numpy recurses)."""
    d = 0
    while isinstance(data, list):
        d += 1
        if d > max(rank, 1):
            return False
        if not data:
            return True
        data = data[0]
    return True


def _json_tensor(data, spec: TensorSpec, shape: list[int], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(400, f"input '{spec.name}': 'data' must be a list")
    if not _depth_ok(data, len(shape)):
        raise RequestError(400, f"input '{spec.name}': 'data' is nested deeper than the tensor's rank")
    try:
        arr = np.array(data)
    except (ValueError, OverflowError, RecursionError):
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
    out = arr.astype(spec.dtype).reshape(shape)
    if want == "f" and not np.isfinite(out).all():
        raise RequestError(400, f"input '{spec.name}': a value is out of range for {spec.datatype}")
    return out
