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


# Inline weights: a model under 2 GiB may keep every weight inside the .onnx (TensorProto.raw_data). Parsing it
# with onnx.load holds the file's bytes and the parsed copy at once (about 2x the model). Instead the file is
# memory-mapped and walked at the protobuf wire level; each large raw_data becomes a reference to its own byte
# range in the .onnx (as if it were external data in that very file), so it is read like any external weight.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
LAZY_RAW_BYTES = 4096  # smaller raw_data stays in the parsed proto
LAZY_FILE_BYTES = 64 << 20  # .onnx files this large are walked lazily; smaller ones are parsed by onnx.load


def load_structure(path: str | Path) -> onnx.ModelProto:
    """The model without its large weights' bytes: external data is never loaded, large inline raw_data becomes
    a reference into the .onnx (load_lazily). Raises what onnx.load or the wire walk raise on junk."""
    p = Path(path)
    if p.stat().st_size >= LAZY_FILE_BYTES:
        return load_lazily(p)
    return onnx.load(str(p), load_external_data=False)


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, payload start, field end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            yield number, wire, first, pos, pos
            continue
        if wire == 2:
            n, pos = _varint(buf, pos)
            payload = pos
            pos += n
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == 5:
            payload, pos = pos, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {first}")
        if pos > end:
            raise ValueError(f"field {number} at byte {first} runs past its message's end")
        yield number, wire, first, payload, pos


def load_lazily(path: Path) -> onnx.ModelProto:
    """The model with every large inline raw_data replaced by an external_data reference into the .onnx itself
    (location = its own file name, offset, length); nothing but the graph's structure is copied out of the file."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        model = onnx.ModelProto()
        rest = bytearray()
        graphs = []
        for number, wire, first, payload, end in _fields(buf, 0, len(buf)):
            if number == _MODEL_GRAPH and wire == 2:
                graphs.append((payload, end))
            else:
                rest += buf[first:end]
        model.ParseFromString(bytes(rest))
        for g_start, g_end in graphs:  # repeated occurrences of an embedded message merge (protobuf's rule)
            skeleton = bytearray()
            inits = []
            for number, wire, first, payload, end in _fields(buf, g_start, g_end):
                if number == _GRAPH_INITIALIZER and wire == 2:
                    inits.append(_lazy_tensor(buf, payload, end, path.name))
                else:
                    skeleton += buf[first:end]
            model.graph.MergeFromString(bytes(skeleton))
            model.graph.initializer.extend(inits)
    return model


def _lazy_tensor(buf, start: int, end: int, location: str) -> onnx.TensorProto:
    meta = bytearray()
    raw = None
    for number, wire, first, payload, stop in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire == 2 and stop - payload >= LAZY_RAW_BYTES:
            raw = (payload, stop - payload)
        else:
            meta += buf[first:stop]
    t = onnx.TensorProto.FromString(bytes(meta))
    if raw is not None and t.data_location != TensorProto.EXTERNAL:
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1]))):
            e = t.external_data.add()
            e.key, e.value = k, v
    elif raw is not None:  # raw_data beside an external reference: keep the proto as the file has it
        t = onnx.TensorProto.FromString(bytes(buf[start:end]))
    return t
