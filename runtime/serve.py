"""`stip serve`: the server graph as a network service, on the KServe v2 / Open Inference Protocol (OIP).

Why this protocol: NVIDIA Triton and KServe speak it, so the official `tritonclient` works against this server, and
an operator who outgrows one machine serves the same server/model.onnx on Triton (`stip export-triton`) with no
change to clients.

What the server holds: the permuted server graph (never the key) and, per generation sequence, that sequence's
permuted KV cache. Clients send only the server graph's non-cache inputs; `past_key_values.*` / `present.*` never
appear in the metadata, in requests or in responses.

The server is split by concern:
- serve_protocol: the wire format (JSON tensors, binary tensor extension, strict parsing, response encoding);
- serve_sequences: KV-cache sequences, owned by (client, sequence_id), and the id rule without authentication;
- serve_limits: limits in dims and bytes, the memory budget and the per-request memory estimate;
- serve_auth: bearer tokens from a hot-reloaded file;
- serve_http: Host allow-list, auth and Content-Type checks, body reading, header timeout, connection cap;
- serve_model: one served graph and one request from body to response;
- serve_app: the routes, the worker pool and queue shared by both transports (Dispatcher), /metrics and the
  idle-sequence reaper;
- serve_grpc: the same service over gRPC (KServe v2 GRPCInferenceService, --grpc-port), on the same code;
- this module: the `stip serve` entry point (flags -> a listening uvicorn server, and the gRPC port).

Conventions, as Triton implements them:
- JSON tensors: {"name", "datatype" (FP32, INT64, ...), "shape", "data" (row-major, flat or nested)}.
- Binary tensor extension: the request header `Inference-Header-Content-Length` gives the length of the JSON part;
  the raw little-endian bytes of the inputs whose "parameters" carry "binary_data_size" follow it, in input order.
  Outputs asked for with "parameters": {"binary_data": true} (or the request parameter "binary_data_output": true)
  come back the same way: response header `Inference-Header-Content-Length`, per output "binary_data_size".
- Sequences (decoders with a KV cache), from the request "parameters": "sequence_id", "sequence_start",
  "sequence_end", exactly as `tritonclient` sends them. sequence_start creates the sequence with an empty cache
  (a start for one of the client's own live ids replaces it, as in Triton); requests with its id continue it, one
  at a time; sequence_end frees it after the request. A request that fails changes nothing. An unknown id without
  sequence_start is a 400, the same for an id never used and for another client's live id. Without sequence_id, a
  cache model runs with an empty cache and keeps nothing.
- Errors: {"error": "<one line>"} with a 4xx status for every bad request; the server keeps serving.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path

from stip.runtime.errors import StipError
from stip.runtime.serve_app import build_app
from stip.runtime.serve_auth import TokenFile
from stip.runtime.serve_http import default_allowed_hosts, guarded_protocol, host_of
from stip.runtime.serve_limits import Limits, MemoryBudget, fmt_bytes
from stip.runtime.serve_model import Model, resolve_server_dir
from stip.runtime.serve_protocol import RequestError

__all__ = ["Limits", "Model", "RequestError", "build_app", "resolve_server_dir", "serve", "parse_model_args",
           "is_loopback", "listen"]

log = logging.getLogger("stip.serve")


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
          log_level: str = "info", access_log: bool = False, auth_tokens: str | None = None,
          tls_cert: str | None = None, tls_key: str | None = None, allowed_hosts: list[str] | None = None,
          grpc_port: int = 0) -> int:
    import uvicorn

    limits = limits or Limits()
    limits.check()
    if (tls_cert is None) != (tls_key is None):
        raise StipError("--tls-cert and --tls-key go together: give both, or neither")
    for flag, f in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if f is not None and not Path(f).is_file():
            raise StipError(f"{flag} {f}: no such file")
    tokens = TokenFile(auth_tokens) if auth_tokens else None
    hosts = allowed_host_set(allowed_hosts, host)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="stip serve: %(message)s")
    log.setLevel(getattr(logging, log_level.upper(), logging.INFO))
    sock = listen(host, port)  # before loading models: a busy port is one clear line, not a late crash
    grpc = None
    try:
        if grpc_port:
            from stip.runtime.serve_grpc import GrpcEndpoint

            grpc = GrpcEndpoint(host, grpc_port, limits, tls_cert, tls_key)
        budget = MemoryBudget(limits.max_memory)
        from stip.runtime.serve_chain import chain_models

        models = []
        for n, d in parse_model_args(specs, model_name):
            kw = dict(device=device, threads=threads, io_binding=io_binding, limits=limits, budget=budget)
            models += chain_models(n, d, **kw) or [Model(n, d, **kw)]  # several files: one model per file
        for m in models:
            kind = f"KV cache ({len(m.pairs)} tensors, server-held)" if m.stateful else "stateless"
            log.info("model '%s' from %s: key id %s, ONNX Runtime providers %s%s, %s", m.name, m.path, m.key_id,
                     m.providers, " (IO binding)" if m.io_binding and m.stateful else "", kind)
        if not is_loopback(host):
            log.warning("listening on %s: reachable beyond this machine%s", host,
                        "" if tokens and tls_cert else "; use --auth-tokens and TLS (--tls-cert/--tls-key or a "
                        "reverse proxy)")
        if tokens is None:
            log.info("no --auth-tokens: every client may use the server; sequence ids must be random 64-bit ids")
        bound = sock.getsockname()
        scheme = "https" if tls_cert else "http"
        log.info("listening on %s://%s:%d (KServe v2 / Open Inference Protocol), %d workers, memory budget %s, "
                 "pid %d", scheme, f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0], bound[1],
                 limits.workers, fmt_bytes(limits.max_memory), os.getpid())
        if grpc is not None:
            log.info("gRPC listening on %s://%s:%d (KServe v2 GRPCInferenceService)", grpc.scheme,
                     f"[{host}]" if ":" in host else host, grpc.port)
        app = build_app(models, limits, tokens=tokens, allowed_hosts=hosts, budget=budget,
                        grpc=grpc.start if grpc is not None else None)
        config = uvicorn.Config(app, log_level="warning" if log_level == "info" else log_level,
                                access_log=access_log, timeout_graceful_shutdown=5,
                                http=guarded_protocol(limits.header_timeout, limits.max_connections,
                                                      limits.max_connections_per_client),
                                timeout_keep_alive=limits.keep_alive, h11_max_incomplete_event_size=16 << 10,
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key, server_header=False)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def allowed_host_set(allowed: list[str] | None, bind: str) -> set[str] | None:
    """The Host header values accepted; None accepts any (only with --allowed-hosts '*')."""
    if not allowed:
        return default_allowed_hosts(bind)
    names = {host_of(h) if h.startswith("[") else h.strip().lower() for a in allowed for h in a.split(",")
             if h.strip()}
    if "*" in names:
        return None
    return names | {"localhost", "127.0.0.1", "::1"}


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
