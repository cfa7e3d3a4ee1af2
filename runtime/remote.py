"""The user's side over the network: pre and post run here, the server graph runs behind a KServe v2 / Open
Inference Protocol endpoint (`stip serve`, or Triton with `stip export-triton`).

Why tritonclient: it is the official client of the protocol that Triton and KServe speak, so a client that works
against `stip serve` works unchanged against a real Triton deployment. The URL's scheme picks the transport:
http(s)://HOST:PORT uses tritonclient.http, grpc(s)://HOST:PORT tritonclient.grpc (KServe v2
GRPCInferenceService; cheaper per request, which counts once per generated token).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from stip.runtime.bundle import Client
from stip.runtime.bundle_format import KEY_ID_PARAMETER, find_client_dir
from stip.runtime.errors import StipError

_DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
           "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


def _host_port(url: str) -> tuple[str, bool]:
    u = urlparse(url if "://" in url else f"http://{url}")
    if u.scheme not in ("http", "https") or not u.hostname:
        raise StipError(f"--server {url}: expected http://HOST:PORT (or grpc://HOST:PORT)")
    return f"{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}", u.scheme == "https"


def read_token(path: str | Path | None) -> str | None:
    """The bearer token in a file (its only non-blank line), for --token-file; None without a file."""
    if path is None:
        return None
    p = Path(path)
    try:
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise StipError(f"--token-file {p}: cannot read it ({e})") from None
    if len(lines) != 1 or len(lines[0].split()) != 1:
        raise StipError(f"--token-file {p}: expected one line holding the token only")
    return lines[0]


GRPC_SCHEMES = ("grpc", "grpcs")
# sent with every sequence request, so that a load balancer can keep a sequence on one replica (its KV cache is
# there): e.g. the Istio consistent hash that `stip export-kserve` writes for decoders on several replicas
SEQUENCE_HEADER = "x-stip-sequence"


def _grpc_endpoint(url: str) -> tuple[str, bool] | None:
    """grpc(s)://HOST[:PORT] -> (HOST:PORT, tls); None for any other scheme (HTTP)."""
    u = urlparse(url)
    if u.scheme not in GRPC_SCHEMES:
        return None
    if not u.hostname:
        raise StipError(f"--server {url}: expected grpc://HOST:PORT")
    return f"{u.hostname}:{u.port or 8001}", u.scheme == "grpcs"


def _grpc_module(url: str):
    try:
        import tritonclient.grpc as grpc
    except (ImportError, RuntimeError):  # tritonclient without its grpc extra raises RuntimeError
        raise StipError(f"--server {url}: gRPC needs tritonclient's grpc extra: pip install 'tritonclient[grpc]'")
    return grpc


