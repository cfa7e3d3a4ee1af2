"""LLM scale: bit-exact weights for every dtype, fp16/bf16 bundles, external data and shards, streaming compile.

The byte check is independent of the compiler's tensor loading: it reads the original's raw words straight from
the ONNX file, re-derives each use's permutation from developer/key.npz and the solved spaces, and compares the
bundle's bytes (read back from its external data) word for word.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from stip.compiler.keys import read_key
from stip.compiler.pipeline import analyse, compile_model
from stip.passes.permute import Permutations, fold
from stip.passes.solve import use_key
from stip.runtime.bundle_format import Layout


def to_fp16(src: Path, dst: Path) -> Path:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=False), str(dst))
    return dst


def to_bf16(src: Path, dst: Path) -> Path:
    """The fp16 conversion with every FLOAT16 turned into BFLOAT16 (initializers, Casts, value types)."""
    m = onnx.load(str(to_fp16(src, dst)))

    def tensor(t):
        if t.data_type == TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32)
                                               .astype(ml_dtypes.bfloat16), t.name))

    def walk(g):
        for t in g.initializer:
            tensor(t)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
                vi.type.tensor_type.elem_type = TensorProto.BFLOAT16
        for n in g.node:
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT16:
                    a.i = TensorProto.BFLOAT16
                if a.type == onnx.AttributeProto.TENSOR:
                    tensor(a.t)

    walk(m.graph)
    onnx.save(m, str(dst))
    return dst


def raw_words(t: onnx.TensorProto, base: Path) -> np.ndarray:
    """A tensor's stored words (unsigned, element-sized), read without numpy_helper's dtype conversions."""
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        with open(base / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            data = f.read(int(info["length"]))
    else:
        data = t.raw_data
    size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    assert len(data) == size * int(np.prod(t.dims, dtype=np.int64)), t.name
    return np.frombuffer(data, dtype=f"<u{size}").reshape(list(t.dims))


def assert_weights_bit_exact(model: Path, bundle: Path) -> int:
    """Every weight of pre and server equals the original's words under the key's permutation; returns how many
    initializers were compared."""
    a = analyse(model)
    g, sol = a.graph, a.solution
    _, key = read_key(Layout(bundle).key)
    perms = Permutations(sol, {c: key[name] for c, name in sol.permuted.items() if not sol.link(c)})
    src = onnx.load(str(model), load_external_data=False)
    original = {t.name: raw_words(t, model.parent) for t in src.graph.initializer}
    by_name = {n.name: i for i, n in enumerate(g.model.graph.node)}
    checked = 0
    for path in (Layout(bundle).pre, Layout(bundle).server_model):
        m = onnx.load(str(path), load_external_data=False)
        inits = {t.name: t for t in m.graph.initializer}
        seen = set()
        for n in m.graph.node:
            if n.name not in by_name:
                continue
            idx = by_name[n.name]
            for j, x in enumerate(g.model.graph.node[idx].input):
                if x not in original:
                    continue
                dims = original[x].shape
                classes = [None if dims[ax] == 1 else c for ax, c in enumerate(sol.classes(use_key(x, idx, j),
                                                                                          len(dims)))]
                got = raw_words(inits[n.input[j]], path.parent)
                want = fold(original[x], classes, perms)
                assert inits[n.input[j]].data_type == src_type(src, x), x
                assert got.shape == want.shape and np.array_equal(got, want), f"{path.name}: {x} -> {n.input[j]}"
                seen.add(n.input[j])
        big = {name for name, t in inits.items() if np.prod(t.dims) > 64}
        assert big <= seen, f"{path.name}: weights not compared: {sorted(big - seen)[:5]}"
        checked += len(seen)
    return checked


def src_type(m: onnx.ModelProto, name: str) -> int:
    return next(t.data_type for t in m.graph.initializer if t.name == name)


@pytest.mark.parametrize("family", ["bert", "llama-cache"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_weights_bit_exact_and_checked_at_dtype_precision(zoo, tmp_path, family, dtype):
    model = zoo.get(family)
    if dtype == "fp16":
        model = to_fp16(model, tmp_path / "model-fp16.onnx")
    report = compile_model(model, tmp_path / "out")  # the self-check runs at the dtype's tolerance
    rows = report["self_check"]["outputs"]
    assert rows and all(r["max_abs"] <= r["tolerance"] for r in rows)
    assert all(r["tolerance"] >= (1e-2 if dtype == "fp16" else 1e-4) for r in rows)
    assert assert_weights_bit_exact(model, tmp_path / "out") > 5


def test_bf16_weights_bit_exact(zoo, tmp_path):
    """ORT's CPU provider has no bf16 kernels (Add, MatMul), so a bf16 bundle cannot run here: its bytes are
    checked word for word, and its structure by the fp32 self-check of the same model."""
    model = to_bf16(zoo.get("llama-cache"), tmp_path / "model-bf16.onnx")
    compile_model(model, tmp_path / "out", check=False)
    server = onnx.load(str(Layout(tmp_path / "out").server_model), load_external_data=False)
    assert {t.data_type for t in server.graph.initializer if len(t.dims) >= 2} == {TensorProto.BFLOAT16}
    assert assert_weights_bit_exact(model, tmp_path / "out") > 5
