"""Weights read lazily from external data: each access maps just that tensor's bytes (numpy memmap).

Why: a compile must work in bounded memory whatever the model's size. The analysis only needs shapes, dtypes and
small integer constants, and folding needs one tensor at a time; a memmap touches no bytes until they are read,
and dropping the array unmaps them, so the whole model is never resident.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from stip.passes.errors import StipError


@dataclass(frozen=True)
class ExternalTensor:
    file: Path
    offset: int
    length: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def load(self) -> np.ndarray:
        if self.length == 0:
            return np.empty(self.shape, dtype=self.dtype)
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def external_tensor(t: onnx.TensorProto, model_path: Path) -> ExternalTensor:
    """Where an initializer's bytes live; every inconsistency is refused by name before anything is read."""
    info = {e.key: e.value for e in t.external_data}
    where = f"{model_path}: initializer '{t.name}'"
    loc = info.get("location", "")
    if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts:
        raise StipError(f"{where}: external data location '{loc}' must be a file next to the model")
    file = model_path.parent / loc
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    except Exception:
        raise StipError(f"{where}: unsupported data type {t.data_type} in external data")
    shape = tuple(int(d) for d in t.dims)
    need = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    offset = int(info.get("offset", 0))
    length = int(info.get("length", need))
    if length != need:
        raise StipError(f"{where}: external data length {length} does not match its shape {list(shape)} "
                        f"({need} bytes)")
    try:
        size = file.stat().st_size
    except OSError as e:
        raise StipError(f"{where}: external data file '{loc}' cannot be read ({e.strerror})")
    if offset < 0 or offset + length > size:
        raise StipError(f"{where}: external data '{loc}' is truncated (needs bytes {offset}..{offset + length}, "
                        f"file has {size}); re-export the model")
    return ExternalTensor(file, offset, length, dtype, shape)


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


class Constants(MutableMapping):
    """name -> numpy array; external tensors are memory-mapped on each access and never cached."""

    def __init__(self) -> None:
        self._items: dict[str, np.ndarray | ExternalTensor] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        v = self._items[name]
        return v.load() if isinstance(v, ExternalTensor) else v

    def __setitem__(self, name: str, value) -> None:
        self._items[name] = value

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def nbytes(self, name: str) -> int:
        v = self._items[name]
        return v.length if isinstance(v, ExternalTensor) else int(v.nbytes)
