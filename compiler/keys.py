"""The developer's key: every secret permutation, drawn from the OS CSPRNG, stored with mode 0600.

Why not numpy's Generator: PCG64 is not a cryptographic generator, and users hold part of its output (the
vocabulary permutation inside post.onnx), so one stream seeded once would tie every permutation to the others.
Each permutation is the argsort of n independent 64-bit keys read from os.urandom: i.i.d. keys make every order
equally likely, and a draw with a repeated key (probability about n^2 / 2^65) is redrawn whole, which keeps the
result uniform by symmetry. One os.urandom read and one sort per permutation: about 20 ms for a 150k vocabulary, where a
SystemRandom Fisher-Yates shuffle (one urandom call per swap) took 0.2 s and up to 1 s of a 670M Llama's compile.
"""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

import numpy as np

from stip.runtime.bundle_format import KEY_FILE
from stip.runtime.errors import StipError

__all__ = ["KEY_FILE", "new_key_id", "random_permutation", "read_key", "write_key"]



def new_key_id() -> str:
    return secrets.token_hex(8)


def random_permutation(n: int) -> np.ndarray:
    """A uniformly random permutation of range(n), drawn from the OS CSPRNG alone."""
    while True:
        keys = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        if n < 2 or (np.diff(keys[order]) != 0).all():
            return order.astype(np.int64)


def write_key(path: Path, key_id: str, perms: dict[str, np.ndarray]) -> None:
    """Create the key file 0600 from the first byte (never chmod after the fact)."""
    buf = io.BytesIO()
    np.savez(buf, __key_id__=np.array(key_id), **{f"space:{k}": v for k, v in perms.items()})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def read_key(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    try:
        with np.load(path) as z:
            key_id = str(z["__key_id__"])
            perms = {k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("space:")}
    except Exception as e:
        raise StipError(f"{path}: not a stip key file ({e})")
    return key_id, perms
