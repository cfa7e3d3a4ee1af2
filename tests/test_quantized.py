"""Quantized models compile exactly: the bundle's outputs equal the *quantized* original's (never the fp32 model's).

onnxruntime's dynamic int8 (DynamicQuantizeLinear + MatMulInteger), QDQ (QuantizeLinear/DequantizeLinear),
weight-only int8 (int8 -> Cast -> Mul -> MatMul) and 4-bit MatMulNBits, each with per-tensor and per-channel
parameters; the int8 weights reach the server as the original's bytes moved by the key's permutations.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import model, save, weight
from helpers import assert_equivalent, compile_in_memory, run_model, run_three
from onnx import TensorProto, helper, numpy_helper

from stip.compiler import cli
from stip.compiler.pipeline import compile_model
from stip.passes.solve import use_key
from stip.runtime.verify import verify

RNG = np.random.default_rng(11)


class Feeds:
    """BERT inputs for onnxruntime's calibration (quantize_static) and for the comparisons."""

    def __init__(self, n: int = 4, batch: int = 2, seq: int = 8):
        self.items = iter([bert_feeds(batch, seq, seed=i) for i in range(n)])

    def get_next(self):
        return next(self.items, None)


def bert_feeds(batch: int = 3, seq: int = 11, seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - 3:] = 0  # padding
    return {"input_ids": rng.integers(0, 128, (batch, seq)), "attention_mask": mask,
            "token_type_ids": rng.integers(0, 2, (batch, seq))}


def quantized_bert(zoo, tmp_path, form: str):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src, dst = str(zoo.get("bert")), tmp_path / f"bert-{form}.onnx"
    per_channel = form.endswith("per-channel")
    if form.startswith("dynamic"):
        quantize_dynamic(src, str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    else:
        reader = type("Reader", (Feeds, CalibrationDataReader), {})()
        quantize_static(src, str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel)
    return dst


FORMS = ["dynamic", "dynamic-per-channel", "qdq", "qdq-per-channel"]


@pytest.mark.parametrize("form", FORMS)
def test_quantized_bert_equals_the_quantized_original(zoo, tmp_path, form):
    path = quantized_bert(zoo, tmp_path, form)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops if form.startswith("dynamic") else \
        {"QuantizeLinear", "DequantizeLinear"} <= ops
    g, sol, part, perms, bundle = compile_in_memory(path, seed=3)
    feeds = bert_feeds()
    ref = run_model(path, feeds)
    got = run_three(bundle, feeds)
    assert_equivalent(ref, got, atol=1e-5, rtol=1e-5)
    assert {"hidden", "out"} <= set(sol.permuted.values())
    report = compile_model(path, tmp_path / "out")  # the self-check compares against the quantized original
    assert report["private_inputs"] == ["input_ids", "token_type_ids"]
    checks = verify(tmp_path / "out", path)
    assert all(c.ok for c in checks) and max(c.max_abs for c in checks) < 1e-5, checks


def _int8_weights(g, node_ids, op_inputs):
    """(node index, input index, name) of every int8/uint8 matrix the listed ops read, found by structure."""
    out = []
    for idx in node_ids:
        n = g.model.graph.node[idx]
        for j in op_inputs.get(n.op_type, ()):
            if j < len(n.input) and n.input[j] in g.constants and g.constants[n.input[j]].ndim >= 1 \
                    and g.constants[n.input[j]].dtype in (np.int8, np.uint8):
                out.append((idx, j, n.input[j]))
    return out


@pytest.mark.parametrize("form", ["dynamic-per-channel", "qdq-per-channel"])
def test_server_int8_weights_are_the_originals_moved_by_the_key(zoo, tmp_path, form):
    """Every int8 weight and per-channel zero point on the server is the original's bytes, with each axis
    gathered by its space's permutation from the key (no requantization), and the weights are really moved."""
    path = quantized_bert(zoo, tmp_path, form)
    g, sol, part, perms, bundle = compile_in_memory(path, seed=5)
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    server = {t.name: numpy_helper.to_array(t) for t in bundle.server.graph.initializer}
    uses = _int8_weights(g, part.server_nodes, {"MatMulInteger": (1, 3), "DequantizeLinear": (0, 2)})
    moved = 0
    for k, (idx, j, name) in enumerate(uses):
        q = original[name]
        pos = part.server_nodes.index(idx)
        got = server[bundle.server.graph.node[pos].input[j]]
        expect = q
        for a, c in enumerate(sol.classes(use_key(name, idx, j), q.ndim)):
            if c is not None and q.shape[a] > 1:
                expect = np.take(expect, perms.vector(c), axis=a)
        assert got.dtype == q.dtype and got.tobytes() == expect.tobytes(), name
        moved += q.ndim == 2 and not np.array_equal(got, q)
    matrices = sum(original[x].ndim == 2 for _, _, x in uses)
    assert matrices >= 12 and moved == matrices  # every int8 matrix of the encoder, each permuted


# ---- weight-only int8: int8 initializer -> Cast -> Mul by a scale -> MatMul, built by hand ----

def weight_only_int8(tmp_path, per_channel: bool, dequantize: bool = False):
    """ids -> embedding -> LayerNorm -> [int8 W1 * scale] -> Relu -> [int8 W2 * scale] -> + residual -> y."""
    d, f = 8, 16
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])
    inits = [weight("table", 32, d), weight("gamma", d), weight("beta", d), weight("b1", f), weight("b2", d)]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1)]
    for i, (k, n) in enumerate(((d, f), (f, d))):
        q = RNG.integers(-127, 128, (k, n)).astype(np.int8)
        scale = (RNG.random(n if per_channel else ()) * 0.02 + 0.001).astype(np.float32)
        inits += [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(scale, f"s{i}")]
        if dequantize:
            zp = RNG.integers(-3, 4, n if per_channel else ()).astype(np.int8)
            inits.append(numpy_helper.from_array(zp, f"z{i}"))
            nodes.append(helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"w{i}"], axis=1))
        else:
            nodes += [helper.make_node("Cast", [f"q{i}"], [f"c{i}"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"w{i}"])]
    nodes += [helper.make_node("MatMul", ["n", "w0"], ["m0"], name="up"),
              helper.make_node("Add", ["m0", "b1"], ["a0"]), helper.make_node("Relu", ["a0"], ["r0"]),
              helper.make_node("MatMul", ["r0", "w1"], ["m1"], name="down"),
              helper.make_node("Add", ["m1", "b2"], ["a1"]), helper.make_node("Add", ["a1", "h"], ["y"])]
    name = f"int8-{'channel' if per_channel else 'tensor'}-{'dq' if dequantize else 'cast'}.onnx"
    return save(model(nodes, [ids], [y], inits), tmp_path / name)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dequantize", [False, True])
