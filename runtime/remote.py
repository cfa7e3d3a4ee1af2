"""The user's side over the network: pre and post run here, the server graph runs behind a KServe v2 / Open
Inference Protocol endpoint (`stip serve`, or Triton with `stip export-triton`).

Why tritonclient: it is the official client of the protocol that Triton and KServe speak, so a client that works
against `stip serve` works unchanged against a real Triton deployment.
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
        raise StipError(f"--server {url}: expected http://HOST:PORT")
    return f"{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}", u.scheme == "https"


class RemoteServer:
    """A remote server graph with the same interface as stip.runtime.bundle.Server (run, sequence, key_id)."""

    def __init__(self, url: str, model_name: str = "stip", timeout: float = 60.0):
        import tritonclient.http as http

        self.http = http
        self.url, self.model_name = url, model_name
        self.where = f"{url} model '{model_name}'"
        hostport, ssl = _host_port(url)
        self.client = http.InferenceServerClient(hostport, ssl=ssl, connection_timeout=timeout,
                                                 network_timeout=timeout)
        try:
            meta = self.client.get_model_metadata(model_name)
        except Exception as e:  # connection refused, 404, ...
            raise StipError(f"{self.where}: cannot get model metadata ({str(e).splitlines()[0][:160]})") from None
        self.key_id = meta.get("parameters", {}).get(KEY_ID_PARAMETER) or self._key_id_from_config()
        if not self.key_id:
            raise StipError(f"{self.where}: not a stip server graph (no {KEY_ID_PARAMETER} in model metadata)")
        self.input_names = [i["name"] for i in meta["inputs"]]
        self.output_names = [o["name"] for o in meta["outputs"]]
        self._types = {i["name"]: i["datatype"] for i in meta["inputs"]}

    def _key_id_from_config(self) -> str | None:
        """Triton's model metadata has no parameters; its model config does (written by stip export-triton)."""
        try:
            config = self.client.get_model_config(self.model_name)
        except Exception:  # noqa: BLE001 - no config endpoint: no key id
            return None
        return config.get("parameters", {}).get(KEY_ID_PARAMETER, {}).get("string_value")

    def run(self, feeds: dict[str, np.ndarray], sequence: dict | None = None) -> dict[str, np.ndarray]:
        inputs = []
        for name in self.input_names:
            value = np.ascontiguousarray(feeds[name]).astype(_DTYPES.get(self._types[name], None) or
                                                              feeds[name].dtype, copy=False)
            inp = self.http.InferInput(name, list(value.shape), self._types[name])
            inp.set_data_from_numpy(value, binary_data=True)
            inputs.append(inp)
        outputs = [self.http.InferRequestedOutput(n, binary_data=True) for n in self.output_names]
        try:
            result = self.client.infer(self.model_name, inputs, outputs=outputs, **(sequence or {}))
        except Exception as e:
            raise StipError(f"{self.where}: inference failed: {str(e).splitlines()[0][:200]}") from None
        return {n: result.as_numpy(n) for n in self.output_names}

    def sequence(self, steps: int | None = None, batch: int = 1) -> RemoteSequence:
        return RemoteSequence(self, steps)

    def close(self) -> None:
        self.client.close()


class RemoteSequence:
    """One generation on the server: its KV cache lives there under a random sequence id (OIP sequence
    parameters, as Triton's sequence batcher uses them); the last step ends the sequence and frees it."""

    def __init__(self, server: RemoteServer, steps: int | None):
        self.server = server
        self.id = secrets.randbits(63) or 1
        self.steps = steps
        self.done = 0

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        params = {"sequence_id": self.id, "sequence_start": self.done == 0,
                  "sequence_end": self.steps is not None and self.done + 1 >= self.steps}
        out = self.server.run(feeds, params)
        self.done += 1
        return out

    def close(self) -> None:
        """Nothing to send: an unfinished sequence is freed by the server's idle timeout."""


class RemoteClient:
    """A user with a client bundle and a server URL; the key id is checked when connecting."""

    def __init__(self, bundle_client_dir: str | Path, url: str, model_name: str = "stip"):
        self.client = Client(find_client_dir(bundle_client_dir), device="cpu")
        self.server = RemoteServer(url, model_name)
        self.client.check_server(self.server.key_id, self.server.where)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Pre here, only the server graph's inputs over the wire, post here."""
        to_server, kept = self.client.prepare(feeds)
        return self.client.finish(self.server.run(to_server), kept)

    def bytes_sent(self, feeds: dict[str, np.ndarray]) -> int:
        to_server, _ = self.client.prepare(feeds)
        return int(sum(np.asarray(v).nbytes for v in to_server.values()))
