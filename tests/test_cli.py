"""The `stip` command as a user runs it: help, the happy path, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from graphs import embed_then, ints, model, save, weight
from onnx import TensorProto, helper, numpy_helper

STIP = [sys.executable, "-m", "stip.compiler.cli"]


def stip(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*STIP, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("cmd", [[], ["compile"], ["inspect"], ["verify"]])
def test_help_everywhere(cmd):
    r = stip(*cmd, "--help")
    assert r.returncode == 0 and "usage: stip" in r.stdout


def test_console_script_installed():
    exe = Path(sys.executable).parent / "stip"
    assert exe.exists(), "pip install should provide the `stip` console script"


def test_compile_inspect_verify_flow(zoo, tmp_path):
    m = zoo.get("bert-cls", dynamo=True)
    r = stip("compile", m, "-o", tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    assert "key id" in r.stdout
    r = stip("verify", tmp_path / "out", "--original", m, "--batch", "2", "--seq", "21")
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    r = stip("inspect", tmp_path / "out", "--json")
    rep = json.loads(r.stdout)
    assert rep["bundle"]["key_id"] == rep["bundle"]["server_key_id"]
    assert rep["bundle"]["client_bytes"] > 0
    assert {c["tensor"] for c in rep["crosses_to_server"]} >= {"attention_mask"}
    r = stip("inspect", m)
    assert r.returncode == 0
    for text in ("hidden", "layer1.qk", "Crosses to server", "attention_mask", "padding", "Security notes"):
        assert text in r.stdout, text
    rep = json.loads(stip("inspect", m, "--json").stdout)
    assert rep["unplaced"] == [] and rep["layers"] == 2
    one, two = tmp_path / "one", tmp_path / "two"  # --original DIR: the one model file in it, or one line
    one.mkdir()
    two.mkdir()
    (one / "model_quantized.onnx").write_bytes(Path(m).read_bytes())
    for name in ("a.onnx", "b.onnx"):
        (two / name).write_bytes(Path(m).read_bytes())
    r = stip("verify", tmp_path / "out", "--original", one, "--batch", "2")
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    r = stip("verify", tmp_path / "out", "--original", two)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"stip verify: error: --original {two}: a directory, and {tmp_path / 'out'} holds one " \
        "file; pass the .onnx it was compiled from"


def test_verify_fails_on_a_tampered_bundle(zoo, tmp_path):
    m = zoo.get("bert-cls")
    assert stip("compile", m, "-o", tmp_path / "out", "-q").returncode == 0
    path = tmp_path / "out" / "server" / "model.onnx"
    server = onnx.load(str(path))
    t = max(server.graph.initializer, key=lambda t: int(numpy_helper.to_array(t).size))
    arr = numpy_helper.to_array(t).copy()
    arr[0] += 1.0
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(server, str(path))
    r = stip("verify", tmp_path / "out", "--original", m)
    assert r.returncode == 1 and "FAIL" in r.stdout


def _assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _bad_models(tmp_path: Path, real: Path) -> dict[str, tuple[Path, list[str]]]:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    trunc = tmp_path / "truncated.onnx"
    trunc.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    plain = save(model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], []), tmp_path / "relu.onnx")
    cumsum = save(embed_then([helper.make_node("CumSum", ["h", "axis"], ["cs"], name="odd_cumsum"),
                              helper.make_node("MatMul", ["cs", "w"], ["y"])], ["B", "S", 4],
                             [ints("axis", 2), weight("w", 8, 4)]), tmp_path / "cumsum.onnx")
    return {
        "missing": (tmp_path / "nope.onnx", ["nope.onnx", "no such file"]),
        "not onnx": (text, ["notes.onnx"]),
        "truncated": (trunc, ["truncated.onnx"]),
        "no transformer": (plain, ["relu.onnx", "no Transformer"]),
        "unsupported op": (cumsum, ["CumSum", "odd_cumsum"]),
    }


@pytest.mark.parametrize("case", ["missing", "not onnx", "truncated", "no transformer", "unsupported op"])
def test_bad_input_one_line_no_partial_output(zoo, tmp_path, case):
    path, needles = _bad_models(tmp_path, zoo.get("bert"))[case]
    out = tmp_path / "out"
    r = stip("compile", path, "-o", out, "-q")
    _assert_user_error(r, *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "stip-tmp" in p.name]
    if case != "unsupported op":
        _assert_user_error(stip("inspect", path), *needles)


def test_existing_output_needs_force(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = stip("compile", zoo.get("bert"), "-o", out, "-q")
    _assert_user_error(r, str(out), "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_inspect_reports_unsupported_op_without_failing(tmp_path):
    path = save(embed_then([helper.make_node("CumSum", ["h", "axis"], ["cs"], name="odd_cumsum"),
                            helper.make_node("MatMul", ["cs", "w"], ["y"])], ["B", "S", 4],
                           [ints("axis", 2), weight("w", 8, 4)]), tmp_path / "cumsum.onnx")
    r = stip("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert any(u["op"] in ("CumSum", "MatMul") and "CumSum" in u["reason"] + u["op"] for u in rep["unplaced"])


def test_verify_defaults_to_the_precision_the_graph_computes_in(zoo, tmp_path):
    """An fp16 bundle differs from its fp16 original by fp16 rounding (~5e-4 on these logits): `stip verify`
    without --atol judges it at the self-check's fp16 tolerance instead of failing it at fp32's 1e-4, and an
    explicit --atol still applies."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp16 = tmp_path / "llama16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(zoo.get("llama-cache"))), keep_io_types=False), str(fp16))
    assert stip("compile", fp16, "-o", tmp_path / "out").returncode == 0
    r = stip("verify", tmp_path / "out", "--original", fp16)
    assert r.returncode == 0 and "PASS" in r.stdout and "atol=0.01" in r.stdout, r.stdout + r.stderr
    r = stip("verify", tmp_path / "out", "--original", fp16, "--atol", "1e-9", "--rtol", "1e-9")
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_checks_run_cuda_matmuls_in_full_fp32(monkeypatch):
    """verify and the self-check build their sessions inside exact_math(): onnxruntime's CUDA EP then gets
    use_tf32=0 (TF32's ~1e-4 rounding failed a correct fp32 Llama bundle on an H200); serving keeps the default."""
    import stip.runtime.sessions as s

    seen = []
    monkeypatch.setattr(s, "providers_for", lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(s.ort, "InferenceSession", lambda src, so, providers: seen.append(providers))
    s.make_session(b"", "cuda")
    with s.exact_math():
        s.make_session(b"", "cuda")
    s.make_session(b"", "cuda")
    assert seen == [["CUDAExecutionProvider", "CPUExecutionProvider"],
                    [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
                    ["CUDAExecutionProvider", "CPUExecutionProvider"]]
