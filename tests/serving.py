"""Start `stip serve` as a real subprocess on a free loopback port, for tests that talk to it over HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def stip_server(server_dir: Path, *extra: str, model_name: str = "stip", timeout: float = 60) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "stip.compiler.cli", "serve", str(server_dir), "--port", str(port),
           "--model-name", model_name, "--device", "cpu", *extra]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server can never block on it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"stip serve exited early: {log.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("stip serve did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
