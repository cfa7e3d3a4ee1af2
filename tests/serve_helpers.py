"""Shared by the `stip serve` tests: a real server process, and requests built by hand (JSON and binary)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from tritonclient.utils import np_to_triton_dtype

from stip.runtime.bundle import Client, Server
from stip.runtime.cache import CachedSession
from stip.runtime.launch import free_port

HEADER = "Inference-Header-Content-Length"
BIG = 1 << 40  # sequence ids: a server without --auth-tokens refuses ids below 2**32


class ServerProcess:
    """`stip serve ... --port 0` in a subprocess; the port it really bound is read from its startup log."""

    def __init__(self, args: list[str], log: Path, verify=True, grpc: bool = False):
        self.log = log
        # gRPC on a free port when asked (its default, 8001, may be held by another server), else off
        grpc_args = ["--grpc-port", str(free_port()) if grpc else "0"]
        self.proc = subprocess.Popen([sys.executable, "-m", "stip.compiler.cli", "serve", *args, "--port", "0",
                                      *grpc_args], stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.url = ""
        self.grpc_url = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stip serve exited with {self.proc.returncode}:\n{log.read_text()}")
            text = log.read_text()
            m = re.search(r"listening on (https?://127\.0\.0\.1:\d+)", text)
            g = re.search(r"gRPC listening on (grpcs?://127\.0\.0\.1:\d+)", text)
            if g:
                self.grpc_url = g.group(1)
            if m:
                self.url = m.group(1)
                try:
                    if httpx.get(self.url + "/v2/health/ready", timeout=1, verify=verify).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"stip serve not ready after 60 s:\n{log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def alive(self) -> bool:
        return self.proc.poll() is None


def bert_feeds(server: Server, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = next(n for n in server.input_names if n != "attention_mask")
    mask = np.ones((batch, seq), np.int64)
    mask[0, max(1, seq - 2):] = 0
    return {emb: rng.standard_normal((batch, seq, 32)).astype(np.float32), "attention_mask": mask}


def json_request(feeds: dict, outputs: list[str] | None = None, **params) -> dict:
    req = {"inputs": [{"name": n, "datatype": np_to_triton_dtype(a.dtype), "shape": list(a.shape),
                       "data": a.ravel().tolist()} for n, a in feeds.items()]}
    if outputs is not None:
        req["outputs"] = [{"name": n} for n in outputs]
    if params:
        req["parameters"] = params
    return req


def binary_request(feeds: dict, outputs: list[str] | None = None, **params) -> tuple[bytes, dict]:
    req = {"inputs": [{"name": n, "datatype": np_to_triton_dtype(a.dtype), "shape": list(a.shape),
                       "parameters": {"binary_data_size": a.nbytes}} for n, a in feeds.items()]}
    if outputs is not None:
        req["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    if params:
        req["parameters"] = params
    head = json.dumps(req).encode()
    return head + b"".join(np.ascontiguousarray(a).tobytes() for a in feeds.values()), {HEADER: str(len(head))}


def decode_response(r: httpx.Response) -> dict[str, np.ndarray]:
    assert r.status_code == 200, r.text
    n = r.headers.get(HEADER)
    body = r.content
    head = json.loads(body[:int(n)] if n else body)
    out, off = {}, int(n) if n else 0
    for o in head["outputs"]:
        dt = {"FP32": np.float32, "INT64": np.int64, "FP16": np.float16}[o["datatype"]]
        size = o.get("parameters", {}).get("binary_data_size")
        if size is not None:
            out[o["name"]] = np.frombuffer(body[off:off + size], dtype=dt).reshape(o["shape"])
            off += size
        else:
            out[o["name"]] = np.array(o["data"], dtype=dt).reshape(o["shape"])
    assert off == (len(body) if n else 0)
    return out


def decoder_steps(bundle: Path, prompt: list[int], new_tokens: int):
    """Greedy generation in process, recording what the server graph receives and returns at each step."""
    client = Client(bundle / "client")
    seq = CachedSession(Server(bundle / "server", device="cpu").session)
    ids, fed, steps = list(prompt), 0, []
    for _ in range(new_tokens):
        new = ids[fed:]
        feeds = {"input_ids": np.array([new], np.int64),
                 "attention_mask": np.ones((1, fed + len(new)), np.int64),
                 "position_ids": np.arange(fed, fed + len(new), dtype=np.int64)[None]}
        to_server, kept = client.prepare({k: v for k, v in feeds.items() if k in client.input_names},
                                         seq.past_length)
        server_out = seq.run(to_server)
        logits = client.finish(server_out, kept)["logits"]
        steps.append((to_server, server_out))
        fed = len(ids)
        ids.append(int(np.argmax(logits[0, -1])))
    return steps, ids[len(prompt):]


