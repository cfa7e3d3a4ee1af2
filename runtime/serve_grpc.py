"""The gRPC endpoint of `stip serve`: KServe v2 GRPCInferenceService, as Triton serves it on its gRPC port.

Why: a client switches between `stip serve` and Triton by changing the URL alone (grpc://HOST:PORT), and gRPC
costs less per token than HTTP. The protocol is the one tritonclient ships (tritonclient.grpc.service_pb2 and
service_pb2_grpc); nothing here is hand-written wire format.

Nothing is enforced twice: a ModelInferRequest is turned into the HTTP request's shape (a request object and its
raw tensor bytes) and checked by serve_protocol.parse_object, then run by Model.handle through the shared
Dispatcher (one worker pool and queue for both transports), under the same memory budget, sequence store and
ownership rules. Bearer tokens come from the `authorization` metadata. Every RequestError becomes a gRPC status
(4xx -> INVALID_ARGUMENT, UNAUTHENTICATED, NOT_FOUND, RESOURCE_EXHAUSTED, ...); only a bug is INTERNAL.

What gRPC has instead of the HTTP edge: grpc options cap the message size (--max-request-bytes), the concurrent
calls (--workers + --max-queue, beyond which grpc itself answers RESOURCE_EXHAUSTED) and the streams per
connection; there is no Host header check (browsers cannot speak gRPC) and no per-client connection cap.
Outputs always travel as raw bytes (raw_output_contents), so the JSON response cap does not apply.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import time
from pathlib import Path

import numpy as np

from stip.runtime.errors import StipError
from stip.runtime.serve_protocol import MODEL_VERSION, Parsed, RequestError, Signature, parse_object

log = logging.getLogger("stip.serve")

DEFAULT_PORT = 8001      # Triton's gRPC port: the same URL works against either server
OPEN_METHODS = {"ServerLive", "ServerReady"}   # health checks stay open for load balancers, as over HTTP
HEADROOM = 16            # concurrent calls beyond workers + queue, so health checks get through a full queue

# typed `contents` fields of InferTensorContents, by datatype (FP16 has none: it must come as raw bytes)
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}


def status_code(e: RequestError):
    """The gRPC status for a refusal that HTTP answers with e.status."""
    import grpc

    c = grpc.StatusCode
    if e.status == 503:
        if "shutting down" in e.message or "token file" in e.message:
            return c.UNAVAILABLE
        return c.RESOURCE_EXHAUSTED  # busy queue, memory budget in use: retry later
    return {401: c.UNAUTHENTICATED, 403: c.PERMISSION_DENIED, 404: c.NOT_FOUND, 408: c.DEADLINE_EXCEEDED,
            413: c.RESOURCE_EXHAUSTED, 429: c.RESOURCE_EXHAUSTED}.get(e.status, c.INVALID_ARGUMENT)


def param_value(p, what: str):
    kind = p.WhichOneof("parameter_choice")
    if kind is None:
        raise RequestError(400, f"{what}: a parameter without a value")
    return getattr(p, kind)


def to_request(r) -> tuple[dict, bytes]:
    """A ModelInferRequest as the HTTP request object plus its binary tensor data, for parse_object."""
    params = {k: param_value(v, f"parameters.{k}"[:120]) for k, v in r.parameters.items()}
    params.pop("binary_data_output", None)  # an HTTP notion: gRPC outputs are always raw bytes
    raw = list(r.raw_input_contents)
    if raw and len(raw) != len(r.inputs):
        raise RequestError(400, f"raw_input_contents has {len(raw)} entries for {len(r.inputs)} inputs; give one "
                           "per input, in order, or none (typed contents)")
    inputs = []
    for k, t in enumerate(r.inputs):
        e: dict = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        tp = {n: param_value(v, f"input '{t.name[:100]}' parameters.{n[:40]}") for n, v in t.parameters.items()}
        if "binary_data_size" in tp:
            raise RequestError(400, f"input '{t.name[:100]}': binary_data_size is an HTTP parameter; over gRPC "
                               "send raw_input_contents")
        if raw:
            if t.HasField("contents"):
                raise RequestError(400, f"input '{t.name[:100]}' has both contents and raw_input_contents")
            tp["binary_data_size"] = len(raw[k])
        elif t.datatype in CONTENTS and t.HasField("contents"):
            e["data"] = list(getattr(t.contents, CONTENTS[t.datatype]))
        else:
            raise RequestError(400, f"input '{t.name[:100]}' has no data: send raw_input_contents (as tritonclient "
                               "does) or typed contents")
        e["parameters"] = tp
        inputs.append(e)
    req: dict = {"inputs": inputs, "parameters": params}
    if r.id:
        req["id"] = r.id
    if r.outputs:
        req["outputs"] = [{"name": o.name, "parameters": {
            **{n: param_value(v, f"output '{o.name[:100]}' parameters.{n[:40]}") for n, v in o.parameters.items()},
            "binary_data": True}} for o in r.outputs]
    return req, b"".join(raw)


def encode(sig: Signature, p: Parsed, out: dict[str, np.ndarray]):
    """The ModelInferResponse for a finished request (Model.handle's encoder on this transport)."""
    from tritonclient.grpc import service_pb2 as pb

    resp = pb.ModelInferResponse(model_name=sig.name, model_version=MODEL_VERSION, id=p.request_id or "")
    for name, _ in p.outputs:
        spec = sig.out_by_name[name]
        arr = np.ascontiguousarray(out[name], dtype=spec.dtype)
        resp.outputs.add(name=name, datatype=spec.datatype, shape=list(arr.shape))
        resp.raw_output_contents.append(arr.tobytes())
    return resp


class BadMessage:
    """What a request that protobuf cannot decode turns into: the handler answers INVALID_ARGUMENT (grpc itself
    would answer INTERNAL, as if the server had failed)."""

    def __init__(self, error: Exception):
        self.error = error


def tolerant_deserializers():
    """A server interceptor whose handlers decode requests without raising (see BadMessage)."""
    import grpc

    class Interceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            handler = continuation(details)
            decode = getattr(handler, "request_deserializer", None)
            if decode is None:
                return handler

            def safe(data: bytes):
                try:
                    return decode(data)
                except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
                    return BadMessage(e)

            return handler._replace(request_deserializer=safe)

    return Interceptor()


def servicer(core):
    """The GRPCInferenceService implementation over a serve_app.Core."""
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    def rpc(method):
        name = method.__name__

        def call(self, request, context):
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            model = str(getattr(request, "model_name", None) or getattr(request, "name", ""))
            try:
                if isinstance(request, BadMessage):
                    raise RequestError(400, f"the {name} request is not a valid protobuf message "
                                       f"({str(request.error)[:100]})")
                owner = ""
                if core.tokens is not None and name not in OPEN_METHODS:
                    md = {k.lower(): v for k, v in context.invocation_metadata()}
                    value = md.get("authorization")
                    owner = core.tokens.owner(value if isinstance(value, str) else None)
                return method(self, request, context, owner)
            except RequestError as e:
                code, msg = status_code(e), e.message
            except MemoryError:
                log.error("gRPC %s: out of memory; lower --max-memory", name)
                code, msg = grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory; retry later"
            except concurrent.futures.CancelledError:
                code, msg = grpc.StatusCode.CANCELLED, "cancelled"
            except Exception as e:  # a bug, not the request's fault: logged, and the server keeps serving
                log.exception("gRPC %s failed", name)
                code, msg = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"
            finally:
                label = model if model in core.models else ""
                core.metrics.requests.labels(label, "grpc_" + name, code.name).inc()
                core.metrics.latency.labels(label, "grpc_" + name).observe(time.perf_counter() - t0)
            context.abort(code, msg)

        call.__name__ = name
        return call

    def infer(m, request, owner: str):
        raw_bytes = sum(len(b) for b in request.raw_input_contents)
        reserved = core.budget.reserve(raw_bytes)  # the joined copy of the raw tensors
        try:
            req, binary = to_request(request)
            parsed = parse_object(m.sig, req, binary)
            return m.handle(b"", None, owner, core.authenticated, parsed, encode=encode)
        finally:
            core.budget.release(reserved)

    class Service(pb_grpc.GRPCInferenceServiceServicer):
        @rpc
        def ServerLive(self, request, context, owner):
            return pb.ServerLiveResponse(live=True)

        @rpc
        def ServerReady(self, request, context, owner):
            return pb.ServerReadyResponse(ready=not core.stopping.is_set())

        @rpc
        def ServerMetadata(self, request, context, owner):
            from stip.runtime.serve_app import EXTENSIONS, SERVER_NAME, server_version

            return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

        @rpc
        def ModelReady(self, request, context, owner):
            core.model(request.name, request.version)
            return pb.ModelReadyResponse(ready=True)

        @rpc
        def ModelMetadata(self, request, context, owner):
            meta = core.model(request.name, request.version).metadata()
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])

        @rpc
        def ModelConfig(self, request, context, owner):
            # the stip key id travels here, in parameters (gRPC model metadata has no parameters field; Triton
            # carries it the same way, from the config that export-triton writes)
            cfg = json_format.ParseDict(core.model(request.name, request.version).config(),
                                        model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
            return pb.ModelConfigResponse(config=cfg)

        @rpc
        def RepositoryIndex(self, request, context, owner):
            return pb.RepositoryIndexResponse(models=[
                pb.RepositoryIndexResponse.ModelIndex(name=n, version=MODEL_VERSION, state="READY")
                for n in core.models])

        @rpc
        def ModelInfer(self, request, context, owner):
            m = core.model(request.model_name, request.model_version)
            fut = core.dispatcher.submit(m, infer, m, request, owner)
            context.add_callback(fut.cancel)  # a client gone before a worker took it gives its queue place back
            return fut.result()

    return Service()


class GrpcEndpoint:
    """A bound gRPC port (bound before the models load, so a busy port is one clear line); start() serves."""

    def __init__(self, host: str, port: int, limits, tls_cert: str | None = None, tls_key: str | None = None):
        import grpc

        if not 0 < port < 65536:
            raise StipError(f"--grpc-port {port}: expected 1..65535, or 0 for no gRPC endpoint")
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:  # a busy port is one clear line here, not grpc's own log lines on stderr and then a failure
            probe.bind((host, port))
        except OSError as e:
            raise StipError(f"--grpc-port {port}: cannot listen on {host}:{port}: {e.strerror or e}")
        finally:
            probe.close()
        calls = limits.workers + limits.max_queue + HEADROOM
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=calls, thread_name_prefix="stip-grpc")
        self.server = grpc.server(self.pool, interceptors=[tolerant_deserializers()],
                                  maximum_concurrent_rpcs=calls, options=[
            ("grpc.max_receive_message_length", limits.max_request_bytes + (64 << 10)),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_concurrent_streams", calls),
            ("grpc.so_reuseport", 0),  # a port held by another server (Triton) is an error, not shared
        ])
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if tls_cert:
                creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(where, creds)
            else:
                self.port = self.server.add_insecure_port(where)
        except RuntimeError as e:
            self.port = 0
            detail = str(e)
        else:
            detail = "the port is in use or the address is not local"
        if not self.port:
            self.pool.shutdown(wait=False)
            raise StipError(f"--grpc-port {port}: cannot listen on {host}:{port} ({detail[:120]})")
        self.scheme = "grpcs" if tls_cert else "grpc"

    def start(self, core) -> GrpcEndpoint:
        from tritonclient.grpc import service_pb2_grpc as pb_grpc

        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer(core), self.server)
        self.server.start()
        return self

    def stop(self, grace: float) -> None:
        self.server.stop(grace).wait(grace + 1)
        self.pool.shutdown(wait=False, cancel_futures=True)
