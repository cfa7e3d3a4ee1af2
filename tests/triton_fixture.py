"""A real Triton Inference Server for tests: `tritonserver` 2.51 from the nvidia-pytriton wheel, in a cached venv.

Why a venv of its own: the wheel pins numpy<2 and brings its own tritonclient and grpcio, which must not touch the
project's environment. The venv is built once with the project's python (the Python backend's stub is built per
Python minor version and must match the interpreter that runs it) and reused: ~/.cache/stip/triton-venv, or
$STIP_TRITON_VENV. `python tests/triton_fixture.py` builds it ahead of time (a CI cache step).

The wheel has the Python backend only. Triton's onnxruntime backend is replaced by a Python-based backend of the
same name (tests/triton_onnxruntime_backend.py), so the repository `stip export-triton` writes (platform
onnxruntime_onnx) loads unchanged. The server runs with Triton's default --exit-on-error: a config that Triton or
the stand-in rejects stops the server, and the test fails with the server's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PYTRITON = "nvidia-pytriton==0.7.0"
REQUIREMENTS = [PYTRITON, "numpy<2", "onnxruntime==1.32.0"]  # CPU onnxruntime for the Python-backend models
VENV = Path(os.environ.get("STIP_TRITON_VENV") or Path.home() / ".cache" / "stip" / "triton-venv")
STANDIN = Path(__file__).with_name("triton_onnxruntime_backend.py")
READY_MARK = ".stip-ready"
BUILD_TIMEOUT = 1200.0
START_TIMEOUT = 120.0


def unsupported() -> str | None:
    """Why the wheel's tritonserver cannot run here, or None: it is a manylinux_2_35 x86_64 binary whose Python
    backend stub exists for CPython 3.8-3.13 and loads the interpreter's shared libpython."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"tritonserver from {PYTRITON} runs on Linux x86_64 only (this is {sys.platform} {platform.machine()})"
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
        return f"{PYTRITON} needs glibc >= 2.35 (this is {libc or 'no glibc'} {version})"
    if not (3, 8) <= sys.version_info[:2] <= (3, 13):
        return f"{PYTRITON} has Python backend stubs for CPython 3.8-3.13, not {platform.python_version()}"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return "the Python backend stub needs a shared libpython; this interpreter is built without one"
    return None


def _spec() -> str:
    """What the cached venv was built from: the base interpreter (not the venv calling us, so every project venv
    and worktree shares one build), its version and the pins."""
    return "\n".join([sys.base_prefix, platform.python_version(), *REQUIREMENTS]) + "\n"


def ensure_venv(venv: Path = VENV, log=sys.stderr) -> Path:
    """The cached venv, built on first use (under a lock, so parallel test processes build it once)."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mark = venv / READY_MARK
        if mark.is_file() and mark.read_text() == _spec():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        t0 = time.monotonic()
        print(f"building the Triton venv {venv} ({', '.join(REQUIREMENTS)}) ...", file=log, flush=True)
        deadline = t0 + BUILD_TIMEOUT
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120,
                           capture_output=True, text=True)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input", "-q",
                            "--disable-pip-version-check", *REQUIREMENTS], check=True, capture_output=True,
                           text=True, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.CalledProcessError as e:
            shutil.rmtree(venv, ignore_errors=True)
            raise RuntimeError(f"building {venv} failed: {' '.join(e.cmd[:4])} ...:\n{(e.stderr or '')[-3000:]}")
        except subprocess.TimeoutExpired:
            shutil.rmtree(venv, ignore_errors=True)
            raise RuntimeError(f"building {venv} took longer than {BUILD_TIMEOUT:.0f} s")
        mark.write_text(_spec())
        print(f"built {venv} in {time.monotonic() - t0:.1f} s", file=log, flush=True)
        return venv


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def backend_dir(venv: Path, dest: Path) -> Path:
    """Triton's --backend-directory: the wheel's Python backend with the stub for this Python (the wheel's
    backends/python lacks it), and `onnxruntime/model.py`, the Python-based stand-in for the onnxruntime backend."""
    root = _site_packages(venv) / "pytriton" / "tritonserver"
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(root / "backends" / "python" / f, py / f)
    shutil.copy2(root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" /
                 "triton_python_backend_stub", py / "triton_python_backend_stub")
    (dest / "onnxruntime").mkdir(exist_ok=True)
    shutil.copy2(STANDIN, dest / "onnxruntime" / "model.py")
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Triton:
    """A running tritonserver: its HTTP and gRPC endpoints, its process and its log."""

    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def errors(self, n: int = 4000) -> str:
        """The log's error lines (E...) and its last lines, without the status tables and the harmless CUDA
        complaints of a CPU-only machine."""
        lines = [x for x in self.log.read_text(errors="replace").splitlines()
                 if x.strip() and not x.startswith(("|", "+")) and "Cuda" not in x and "CUDA" not in x]
        picked = [x for x in lines if x.startswith("E")] + ["..."] + lines[-8:]
        return "\n".join(picked)[-n:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:  # refused while starting, or 400 until the models are loaded
        return False


def start(repo: Path, workdir: Path, venv: Path = VENV, timeout: float = START_TIMEOUT,
          extra: tuple[str, ...] = ()) -> Triton:
    """Start tritonserver on free loopback ports serving `repo`; returns once ready, or raises with the log."""
    venv = ensure_venv(venv)
    backends = backend_dir(venv, workdir / "backends")
    binary = _site_packages(venv) / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    libdir = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; "
                             "print(sysconfig.get_config_var('LIBDIR'))"], capture_output=True, text=True,
                            check=True).stdout.strip()
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
           "LD_LIBRARY_PATH": ":".join([libdir, str(_site_packages(venv) / "nvidia_pytriton.libs"),
                                        os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(":")}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    last = ""
    for attempt in range(3):  # a free port can be taken between the probe and tritonserver's bind
        http_port, grpc_port = free_port(), free_port()
        log = workdir / f"tritonserver-{attempt}.log"
        cmd = [str(binary), f"--model-repository={repo}", f"--backend-directory={backends}",
               "--http-address=127.0.0.1", f"--http-port={http_port}", "--grpc-address=127.0.0.1",
               f"--grpc-port={grpc_port}", "--allow-metrics=false", *extra]
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                    start_new_session=True)
        server = Triton(proc, http_port, grpc_port, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.alive() and not _ready(server.http_url):
            time.sleep(0.1)
        if server.alive() and _ready(server.http_url):
            return server
        server.stop()
        last = server.errors()
        if "address already in use" not in last.lower():
            break
    code = server.proc.returncode
    why = f"exited with code {code} before it was ready" if code not in (None, -signal.SIGTERM) else \
        f"was not ready within {timeout:.0f} s"
    raise RuntimeError(f"tritonserver {why}; its log:\n{last}")


@contextlib.contextmanager
def triton(repo: Path, venv: Path = VENV, timeout: float = START_TIMEOUT,
           extra: tuple[str, ...] = ()) -> Iterator[Triton]:
    """`with triton(repo) as t:` a running server, always terminated afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="stip-triton-"))
    server = None
    try:
        server = start(repo, workdir, venv, timeout, extra)
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":  # prebuild the venv (CI cache step): python tests/triton_fixture.py
    why = unsupported()
    if why:
        sys.exit(f"cannot run tritonserver here: {why}")
    t = time.monotonic()
    print(ensure_venv(), f"ready ({time.monotonic() - t:.1f} s)")
