"""Stream folded weights into a bundle graph's external data, optionally in shards (like safetensors shards).

Why: the bundle must never be held in memory either. Each tensor is written as soon as it is folded and then
dropped; the graph keeps only an external_data reference (location, offset, length). With a shard size, a tensor
that would overflow the current file starts the next one (a tensor is never split), so servers can load shards
in parallel and operators can copy them in parts. Offsets are 4 KiB-aligned, so onnxruntime can map them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from stip.compiler.serialize import _GRAPH_FIELD as _GRAPH
from stip.compiler.serialize import _INITIALIZER_FIELD as _INITIALIZER
from stip.compiler.serialize import _copy_except, _field, _varint, write_model
from stip.passes.build import SUB_BYTE, add_initializer
from stip.passes.errors import StipError
from stip.passes.permute import Write

ALIGN = 4096
INLINE_BYTES = 1024  # smaller tensors stay inside the graph, as onnx.save's size_threshold does
_RAW_DATA = 9  # TensorProto.raw_data


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, flag: str) -> int:
    """'2GB', '500MiB', '1048576' -> bytes."""
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in _UNITS or value <= 0:
        raise StipError(f"{flag} {text}: expected a positive size such as 2GB, 500MiB or 1048576")
    return int(value * _UNITS[unit])


class ExternalWriter:
    """A build() sink: big tensors go to `<graph>.data` (or `<stem>-0000K-of-0000N.onnx.data` shards).

    `reserve` places a tensor (its offset, and its initializer entry in the graph) before it is folded, so the fold
    threads write their blocks with os.pwrite at known offsets, in parallel and in any order, while the graph and
    the files come out exactly as if written one tensor after the other. Every file stays open until finish()."""

    def __init__(self, graph_path: Path, shard_size: int | None = None):
        self.path = Path(graph_path)
        self.shard_size = shard_size
        self.files: list[Path] = []
        self._fds: list[int] = []
        self._sizes: list[int] = []
        self._pos = 0

    def __call__(self, graph: onnx.GraphProto, arr: np.ndarray, name: str, data_type: int | None = None) -> None:
        write = self.reserve(graph, name, arr.shape, arr.dtype, data_type)
        if write is None:
            add_initializer(graph, arr, name, data_type)
            return
        flat = np.ascontiguousarray(arr).reshape(-1)
        write(flat.astype(flat.dtype.newbyteorder("<"), copy=False), 0)

    def reserve(self, graph: onnx.GraphProto, name: str, shape: tuple[int, ...], dtype: np.dtype,
                data_type: int | None = None) -> Write | None:
        """The tensor's place in the data files and its external_data entry; None if it stays in the graph."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < INLINE_BYTES or dtype.kind in "OUS" or dtype.name in SUB_BYTE:  # packed 4-bit: inline
            return None
        aligned = self._pos + (-self._pos % ALIGN)
        if not self._fds or (self.shard_size and self._pos and aligned + nbytes > self.shard_size):
            self._next_file()
            aligned = 0
        offset = aligned
        self._pos = offset + nbytes
        self._sizes[-1] = self._pos
        t = graph.initializer.add()
        t.name = name
        t.data_type = data_type or helper.np_dtype_to_tensor_dtype(dtype)
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.files[-1].name), ("offset", str(offset)), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        fd, where = self._fds[-1], f"{self.files[-1]}: tensor '{name}'"

        def write(block: np.ndarray, at: int) -> None:
            if at < 0 or at + block.nbytes > nbytes:
                raise StipError(f"{where}: a write of {block.nbytes} bytes at {at} overflows its {nbytes} bytes")
            _pwrite_all(fd, block, offset + at)
        return write

    def _next_file(self) -> None:
        self.files.append(self.path.with_name(f"{self.path.name}.data.part{len(self.files) + 1}"))
        self._fds.append(os.open(self.files[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        self._sizes.append(0)
        self._pos = 0

    def close(self) -> None:
        """Close every file; each gets its full length (the alignment padding of a last tensor, if any)."""
        fds, self._fds = self._fds, []
        for fd, size in zip(fds, self._sizes):
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)


    def finish(self, graph: onnx.GraphProto) -> list[Path]:
        """Close and give the files their final names: `model.onnx.data` alone, else
        `model-00001-of-00003.onnx.data`...; the graph's references follow."""
        self.close()
        n = len(self.files)
        stem = self.path.name[: -len(".onnx")] if self.path.name.endswith(".onnx") else self.path.name
        names = ([f"{self.path.name}.data"] if n == 1 else
                 [f"{stem}-{i + 1:05d}-of-{n:05d}.onnx.data" for i in range(n)])
        renamed = {}
        for old, new in zip(self.files, names):
            old.rename(old.with_name(new))
            renamed[old.name] = new
        for t in graph.initializer:
            for e in t.external_data:
                if e.key == "location" and e.value in renamed:
                    e.value = renamed[e.value]
        self.files = [f.with_name(x) for f, x in zip(self.files, names)]
        return self.files

    def finish_model(self, model: onnx.ModelProto) -> None:
        """finish(), then the graph file itself (its weights are references by now, so it is small)."""
        self.finish(model.graph)
        write_model(model, self.path)


class InlineWriter:
    """A build() sink for a graph saved as one .onnx with its weights inside (under 2 GiB).

    Each large tensor is placed before it is folded, like ExternalWriter.reserve: its record
    `graph { initializer { name, dims, data_type, raw_data } }` is written into the .onnx at once, and the fold
    threads write the raw_data blocks into it with os.pwrite. finish_model() appends the model's other fields
    (graph nodes, inputs, outputs, small initializers, opsets, metadata). Protobuf merges repeated occurrences of
    an embedded message, in any order, so every reader sees one graph holding every initializer; the weights are
    never held in a proto, serialized, or copied again (this was most of the write time of in-memory graphs)."""

    LIMIT = 2**31 - 1  # protobuf's message size limit

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pos = 0

    def __call__(self, graph: onnx.GraphProto, arr: np.ndarray, name: str, data_type: int | None = None) -> None:
        add_initializer(graph, arr, name, data_type)  # small: it stays in the graph and goes out with it

    def reserve(self, graph: onnx.GraphProto, name: str, shape: tuple[int, ...], dtype: np.dtype,
                data_type: int | None = None) -> Write | None:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < INLINE_BYTES or dtype.kind in "OUS" or dtype.name in SUB_BYTE:  # packed 4-bit: in the graph
            return None
        meta = TensorProto()
        meta.name = name
        meta.data_type = data_type or helper.np_dtype_to_tensor_dtype(dtype)
        meta.dims.extend(shape)
        body = meta.SerializeToString() + _varint((_RAW_DATA << 3) | 2) + _varint(nbytes)
        init = _varint((_INITIALIZER << 3) | 2) + _varint(len(body) + nbytes) + body
        prefix = _varint((_GRAPH << 3) | 2) + _varint(len(init) + nbytes) + init
        at0 = self._pos + len(prefix)
        self._check(at0 + nbytes)
        _pwrite_all(self._fd, np.frombuffer(prefix, dtype=np.uint8), self._pos)
        self._pos = at0 + nbytes
        fd, where = self._fd, f"{self.path}: tensor '{name}'"

        def write(block: np.ndarray, at: int) -> None:
            if at < 0 or at + block.nbytes > nbytes:
                raise StipError(f"{where}: a write of {block.nbytes} bytes at {at} overflows its {nbytes} bytes")
            _pwrite_all(fd, block, at0 + at)
        return write

    def _check(self, size: int) -> None:
        if size > self.LIMIT:
            raise StipError(f"{self.path}: the graph with its weights passes protobuf's 2 GiB limit; compile "
                            "with --external-data auto (the default) or always")

    def finish_model(self, model: onnx.ModelProto) -> None:
        """Append everything but the placed tensors, give the file its length, close it."""
        rest = _copy_except(model, onnx.ModelProto(), "graph").SerializeToString() + \
            _field(_GRAPH, model.graph.SerializeToString())
        self._check(self._pos + len(rest))
        _pwrite_all(self._fd, np.frombuffer(rest, dtype=np.uint8), self._pos)
        self._pos += len(rest)
        os.ftruncate(self._fd, self._pos)
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """No file after all (a multi-file encoder's empty post graph)."""
        self.close()
        self.path.unlink(missing_ok=True)


def _pwrite_all(fd: int, block: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
