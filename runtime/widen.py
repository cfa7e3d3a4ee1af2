"""bf16 graphs checked on a CPU: run them with every bf16 value widened to fp32.

Why: onnxruntime's CPU provider has no bf16 kernels (Add, MatMul), so neither a bf16 original nor its bundle can
run there, and the compile self-check and `stip verify` could not check a bf16 bundle at all. Widening bf16 to fp32
is exact (a bf16 word is the top half of an fp32 word), so the widened original and the widened bundle hold the
same weights, bit for bit, as the real ones. Comparing them checks every permutation and every node of both graphs;
it does not exercise bf16 kernels' own rounding (that needs a GPU: `stip verify --device cuda`). Casts to bf16 become
casts to fp32, so both sides skip the same roundings; the comparison keeps bf16's tolerance.

Weights are widened one tensor at a time and written to the copy's external data, so memory stays one tensor.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

BF16 = TensorProto.BFLOAT16


def _graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            for sub in a.graphs:
                yield from _graphs(sub)


def has_bf16(path: Path) -> bool:
    m = onnx.load(str(path), load_external_data=False)
    for g in _graphs(m.graph):
        if any(t.data_type == BF16 for t in g.initializer):
            return True
        if any(vi.type.tensor_type.elem_type == BF16 for vi in [*g.input, *g.output, *g.value_info]):
            return True
        for n in g.node:
            if any(a.name == "to" and a.i == BF16 for a in n.attribute):
                return True
    return False


def _words(t: TensorProto, base: Path) -> np.ndarray:
    """A bf16 tensor's raw 16-bit words, from the file's external data (memory-mapped) or inline."""
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        offset, count = int(info.get("offset", 0)), int(np.prod(t.dims, dtype=np.int64))
        return np.memmap(base / info["location"], dtype=np.uint16, mode="r", offset=offset, shape=(count,))
    if t.raw_data:
        return np.frombuffer(t.raw_data, dtype=np.uint16)
    return np.asarray(t.int32_data, dtype=np.uint16)  # the spec's bf16 storage without raw_data


def _widen_tensor(t: TensorProto, base: Path, sink) -> None:
    wide = (_words(t, base).astype(np.uint32) << 16).view(np.float32)
    dims, name = list(t.dims), t.name
    t.Clear()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(dims)
    sink(t, wide)


def widen_file(src: Path, dst: Path) -> None:
    """dst: src with bf16 replaced by fp32 everywhere (weights, constants, casts, declared types)."""
    m = onnx.load(str(src), load_external_data=False)
    data = dst.with_name(dst.name + ".data")
    with open(data, "wb") as f:
        def sink(t: TensorProto, wide: np.ndarray) -> None:
            if wide.nbytes < 1024:
                t.raw_data = wide.tobytes()
                return
            offset = f.tell()
            f.write(wide.tobytes())
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(wide.nbytes))):
                t.external_data.add(key=k, value=v)

        def keep(t: TensorProto) -> None:
            if t.data_location == TensorProto.EXTERNAL:  # other dtypes' external data moves into the copy's file
                arr = onnx.numpy_helper.to_array(t, base_dir=str(src.parent))
                name = t.name
                t.CopyFrom(onnx.numpy_helper.from_array(arr, name))
                if t.ByteSize() >= 1024:
                    raw = t.raw_data
                    t.ClearField("raw_data")
                    offset = f.tell()
                    f.write(raw)
                    t.data_location = TensorProto.EXTERNAL
                    for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                        t.external_data.add(key=k, value=v)

        for g in _graphs(m.graph):
            for t in g.initializer:
                (_widen_tensor(t, src.parent, sink) if t.data_type == BF16 else keep(t))
            for vi in [*g.input, *g.output, *g.value_info]:
                if vi.type.tensor_type.elem_type == BF16:
                    vi.type.tensor_type.elem_type = TensorProto.FLOAT
            for n in g.node:
                for a in n.attribute:
                    if a.name == "to" and a.i == BF16:
                        a.i = TensorProto.FLOAT
                    if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == BF16:
                        _widen_tensor(a.t, src.parent, lambda t, w: setattr(t, "raw_data", w.tobytes()))
    onnx.save(m, str(dst))


def _widen_bundle(src: Path, dst: Path) -> None:
    """The bundle's tree with every .onnx widened; manifests and tokenizer files copied; the key left behind."""
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if rel.parts[0] == "developer" or path.is_dir() or path.name.endswith(".data"):
            continue
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".onnx":
            widen_file(path, out)
        else:
            shutil.copy2(path, out)


@contextlib.contextmanager
def widened_on_cpu(bundle_dir: Path, original: Path, device: str) -> Iterator[tuple[Path, Path]]:
    """(bundle, original) to check: widened copies when they hold bf16 and would run on the CPU, else as given."""
    from stip.runtime.sessions import providers_for

    original = Path(original)
    if providers_for(device)[0] != "CPUExecutionProvider" or not original.is_file() or not has_bf16(original):
        yield Path(bundle_dir), original
        return
    with tempfile.TemporaryDirectory(prefix="stip-bf16-") as tmp:
        wide_original = Path(tmp) / "original" / original.name
        wide_original.parent.mkdir()
        widen_file(original, wide_original)
        _widen_bundle(Path(bundle_dir), Path(tmp) / "bundle")
        yield Path(tmp) / "bundle", wide_original
