"""Secrets: the server never holds key material or plaintext weights; keys are 0600; bundles don't mix."""

from __future__ import annotations

import shutil
import stat

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from stip.compiler.keys import read_key
from stip.compiler.pipeline import compile_model
from stip.passes.errors import StipError
from stip.runtime.bundle import LocalDeployment


def _server_bytes(bundle) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((bundle / "server").iterdir()))


def test_key_file_is_private(bert_bundle):
    _, out = bert_bundle
    key = out / "developer" / "key.npz"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "developer").stat().st_mode) == 0o700
    key_id, perms = read_key(key)
    assert len(key_id) == 16 and "hidden" in perms


def test_server_files_hold_no_key_material(bert_bundle):
    _, out = bert_bundle
    blob = _server_bytes(out)
    _, perms = read_key(out / "developer" / "key.npz")
    checked = 0
    for name, p in perms.items():
        flat = p.reshape(-1)
        if flat.size < 8:
            continue
        inv = np.argsort(flat) if p.ndim == 1 else None
        for arr in (flat, inv):
            if arr is None:
                continue
            for dt in (np.int64, np.int32, np.int16, np.float32):
                assert arr.astype(dt).tobytes() not in blob, f"space {name} found in the server bundle"
        checked += 1
    assert checked >= 5
    server = onnx.load(str(out / "server" / "model.onnx"))
    for t in server.graph.initializer:
        v = numpy_helper.to_array(t)
        if v.dtype.kind in "iu" and v.ndim == 1 and v.size >= 4:
            assert not (sorted(v.tolist()) == list(range(v.size)) and (v != np.arange(v.size)).any()), t.name


def test_server_holds_no_plaintext_weight_and_no_private_input(bert_bundle):
    model, out = bert_bundle
    original = [numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer]
    original = [w for w in original if w.ndim >= 2]
    server = onnx.load(str(out / "server" / "model.onnx"))
    big = [numpy_helper.to_array(t) for t in server.graph.initializer if len(t.dims) >= 2]
    assert big, "server has weights"
    for w in big:
        for o in original:
            assert not (o.shape == w.shape and np.array_equal(o, w)), "a server weight equals a plaintext weight"
    inputs = {i.name for i in server.graph.input}
    assert not inputs & {"input_ids", "token_type_ids"}
    assert "attention_mask" in inputs
    # the word embedding table stays with the client
    assert all(numpy_helper.to_array(t).shape[0] != 128 for t in server.graph.initializer if len(t.dims) == 2)


def test_mixed_bundles_are_refused(zoo, tmp_path):
    model = zoo.get("bert")
    compile_model(model, tmp_path / "a")
    compile_model(model, tmp_path / "b")
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "a" / "client", mixed / "client")
    shutil.copytree(tmp_path / "b" / "server", mixed / "server")
    with pytest.raises(StipError, match="key id"):
        LocalDeployment(mixed, device="cpu")
    shutil.copy(tmp_path / "b" / "client" / "post.onnx", mixed / "client" / "post.onnx")
    with pytest.raises(StipError, match="key id"):
        LocalDeployment(mixed, device="cpu")


def test_recompile_needs_force_and_draws_a_new_key(zoo, tmp_path):
    model = zoo.get("bert")
    r1 = compile_model(model, tmp_path / "o")
    with pytest.raises(StipError, match="--force"):
        compile_model(model, tmp_path / "o")
    assert read_key(tmp_path / "o" / "developer" / "key.npz")[0] == r1["key_id"]
    r2 = compile_model(model, tmp_path / "o", force=True)
    assert r2["key_id"] != r1["key_id"]
    assert read_key(tmp_path / "o" / "developer" / "key.npz")[0] == r2["key_id"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp or backup directories left behind


def test_two_compiles_draw_different_permutations(zoo, tmp_path):
    model = zoo.get("bert")
    compile_model(model, tmp_path / "a")
    compile_model(model, tmp_path / "b")
    pa = read_key(tmp_path / "a" / "developer" / "key.npz")[1]["hidden"]
    pb = read_key(tmp_path / "b" / "developer" / "key.npz")[1]["hidden"]
    assert not np.array_equal(pa, pb)
