"""Start `stip serve` as a child process on a free loopback port and wait until it is ready.

Why in the product: examples, tests and benchmarks all need a real server process (no mocks), started and
stopped the same way; a user scripting a local three-party demo needs the same thing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def stip_server(server_dir: Path, *extra: str, model_name: str = "stip", timeout: float = 60) -> Iterator[str]:
    port = free_port()
    grpc = [] if "--grpc-port" in extra else ["--grpc-port", "0"]  # no fixed port: other servers may hold it
    cmd = [sys.executable, "-m", "stip.compiler.cli", "serve", str(server_dir), "--port", str(port),
           "--model-name", model_name, "--device", "cpu", *grpc, *extra]
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
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:  # refused while starting, or 503 (HTTPError is an OSError)
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
