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


def test_bf16_weights_bit_exact_and_checked_widened(zoo, tmp_path):
    """ORT's CPU provider has no bf16 kernels (Add, MatMul), so the self-check and verify run the bf16 original and
    bundle widened to fp32 (exact for bf16 words), at bf16's tolerance; the bundle's own bytes stay bf16, checked
    word for word. A wrong weight still fails the widened check."""
    from stip.runtime.verify import verify

    model = to_bf16(zoo.get("llama-cache"), tmp_path / "model-bf16.onnx")
    report = compile_model(model, tmp_path / "out")
    rows = report["self_check"]["outputs"]
    assert rows and all(r["tolerance"] >= 5e-2 and r["max_abs"] <= 1e-3 for r in rows), rows
    server_path = Layout(tmp_path / "out").server_model
    server = onnx.load(str(server_path))
    assert {t.data_type for t in server.graph.initializer if len(t.dims) >= 2} == {TensorProto.BFLOAT16}
    assert assert_weights_bit_exact(model, tmp_path / "out") > 5
    checks = verify(tmp_path / "out", model, batch=2, seq=4, past=3, device="cpu", atol=5e-2, rtol=5e-2)
    assert all(c.ok for c in checks) and max(c.max_abs for c in checks) < 1e-3
    # one bf16 weight's rows swapped: the widened check must see it
    w = next(t for t in server.graph.initializer if t.data_type == TensorProto.BFLOAT16 and len(t.dims) == 2)
    words = np.frombuffer(w.raw_data, dtype=np.uint16).reshape(tuple(w.dims)).copy()
    words[[0, 1]] = words[[1, 0]]
    w.raw_data = words.tobytes()
    onnx.save(server, str(server_path))
    checks = verify(tmp_path / "out", model, batch=2, seq=4, past=3, device="cpu", atol=1e-3, rtol=1e-3)
    assert not all(c.ok for c in checks)


