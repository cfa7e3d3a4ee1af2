"""The developer's key: every secret permutation, drawn from the OS CSPRNG, stored with mode 0600."""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

import numpy as np

from stip.passes.errors import StipError

KEY_FILE = "key.npz"


def new_key_id() -> str:
    return secrets.token_hex(8)


def csprng() -> np.random.Generator:
    """PCG64 seeded from os.urandom: fast enough for vocab-size permutations, unpredictable to the server."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "little")))


def write_key(path: Path, key_id: str, perms: dict[str, np.ndarray]) -> None:
    """Create the key file 0600 from the first byte (never chmod after the fact)."""
    buf = io.BytesIO()
    np.savez(buf, __key_id__=np.array(key_id), **{f"space:{k}": v for k, v in perms.items()})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())


def read_key(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    try:
        with np.load(path) as z:
            key_id = str(z["__key_id__"])
            perms = {k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("space:")}
    except Exception as e:
        raise StipError(f"{path}: not a stip key file ({e})")
    return key_id, perms
