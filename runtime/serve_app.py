"""The routes of `stip serve` (KServe v2 / Open Inference Protocol), /metrics, the worker pool and the sequence
reaper, assembled into one ASGI app. Inference work (decompression, JSON parsing, ONNX Runtime, encoding) runs in
the worker pool, so a large body never blocks the event loop and health checks stay fast."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Request

from stip.runtime.serve_http import (
    OWNER,
    Guard,
    MetricsMiddleware,
    error_body,
    read_body,
)
from stip.runtime.serve_limits import BufferBudget, Limits, MemoryBudget
from stip.runtime.serve_model import Model
from stip.runtime.serve_protocol import HEADER_LENGTH, MODEL_VERSION, RequestError, parse_request

log = logging.getLogger("stip.serve")

SERVER_NAME = "stip"
JSON_PARSE_FACTOR = 4
EXTENSIONS = ["binary_tensor_data", "sequence", "model_configuration", "model_repository"]


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stip")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


@dataclass
class PoolState:
    waiting: int = 0
    running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Dispatcher:
    """The worker pool and its queue, shared by HTTP and gRPC: one --workers / --max-queue for both transports.
    submit() refuses at once (503, or RESOURCE_EXHAUSTED over gRPC) when every worker is busy and the queue is
    full; a request cancelled before a worker took it gives its queue place back."""

    def __init__(self, limits: Limits, state: PoolState, metrics: Metrics):
        self.limits, self.state, self.metrics = limits, state, metrics
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="stip-ort")

    def submit(self, m: Model, fn, *args) -> concurrent.futures.Future:
        state = self.state
        with state.lock:
            if state.waiting + state.running >= self.limits.workers + self.limits.max_queue:
                self.metrics.rejected.labels(m.name).inc()
                raise RequestError(503, f"server busy: {state.waiting} requests queued (--max-queue "
                                   f"{self.limits.max_queue}); retry later", {"Retry-After": "1"})
            state.waiting += 1

        def unqueue() -> None:
            with state.lock:
                state.waiting -= 1

        def run():
            with state.lock:
                state.waiting -= 1
                state.running += 1
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.metrics.compute.labels(m.name).observe(time.perf_counter() - t0)
                with state.lock:
                    state.running -= 1

        try:
            fut = self.pool.submit(run)
        except RuntimeError:  # the pool is shut down: the server is stopping
            unqueue()
            raise RequestError(503, "server is shutting down")
        fut.add_done_callback(lambda f: unqueue() if f.cancelled() else None)
        return fut


@dataclass
class Core:
    """What every transport shares: the models, limits, auth, memory budget, worker pool and queue."""
    models: dict[str, Model]
    limits: Limits
    tokens: object
    budget: MemoryBudget
    dispatcher: Dispatcher
    metrics: Metrics
    stopping: threading.Event

    @property
    def authenticated(self) -> bool:
        return self.tokens is not None

    def model(self, name: str, version: str | None) -> Model:
        m = self.models.get(name)
        if m is None:
            raise RequestError(404, f"unknown model '{name[:100]}'; this server has "
                               + ", ".join(f"'{n}'" for n in self.models))
        if version not in (None, "", MODEL_VERSION):
            raise RequestError(404, f"unknown version '{version[:100]}' of model '{name}'; it has version "
                               f"{MODEL_VERSION}")
        return m


class Metrics:
    def __init__(self, models: dict[str, Model], pool_state: PoolState, budget: MemoryBudget):
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
        Gauge("stip_memory_budget_used_bytes", "bytes of --max-memory reserved by requests and held by KV caches",
              registry=self.registry).set_function(lambda: budget.used)
        self.rejected = Counter("stip_rejected_requests", "inference requests refused because the queue was full",
                                ["model"], registry=self.registry)


class ParserProcess:
    """Parses large JSON requests in a child process: json.loads and numpy's list conversion hold the GIL for the
    whole parse (about a second for 20 MiB), which in a thread would still stall the event loop and every health
    check. Small requests are parsed in the worker thread, where a child's round trip would cost more."""

    THRESHOLD = 1 << 20   # bytes of JSON text

    def __init__(self):
        self.pool = None
        self.lock = threading.Lock()

    def _pool(self):
        import multiprocessing

        with self.lock:
            if self.pool is None:
                self.pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_exit_with_parent, initargs=(os.getpid(),))
            return self.pool

    def start(self) -> None:
        self._pool().submit(int).result(timeout=60)  # spawn it now, not on the first large request

    def parse(self, sig, body: bytes, header_length: str | None):
        json_part = int(header_length) if header_length and header_length.isdigit() else len(body)
        if json_part < self.THRESHOLD:
            return None
        try:
            return self._pool().submit(parse_request, sig, body, header_length).result()
        except concurrent.futures.process.BrokenProcessPool:
            with self.lock:
                self.pool = None
            raise RequestError(503, "the request parser was restarted (out of memory?); retry later")

    def stop(self) -> None:
        with self.lock:
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None