class RemoteServer:
    """A remote server graph with the same interface as stip.runtime.bundle.Server (run, sequence, key_id).

    token: sent as `Authorization: Bearer TOKEN` on every request (stip serve --auth-tokens). ca_cert: a PEM file of
    the CA that signed an https:// server's certificate (e.g. a self-signed one), instead of the system's CAs."""

    def __init__(self, url: str, model_name: str = "stip", timeout: float = 60.0, token: str | None = None,
                 ca_cert: str | Path | None = None):
        self.url, self.model_name, self.timeout = url, model_name, timeout
        self.where = f"{url} model '{model_name}'"
        grpc_endpoint = _grpc_endpoint(url)
        self.grpc = grpc_endpoint is not None
        hostport, ssl = grpc_endpoint or _host_port(url)
        # gRPC metadata keys must be lowercase; HTTP headers are case-insensitive
        self.headers = {"authorization": f"Bearer {token}"} if token else None
        options = {}
        if ca_cert is not None:
            if not ssl:
                raise StipError(f"--ca-cert is for an https:// or grpcs:// server, not {url}")
            if not Path(ca_cert).is_file():
                raise StipError(f"--ca-cert {ca_cert}: no such file")
            options = {"root_certificates": str(ca_cert)} if self.grpc else {"ssl_options": {"ca_certs": str(ca_cert)}}
        if self.grpc:
            self.http = _grpc_module(url)  # the transport module: tritonclient.grpc or tritonclient.http
            self.client = self.http.InferenceServerClient(hostport, ssl=ssl, **options)
        else:
            import tritonclient.http as http

            self.http = http
            self.client = http.InferenceServerClient(hostport, ssl=ssl, connection_timeout=timeout,
                                                     network_timeout=timeout, **options)
        try:
            meta = self.client.get_model_metadata(model_name, headers=self.headers, **self._json())
        except Exception as e:  # connection refused, 404, ...
            raise StipError(f"{self.where}: cannot get model metadata ({str(e).splitlines()[0][:160]})") from None
        self.key_id = meta.get("parameters", {}).get(KEY_ID_PARAMETER) or self._key_id_from_config()
        if not self.key_id:
            raise StipError(f"{self.where}: not a stip server graph (no {KEY_ID_PARAMETER} in model metadata)")
        # gRPC's JSON leaves out empty lists: a seq2seq encoder's server graph returns nothing to the client
        self.input_names = [i["name"] for i in meta.get("inputs", [])]
        self.output_names = [o["name"] for o in meta.get("outputs", [])]
        self._types = {i["name"]: i["datatype"] for i in meta.get("inputs", [])}

    def _timeout(self) -> dict:
        return {"client_timeout": self.timeout} if self.grpc else {}

    def _json(self) -> dict:
        """gRPC calls: answers as JSON dicts (as over HTTP) and the timeout per call."""
        return {"as_json": True, "client_timeout": self.timeout} if self.grpc else {}

    def _key_id_from_config(self) -> str | None:
        """Triton's model metadata has no parameters; its model config does (written by stip export-triton)."""
        try:
            config = self.client.get_model_config(self.model_name, headers=self.headers, **self._json())
        except Exception:  # noqa: BLE001 - no config endpoint: no key id
            return None
        if self.grpc:
            config = config.get("config", {})  # ModelConfigResponse wraps the config
        return config.get("parameters", {}).get(KEY_ID_PARAMETER, {}).get("string_value")

    def run(self, feeds: dict[str, np.ndarray], sequence: dict | None = None) -> dict[str, np.ndarray]:
        inputs = []
        for name in self.input_names:
            value = np.ascontiguousarray(feeds[name]).astype(_DTYPES.get(self._types[name], None) or
                                                              feeds[name].dtype, copy=False)
            inp = self.http.InferInput(name, list(value.shape), self._types[name])
            inp.set_data_from_numpy(value, **({} if self.grpc else {"binary_data": True}))
            inputs.append(inp)
        outputs = [self.http.InferRequestedOutput(n, **({} if self.grpc else {"binary_data": True}))
                   for n in self.output_names]
        try:
            headers = self.headers
            if sequence:
                headers = {**(headers or {}), SEQUENCE_HEADER: str(sequence["sequence_id"])}
            result = self.client.infer(self.model_name, inputs, outputs=outputs, headers=headers,
                                       **(sequence or {}), **self._timeout())
        except Exception as e:
            raise StipError(f"{self.where}: inference failed: {str(e).splitlines()[0][:200]}") from None
        return {n: result.as_numpy(n) for n in self.output_names}

    def sequence(self, steps: int | None = None, batch: int = 1) -> RemoteSequence:
        return RemoteSequence(self, steps)

    def end_sequence(self, sequence_id: int) -> None:
        """Free a sequence on the server now (stip serve: a request without inputs and with sequence_end)."""
        headers = {**(self.headers or {}), SEQUENCE_HEADER: str(sequence_id)}
        self.client.infer(self.model_name, [], headers=headers, sequence_id=sequence_id, sequence_end=True,
                          **self._timeout())

    def close(self) -> None:
        self.client.close()


class RemoteSequence:
    """One generation on the server: its KV cache lives there under a random sequence id (OIP sequence
    parameters, as Triton's sequence batcher uses them); the last step ends the sequence and frees it."""

    def __init__(self, server: RemoteServer, steps: int | None):
        self.server = server
        # 62 random bits with bit 62 set: never below 2**32, which a server without authentication refuses, and
        # within int64, which KServe's gRPC protocol carries sequence_id in (tritonclient.grpc refuses more)
        self.id = secrets.randbits(62) | (1 << 62)
        self.steps = steps
        self.done = 0
        self.ended = False

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        params = {"sequence_id": self.id, "sequence_start": self.done == 0,
                  "sequence_end": self.steps is not None and self.done + 1 >= self.steps}
        out = self.server.run(feeds, params)
        self.done += 1
        self.ended = params["sequence_end"]
        return out

    def close(self) -> None:
        """End an unfinished sequence at once, so that its cache and slot are freed now, not at the idle timeout.
        Best effort: a server that cannot end it (Triton, a lost connection) frees it at its idle timeout."""
        if self.done and not self.ended:
            self.ended = True
            try:
                self.server.end_sequence(self.id)
            except Exception:  # noqa: BLE001 - closing must not mask the error that made the caller stop
                pass


class RemoteClient:
    """A user with a client bundle and a server URL; the key id is checked when connecting."""

    def __init__(self, bundle_client_dir: str | Path, url: str, model_name: str = "stip", token: str | None = None,
                 ca_cert: str | Path | None = None):
        self.client = Client(find_client_dir(bundle_client_dir), device="cpu")
        self.server = RemoteServer(url, model_name, token=token, ca_cert=ca_cert)
        self.client.check_server(self.server.key_id, self.server.where)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Pre here, only the server graph's inputs over the wire, post here."""
        to_server, kept = self.client.prepare(feeds)
        return self.client.finish(self.server.run(to_server), kept)

    def bytes_sent(self, feeds: dict[str, np.ndarray]) -> int:
        to_server, _ = self.client.prepare(feeds)
        return int(sum(np.asarray(v).nbytes for v in to_server.values()))