def test_weight_only_int8_equals_the_original(tmp_path, per_channel, dequantize):
    path = weight_only_int8(tmp_path, per_channel, dequantize)
    g, sol, part, perms, bundle = compile_in_memory(path, seed=7)
    feeds = {"ids": RNG.integers(0, 32, (3, 5))}
    assert_equivalent(run_model(path, feeds), run_three(bundle, feeds), atol=1e-5, rtol=1e-5)
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    server = [numpy_helper.to_array(t) for t in bundle.server.graph.initializer]
    for name in ("q0", "q1"):  # each int8 matrix is on the server, moved (rows and columns), same bytes
        q = original[name]
        got = [v for v in server if v.dtype == np.int8 and v.shape == q.shape]
        assert len(got) == 1 and not np.array_equal(got[0], q)
        assert sorted(got[0].reshape(-1).tolist()) == sorted(q.reshape(-1).tolist())
    report = compile_model(path, tmp_path / "out")
    assert report["private_inputs"] == ["ids"]
    assert all(c.ok for c in verify(tmp_path / "out", path))


def test_cli_compiles_and_verifies_a_quantized_model(zoo, tmp_path, capsys):
    path = quantized_bert(zoo, tmp_path, "dynamic-per-channel")
    assert cli.main(["compile", str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert cli.main(["verify", str(tmp_path / "out"), "--original", str(path)]) == 0
    capsys.readouterr()


def test_operator_format_quantization_is_refused_with_the_way_out(zoo, tmp_path, capsys):
    """QOperator (QLinearMatMul ...) requantizes inside every op; it has no rules: one line, exit 2, no bundle."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    path = tmp_path / "bert-qop.onnx"
    reader = type("Reader", (Feeds, CalibrationDataReader), {})()
    quantize_static(str(zoo.get("bert")), str(path), reader, quant_format=QuantFormat.QOperator)
    assert cli.main(["compile", str(path), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "QLinearMatMul" in err[0] and "QuantFormat.QDQ" in err[0], err
    assert str(path) in err[0] and not (tmp_path / "out").exists()