def external_copy(src: Path, dst_dir: Path) -> Path:
    """The model with every weight in one external data file (as large exports are)."""
    dst_dir.mkdir()
    dst = dst_dir / "model.onnx"
    onnx.save_model(onnx.load(str(src)), str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return dst


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_streaming_compile_with_shards_runs_verifies_and_leaves_nothing(zoo, tmp_path, monkeypatch, dtype):
    """Thresholds lowered so a tiny Llama takes the large-model path: weights memory-mapped from external data,
    folded on the two fold threads (larger ones; smaller ones inline, in between), streamed into 20 kB server
    shards and an external pre.onnx.data, self-checked, bit-exact."""
    from stip.compiler import pipeline
    from stip.compiler.inspect import inspect_bundle
    from stip.passes import build
    from stip.passes.graph import load_graph
    from stip.runtime.verify import verify

    src = zoo.get("llama-cache")
    if dtype == "fp16":
        src = to_fp16(src, tmp_path / "fp16.onnx")
    model = external_copy(src, tmp_path / "src")
    consts = load_graph(model).constants
    assert isinstance(consts[max(consts, key=consts.nbytes)], np.memmap)  # read lazily, never loaded whole
    monkeypatch.setattr(pipeline, "EXTERNAL_DATA_THRESHOLD", 4_000)
    monkeypatch.setattr(build, "ASYNC_FOLD_BYTES", 2_000)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    report = compile_model(model, out, shard_size=20_000)
    assert list(cwd.iterdir()) == []  # no shape-inference temp files, no stray data
    assert {p.name for p in tmp_path.iterdir()} - {"fp16.onnx"} == {"cwd", "out", "src"}

    server_dir = Layout(out).server_dir
    shards = sorted(server_dir.glob("*.onnx.data"))
    n = len(shards)
    assert n >= 3 and [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.onnx.data" for i in range(1, n + 1)]
    server = onnx.load(str(Layout(out).server_model), load_external_data=False)
    ext = [t for t in server.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    per_file: dict[str, int] = {}
    for t in ext:  # each tensor lies wholly inside one shard
        info = {e.key: e.value for e in t.external_data}
        assert int(info["offset"]) + int(info["length"]) <= (server_dir / info["location"]).stat().st_size
        per_file[info["location"]] = per_file.get(info["location"], 0) + 1
    assert set(per_file) == {s.name for s in shards}
    assert all(s.stat().st_size <= 20_000 or per_file[s.name] == 1 for s in shards)
    assert (Layout(out).client_dir / "pre.onnx.data").is_file()

    assert report["self_check"]["outputs"]
    assert all(c.ok for c in verify(out, model, atol=1e-2 if dtype == "fp16" else 1e-4,
                                    rtol=1e-2 if dtype == "fp16" else 1e-4, past=3, seq=4, device="cpu"))
    assert assert_weights_bit_exact(model, out) > 5
    b = inspect_bundle(out)["bundle"]
    assert b["server_bytes"] == sum(f.stat().st_size for f in server_dir.iterdir())
    assert b["client_bytes"] == sum(f.stat().st_size for f in Layout(out).client_dir.iterdir())
    assert {f["file"]: f["holds"] for f in b["files"]}[f"server/{shards[0].name}"]


def test_bf16_streamed_bit_exact(zoo, tmp_path, monkeypatch):
    from stip.compiler import pipeline
    from stip.passes import build

    monkeypatch.setattr(build, "ASYNC_FOLD_BYTES", 0)  # every tensor through the fold threads

    model = external_copy(to_bf16(zoo.get("llama-cache"), tmp_path / "bf16.onnx"), tmp_path / "src")
    monkeypatch.setattr(pipeline, "EXTERNAL_DATA_THRESHOLD", 4_000)
    compile_model(model, tmp_path / "out", shard_size=50_000, check=False)
    assert len(list(Layout(tmp_path / "out").server_dir.glob("*.onnx.data"))) >= 2
    assert assert_weights_bit_exact(model, tmp_path / "out") > 5


def test_truncated_external_data_is_refused_by_name(zoo, tmp_path):
    from stip.passes.errors import StipError

    model = external_copy(zoo.get("llama-cache"), tmp_path / "src")
    data = model.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(StipError, match=r"initializer '.+': external data 'model.onnx.data' is truncated"):
        compile_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--shard-size", "lots"], ["--shard-size", "0"],
                                   ["--shard-size", "1MB", "--external-data", "never"]])
def test_cli_refuses_bad_shard_size(zoo, tmp_path, capsys, flags):
    from stip.compiler.cli import main

    assert main(["compile", str(zoo.get("llama-cache")), "-o", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shard-size" in err[0]
    assert not (tmp_path / "out").exists()


def test_inline_weights_are_mapped_from_the_onnx_file_not_parsed(zoo, tmp_path, monkeypatch):
    """A model whose weights sit inside the .onnx: each large raw_data is located in the file at the wire level
    and memory-mapped like external data; the bytes equal onnx.load's, and the compile is bit-exact."""
    from stip.passes import tensors
    from stip.passes.graph import load_graph

    model = zoo.get("llama-cache")
    monkeypatch.setattr(tensors, "LAZY_FILE_BYTES", 0)
    monkeypatch.setattr(tensors, "LAZY_RAW_BYTES", 64)
    lazy = tensors.load_lazily(model)
    full = onnx.load(str(model))
    assert [t.name for t in lazy.graph.initializer] == [t.name for t in full.graph.initializer]
    assert lazy.graph.node == full.graph.node and lazy.graph.input == full.graph.input
    mapped = 0
    for a, b in zip(lazy.graph.initializer, full.graph.initializer):
        if tensors.is_external(a):
            mapped += 1
            got = tensors.external_tensor(a, model).load()
            assert isinstance(got, np.memmap)
            assert np.array_equal(got.view(np.uint8), numpy_helper.to_array(b).view(np.uint8)), a.name
        else:
            assert a == b
    assert mapped > 5
    consts = load_graph(model).constants
    assert isinstance(consts[max(consts, key=consts.nbytes)], np.memmap)
    report = compile_model(model, tmp_path / "out")
    assert report["self_check"]["outputs"]
    assert assert_weights_bit_exact(model, tmp_path / "out") > 5
