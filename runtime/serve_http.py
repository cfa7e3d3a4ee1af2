"""The HTTP edge of `stip serve`: what happens before a route runs.

- `GuardedH11Protocol`: uvicorn's HTTP/1.1 protocol with a header read timeout (a client that drips its headers is
  disconnected after --header-timeout seconds) and connection caps (--max-connections in all, and
  --max-connections-per-client per client address, so one client cannot hold every slot): a connection beyond them
  gets a 503 and is closed at once.
- `Guard` (ASGI): the Host header against an allow-list (DNS rebinding), authentication (--auth-tokens; health
  endpoints stay open for load balancers), and the Content-Type of POST bodies (415 unless JSON or the binary
  extension). It runs before FastAPI, so a refused request costs no routing or body read.
- `read_body`: the body with --max-request-bytes, --body-timeout and the cap on bytes buffered across all
  connections (--max-buffered-bytes).
- `MetricsMiddleware`: Prometheus counters by endpoint and status.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time

from stip.runtime.serve_limits import BufferBudget
from stip.runtime.serve_protocol import HEADER_LENGTH, RequestError

OPEN_PATHS = {"/v2/health/live", "/v2/health/ready"}
OWNER = "stip.owner"          # scope key: the authenticated client name ("" without --auth-tokens)


def error_body(status: int, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def send_error(send, status: int, message: str, headers: dict | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def host_of(value: str) -> str:
    """The host part of a Host header, lowercased, without port and IPv6 brackets."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:v.find("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def default_allowed_hosts(bind: str) -> set[str]:
    hosts = {"localhost", "127.0.0.1", "::1"}
    try:
        if not ipaddress.ip_address(bind).is_unspecified:
            hosts.add(bind.lower())
    except ValueError:
        hosts.add(bind.lower())
    return hosts


class Guard:
    def __init__(self, app, allowed_hosts: set[str] | None, tokens=None):
        self.app, self.allowed, self.tokens = app, allowed_hosts, tokens

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.check(scope, headers)
        except RequestError as e:
            return await send_error(send, e.status, e.message, e.headers)
        return await self.app(scope, receive, send)

    def check(self, scope, headers: dict[str, str]) -> None:
        host = headers.get("host")
        if self.allowed is not None and (host is None or host_of(host) not in self.allowed):
            raise RequestError(400, f"Host header {str(host)[:80]!r} is not allowed on this server "
                               "(--allowed-hosts)")
        scope[OWNER] = ""
        if self.tokens is not None and scope["path"] not in OPEN_PATHS:
            scope[OWNER] = self.tokens.owner(headers.get("authorization"))
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            ok = ctype in ("", "application/json") or (ctype == "application/octet-stream"
                                                        and HEADER_LENGTH.lower() in headers)
            if not ok:
                raise RequestError(415, f"Content-Type {ctype[:60]!r} is not accepted: send application/json, or "
                                   f"application/octet-stream with {HEADER_LENGTH} (the binary tensor extension)")


async def read_body(request, limit: int, buffers: BufferBudget, timeout: float) -> tuple[bytes, int]:
    """The raw body and the bytes it holds in `buffers` (the caller gives them back when the request ends)."""
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
    deadline = time.monotonic() + timeout

    async def collect():
        nonlocal total
        async for chunk in request.stream():
            if total + len(chunk) > limit:
                raise too_big
            buffers.take(len(chunk))
            total += len(chunk)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), max(0.0, deadline - time.monotonic()))
    except (asyncio.TimeoutError, ClientDisconnect, RequestError) as e:
        buffers.give(total)
        if isinstance(e, RequestError):
            raise
        if isinstance(e, ClientDisconnect):
            raise RequestError(400, "the client disconnected before sending the whole request body")
        raise RequestError(408, f"the request body was not received within {timeout:g} s (--body-timeout)",
                           {"Connection": "close"})
    return b"".join(chunks), total


def classify(path: str, models: dict) -> tuple[str, str]:
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


class MetricsMiddleware:
    def __init__(self, app, metrics, models: dict):
        self.app, self.metrics, self.models = app, metrics, models

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint, model = classify(scope["path"], self.models)
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


def guarded_protocol(header_timeout: float, max_connections: int, per_client: int = 0):
    """uvicorn's H11Protocol with a header read timeout and connection caps, in all and per client address (a class,
    as uvicorn wants one)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    msg = json.dumps({"error": "too many connections (--max-connections, --max-connections-per-client); "
                      "retry later"}).encode()
    busy = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(msg)).encode() + b"\r\n\r\n" + msg)

    class GuardedH11Protocol(H11Protocol):
        header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            ip = self.client[0] if self.client else None
            mine = sum(1 for c in self.connections if c.client and c.client[0] == ip) if per_client else 0
            if len(self.connections) > max_connections or mine > per_client > 0:
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._waiting_for_headers() and self.conn.their_state is h11.IDLE:
                self._arm()
            else:
                self._disarm()

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
