"""ONNX Runtime sessions with a deliberate provider choice.

Why: onnxruntime-gpu lists CUDA even on machines without a GPU and silently falls back to CPU after printing a
library error. We only ask for CUDA when a GPU is visible, and callers can log `session.get_providers()`.
"""

from __future__ import annotations

import contextvars
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnxruntime as ort

from stip.runtime.errors import StipError


def gpu_visible() -> bool:
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


_EXACT = contextvars.ContextVar("stip_exact_math", default=False)


@contextmanager
def exact_math() -> Iterator[None]:
    """Sessions made inside compute matmuls in full fp32 on CUDA. Why: onnxruntime's CUDA EP uses TF32 by default,
    which adds ~1e-4 of rounding to each side of a comparison (measured on an H200: a 2-layer fp32 Llama's logits
    differed by 1.7e-4 between the original and its bundle), hiding real differences and failing correct bundles.
    The server keeps the default, as plaintext serving would."""
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


def providers_for(device: str = "auto") -> list[str]:
    avail = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in avail or not gpu_visible():
            raise StipError("--device cuda: no CUDA GPU or CUDA execution provider is available here")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise StipError(f"--device {device}: expected auto, cpu or cuda")
    if "CUDAExecutionProvider" in avail and gpu_visible():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(model: str | Path | bytes, device: str = "auto", threads: int = 0,
                 arena: bool = True) -> ort.InferenceSession:
    """arena=False returns a run's host memory when it ends (the server's memory budget relies on it)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = arena
    if threads:
        so.intra_op_num_threads = threads
    src = model if isinstance(model, bytes) else str(model)
    providers: list = providers_for(device)
    if _EXACT.get():
        providers = [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in providers]
    try:
        return ort.InferenceSession(src, so, providers=providers)
    except StipError:
        raise
    except Exception as e:
        where = "model bytes" if isinstance(model, bytes) else str(model)
        raise StipError(f"{where}: onnxruntime cannot load it: {str(e).splitlines()[0][:200]}")


def run(session: ort.InferenceSession, outputs: list[str] | None, feeds: dict, where: str) -> list:
    """session.run with onnxruntime's errors (wrong shape, dtype, missing input) as one StipError line."""
    try:
        return session.run(outputs, feeds)
    except StipError:
        raise
    except Exception as e:  # onnxruntime raises its own pybind types (InvalidArgument, Fail, RuntimeException)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StipError(f"{where}: onnxruntime refused the inputs: {msg[:300]}")