def _exit_with_parent(parent: int) -> None:
    """Runs in the parser child: a server killed with SIGKILL cannot shut its pool down, so the child watches for
    its parent to go and exits then, instead of living on as an orphan (with multiprocessing's resource tracker)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="stip-parent-watch", daemon=True).start()


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    too_big = RequestError(413, f"request body over the server's limit of {limit} bytes (--max-request-bytes)")
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


def build_app(models: list[Model], limits: Limits, tokens=None, allowed_hosts: set[str] | None = None,
              budget: MemoryBudget | None = None, grpc=None):
    """The ASGI app: OIP endpoints for `models`, /metrics (behind the same auth), and the sequence reaper.
    `grpc(core)`, if given, starts the gRPC endpoint on the same Core at startup and returns it (stop(grace))."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    by_name = {m.name: m for m in models}
    budget = budget or (models[0].budget if models else MemoryBudget(limits.max_memory))
    buffers = BufferBudget(limits.max_buffered_bytes)
    state = PoolState()
    metrics = Metrics(by_name, state, budget)
    dispatcher = Dispatcher(limits, state, metrics)
    pool = dispatcher.pool
    stopping = threading.Event()
    core = Core(by_name, limits, tokens, budget, dispatcher, metrics, stopping)
    authenticated = tokens is not None
    parser = ParserProcess()

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
        await asyncio.get_running_loop().run_in_executor(None, parser.start)
        task = asyncio.create_task(reaper())
        grpc_server = grpc(core) if grpc is not None else None
        try:
            yield
        finally:
            stopping.set()
            if grpc_server is not None:
                grpc_server.stop(2)
            task.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            parser.stop()

    app = FastAPI(title="stip", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc):
        msg = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(exc.status_code,
                                                                                       str(exc.detail))
        return error_body(exc.status_code, f"{msg}: {_request.method} {_request.url.path[:100]}")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc):
        return error_body(400, f"bad request: {' '.join(str(exc).split())[:200]}")

    @app.exception_handler(RequestError)
    async def request_error(_request, exc: RequestError):
        return error_body(exc.status, exc.message, exc.headers)

    model_or_404 = core.model

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
        return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}

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

    def work(m: Model, body: bytes, encoding: str, header_length: str | None, owner: str):
        try:
            # the decoded body, and for JSON its Python objects (about 4 bytes of heap per byte of JSON text),
            # are charged to the memory budget before decompressing or parsing
            size = len(body) if encoding.strip().lower() in ("", "identity") else limits.max_request_bytes
            reserved = budget.reserve(size * (1 if header_length else 1 + JSON_PARSE_FACTOR))
            try:
                raw = decompress(body, encoding, limits.max_request_bytes)
                return m.handle(raw, header_length, owner, authenticated, parser.parse(m.sig, raw, header_length))
            finally:
                budget.release(reserved)
        except RecursionError:
            raise RequestError(400, "the request is nested too deeply")

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None):
        m = model_or_404(name, version)
        encoding = request.headers.get("content-encoding", "")
        if encoding.strip().lower() not in ("", "identity", "gzip", "deflate"):
            raise RequestError(415, f"Content-Encoding {encoding[:40]!r} is not supported (gzip, deflate)")
        body, buffered = await read_body(request, limits.max_request_bytes, buffers, limits.body_timeout)
        try:
            fut = dispatcher.submit(m, work, m, body, encoding, request.headers.get(HEADER_LENGTH),
                                    request.scope.get(OWNER, ""))
            del body
            try:
                content, header_len = await asyncio.wrap_future(fut)
            except RequestError:
                raise
            except MemoryError:
                log.error("model '%s': out of memory; lower --max-memory", m.name)
                return error_body(503, "the server ran out of memory for this request; retry later")
            except Exception as e:  # a bug, not the request's fault: 500, logged, and the server keeps serving
                log.exception("model '%s': inference failed", m.name)
                return error_body(500, f"internal error: {type(e).__name__}")
        finally:
            buffers.give(buffered)
        if header_len is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_len)})

    return MetricsMiddleware(Guard(app, allowed_hosts, tokens), metrics, by_name)
