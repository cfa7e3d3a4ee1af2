"""Quantized models compile exactly: the bundle's outputs equal the *quantized* original's (never the fp32 model's).

onnxruntime's dynamic int8 (DynamicQuantizeLinear + MatMulInteger), QDQ (QuantizeLinear/DequantizeLinear),
weight-only int8 (int8 -> Cast -> Mul -> MatMul) and 4-bit MatMulNBits, each with per-tensor and per-channel
parameters; the int8 weights reach the server as the original's bytes moved by the key's permutations.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import model, save, weight
from helpers import assert_equivalent, compile_in_memory, run_model, run_three
from onnx import TensorProto, helper, numpy_helper

from stip.compiler import cli
from stip.compiler.pipeline import compile_model
from stip.compiler.selfcheck import QUANTIZED_ACTIVATIONS
from stip.passes.solve import use_key
from stip.runtime.verify import random_feeds, verify

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
    if form == "dynamic-fused":  # onnxruntime's own fusion: DynamicQuantizeMatMul, MatMulIntegerToFloat
        import onnxruntime as ort

        quantize_dynamic(src, str(tmp_path / "unfused.onnx"), weight_type=QuantType.QInt8, per_channel=True)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(tmp_path / "unfused.onnx"), options, providers=["CPUExecutionProvider"])
    elif form.startswith("dynamic"):  # uint8 weights are asymmetric: per-channel zero points that are not 0
        weight_type = QuantType.QUInt8 if "uint8" in form else QuantType.QInt8
        quantize_dynamic(src, str(dst), weight_type=weight_type, per_channel=per_channel)
    else:  # static: QDQ, or QOperator (QLinearMatMul, QLinearAdd, QLinearMul, QLinearSoftmax, QGemm)
        reader = type("Reader", (Feeds, CalibrationDataReader), {})()
        fmt = QuantFormat.QOperator if form.startswith("qoperator") else QuantFormat.QDQ
        quantize_static(src, str(dst), reader, quant_format=fmt, per_channel=per_channel)
    return dst


FORMS = ["dynamic", "dynamic-per-channel", "dynamic-uint8-per-channel", "dynamic-fused", "qdq", "qdq-per-channel",
         "qoperator", "qoperator-per-channel"]
OPS = {"dynamic": {"MatMulInteger", "DynamicQuantizeLinear"}, "qdq": {"QuantizeLinear", "DequantizeLinear"},
       "dynamic-fused": {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul"},
       "qoperator": {"QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QGemm"}}


@pytest.mark.parametrize("form", FORMS)
def test_quantized_bert_equals_the_quantized_original(zoo, tmp_path, form):
    path = quantized_bert(zoo, tmp_path, form)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert OPS.get(form, OPS[form.split("-")[0]]) <= ops
    g, sol, part, perms, bundle = compile_in_memory(path, seed=3)
    feeds = bert_feeds()
    ref = run_model(path, feeds)
    got = run_three(bundle, feeds)
    assert_equivalent(ref, got, atol=1e-5, rtol=1e-5)
    assert {"hidden", "out"} <= set(sol.permuted.values())
    report = compile_model(path, tmp_path / "out")  # the self-check compares against the quantized original
    assert report["private_inputs"] == ["input_ids", "token_type_ids"]
    checks = verify(tmp_path / "out", path)  # a fresh random key: a rare value may cross a rounding boundary
    assert max(c.max_abs / max(1.0, c.scale) for c in checks) <= QUANTIZED_ACTIVATIONS, checks


def test_dynamic_vit_with_conv_integer_equals_the_quantized_original(zoo, tmp_path):
    """quantize_dynamic of Conv too: the patch embedding becomes ConvInteger (uint8 weights, per-channel zero
    points), computed by the client; the permuted features go to the server."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = tmp_path / "vit-dynamic.onnx"
    quantize_dynamic(str(zoo.get("vit")), str(path), weight_type=QuantType.QUInt8, per_channel=True,
                     op_types_to_quantize=["Conv", "MatMul"])
    assert {"ConvInteger", "MatMulInteger"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    g, sol, part, perms, bundle = compile_in_memory(path, seed=4)
    assert "ConvInteger" in {n.op_type for n in bundle.pre.graph.node}
    feeds = random_feeds(path, batch=2, seed=3)
    assert_equivalent(run_model(path, feeds), run_three(bundle, feeds), atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("form", ["dynamic-per-channel", "dynamic-uint8-per-channel", "qdq-per-channel"])
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
    if "uint8" in form:  # asymmetric: the per-channel zero points differ, so moving them is observable
        zps = [original[x] for _, j, x in uses if j == 3 and original[x].ndim == 1]
        assert len(zps) >= 12 and all(len(set(z.tolist())) > 1 for z in zps)


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
    out = capsys.readouterr().out
    assert "DynamicQuantizeLinear node" in out and "quantizes activations at run time" in out, out


def test_relaxed_check_still_catches_a_wrong_quantized_bundle(zoo, tmp_path, monkeypatch):
    """The self-check's allowance for quantization steps (QUANTIZED_ACTIVATIONS) must not hide a rule bug: a
    MatMulInteger rule that leaves per-channel uint8 zero points in plaintext order is refused at compile."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from stip.passes import rules
    from stip.passes.errors import StipError

    def zero_points_ignored(ctx):
        rules.matmul(ctx)
        for j in (2, 3):
            if ctx.has_input(j):
                for a in range(len(ctx.shape_in(j))):
                    ctx.ax_in(j, a)  # seen, related to nothing: stays unpermuted

    path = tmp_path / "bert-uint8.onnx"
    quantize_dynamic(str(zoo.get("bert")), str(path), weight_type=QuantType.QUInt8, per_channel=True)
    contract = rules.OPS["MatMulInteger"]
    monkeypatch.setitem(rules.OPS, "MatMulInteger", rules.OpContract(zero_points_ignored, contract.weights, True,
                                                                      contract.lifts))
    with pytest.raises(StipError, match="self-check failed"):
        compile_model(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantized_conv_of_operator_format_is_refused_with_the_way_out(zoo, tmp_path, capsys):
    """QOperator's QLinearConv (a statically quantized ViT patch embedding) has no rule: one line naming the op and
    the forms that compile, exit 2, no bundle."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    src, path = zoo.get("vit"), tmp_path / "vit-qop.onnx"
    batches = iter([random_feeds(src, batch=2, seed=i) for i in range(3)])
    reader = type("Reader", (CalibrationDataReader,), {"get_next": lambda self: next(batches, None)})()
    quantize_static(str(src), str(path), reader, quant_format=QuantFormat.QOperator)
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert cli.main(["compile", str(path), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "QLinearConv" in err[0] and "QuantFormat.QDQ" in err[0], err
    assert str(path) in err[0] and not (tmp_path / "out").exists()


# ---- 4-bit MatMulNBits: blocks along K keep their values, scales and zero points ----

def nbits_llama(zoo, tmp_path, family: str, block_size: int, symmetric: bool, bits: int = 4):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(zoo.get(family))), algo_config=config)
    quantizer.process()
    path = tmp_path / f"{family}-q{bits}-b{block_size}.onnx"
    onnx.save(quantizer.model.model, str(path))
    return path


def nibbles(b: np.ndarray, n: int, nb: int, bs: int) -> np.ndarray:
    """[N, nb, bs] 4-bit values of a MatMulNBits weight, written out independently of passes/packed.py."""
    flat = b.reshape(n, -1)
    out = np.stack([flat & 15, flat >> 4], axis=-1).reshape(n, -1)
    return out.reshape(n, nb, bs)


@pytest.mark.parametrize("family,block_size,symmetric,bits", [("llama", 16, False, 4), ("llama-cache", 16, False, 4),
                                                              ("llama", 32, True, 4), ("llama", 16, False, 8)])
def test_matmul_nbits_llama_equals_the_quantized_original(zoo, tmp_path, family, block_size, symmetric, bits):
    path = nbits_llama(zoo, tmp_path, family, block_size, symmetric, bits)
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(path)).graph.node) == 15  # 2 x 7 + lm_head
    report = compile_model(path, tmp_path / "out")  # the self-check compares against the quantized original
    assert report["private_inputs"] == ["input_ids"]
    checks = verify(tmp_path / "out", path, past=4 if family.endswith("cache") else 0)
    assert all(c.ok for c in checks) and max(c.max_abs for c in checks) < 1e-5, checks
    spaces = {s["name"]: s for s in report["spaces"]}
    assert "quantization blocks" in spaces["hidden"]["structure"] or block_size == 32
    assert all(s["log2_choices"] > 0 for s in report["spaces"])


@pytest.mark.parametrize("head", ["server", "client"])
def test_matmul_nbits_greedy_generation_is_identical(zoo, tmp_path, head):
    """Tokens generated through the bundle (KV cache on the server) are the quantized original's; with --head
    client, post holds the 4-bit LM head, its K axis permuted by blocks and the vocabulary in plain order."""
    from stip.runtime.generate import StipGenerator, generate_plaintext

    path = nbits_llama(zoo, tmp_path, "llama-cache", 16, False)
    compile_model(path, tmp_path / "out", head=head, max_context=64)
    prompt = [5, 9, 17, 3, 44]
    assert list(StipGenerator(tmp_path / "out", device="cpu").generate(prompt, 24)) == \
        generate_plaintext(path, prompt, 24)
    post = onnx.load(str(tmp_path / "out" / "client" / "post.onnx"))
    assert ("MatMulNBits" in {n.op_type for n in post.graph.node}) == (head == "client")


def test_blocked_qdq_llama_equals_the_quantized_original(zoo, tmp_path):
    """MatMulNBitsQuantizer's QDQ form: int4 weights, DequantizeLinear with block_size 16 along K (opset 21)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=16, is_symmetric=False, quant_format=QuantFormat.QDQ)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(zoo.get("llama", opset=18))), algo_config=config)
    quantizer.process()
    path = tmp_path / "llama-qdq-int4.onnx"
    onnx.save(quantizer.model.model, str(path))
    blocked = [n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 16 for a in n.attribute)]
    assert len(blocked) == 15
    report = compile_model(path, tmp_path / "out")
    checks = verify(tmp_path / "out", path)
    assert all(c.ok for c in checks) and max(c.max_abs for c in checks) < 1e-4, checks
    hidden = next(s for s in report["spaces"] if s["name"] == "hidden")
    assert hidden["structure"].startswith("2 x 16 (quantization blocks")
    server = onnx.load(str(tmp_path / "out" / "server" / "model.onnx"))
    int4 = [t for t in server.graph.initializer if t.data_type in (TensorProto.INT4, TensorProto.UINT4)]
    assert len(int4) >= 15 and all(len(t.raw_data) * 2 == int(np.prod(t.dims)) for t in int4)  # still packed


def test_matmul_nbits_server_weights_keep_every_block(zoo, tmp_path):
    """On the server, each MatMulNBits weight is the original's 4-bit values under the key: row n' is original
    row pN[n'], position k' is original position pK[k'] (pK: the permutation of the activation's K axis), and
    pK maps every block onto one block, so each block keeps its values, scale and zero point."""
    path = nbits_llama(zoo, tmp_path, "llama", 16, False)
    g, sol, part, perms, bundle = compile_in_memory(path, seed=9)
    server = {t.name: numpy_helper.to_array(t) for t in bundle.server.graph.initializer}
    checked = 0
    for idx in part.server_nodes:
        node = g.model.graph.node[idx]
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n, k, bs = attrs["N"], attrs["K"], attrs["block_size"]
        nb = k // bs
        x_rank, y_rank = len(g.shapes[node.input[0]]), len(g.shapes[node.output[0]])
        ck, cn = sol.classes(node.input[0], x_rank)[-1], sol.classes(node.output[0], y_rank)[-1]
        pk = perms.vector(ck) if ck is not None else np.arange(k)
        pn = perms.vector(cn) if cn is not None else np.arange(n)
        blocks = pk.reshape(nb, bs) // bs
        assert (blocks == blocks[:, :1]).all()  # every new block is one whole old block
        srv = bundle.server.graph.node[part.server_nodes.index(idx)]
        q, q2 = g.constants[node.input[1]], server[srv.input[1]]
        assert q2.shape == q.shape and q2.dtype == np.uint8
        v, v2 = nibbles(q, n, nb, bs).reshape(n, k), nibbles(q2, n, nb, bs).reshape(n, k)
        np.testing.assert_array_equal(v2, v[np.ix_(pn, pk)])
        s, s2 = g.constants[node.input[2]].reshape(n, nb), server[srv.input[2]].reshape(n, nb)
        np.testing.assert_array_equal(s2, s[np.ix_(pn, blocks[:, 0])])
        z, z2 = g.constants[node.input[3]], server[srv.input[3]]
        zv = np.stack([z & 15, z >> 4], -1).reshape(n, -1)[:, :nb]
        zv2 = np.stack([z2 & 15, z2 >> 4], -1).reshape(n, -1)[:, :nb]
        np.testing.assert_array_equal(zv2, zv[np.ix_(pn, blocks[:, 0])])
        assert not np.array_equal(q2, q)
        checked += 1
    assert checked == 15


def test_matmul_nbits_key_space_is_reported(zoo, tmp_path, capsys):
    """stip inspect shows the block structure of K and its key space (log2 of the number of permutations)."""
    path = nbits_llama(zoo, tmp_path, "llama", 16, False)
    assert cli.main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    hidden = next(s for s in report["spaces"] if s["name"] == "hidden")
    assert hidden["structure"].startswith("2 x 16 (quantization blocks")
    # 2 whole blocks, then one permutation of 16 values per block: log2(2! * 16!^2)
    expect = np.log2(2) + 2 * sum(np.log2(np.arange(1, 17)))
    assert abs(hidden["log2_choices"] - expect) < 0.2, hidden
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "key bits" in text and f"{hidden['log2_choices']:.1f}" in text


def test_matmul_nbits_blocks_that_straddle_heads_are_refused(tmp_path, capsys):
    """Heads of 12 values read by o_proj in blocks of 16: a block holds parts of two heads, so no permutation keeps
    both whole heads and whole blocks. One line naming the node, the sizes and the way out; no bundle."""
    import export_models
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src = export_models.export_llama(tmp_path / "llama-hd12.onnx", dynamo=False,
                                     config=export_models.tiny_llama_config(head_dim=12))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=16)
    quantizer.process()
    path = tmp_path / "llama-hd12-q4.onnx"
    onnx.save(quantizer.model.model, str(path))
    assert cli.main(["compile", str(path), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MatMulNBits node" in err[0] and "o_proj" in err[0], err
    assert "K=48 is read in 3 blocks of 16" in err[0] and "4 x 12" in err[0] and "block_size" in err[0], err
    assert not (tmp_path / "out").exists()


# ---- QOperator decoders: QLinearConcat appends to the quantized KV cache, Split cuts the uint8 q|k|v ----

@pytest.mark.parametrize("family", ["gpt2-cache", "llama-cache"])
def test_qoperator_decoder_generates_as_the_quantized_original(zoo, tmp_path, family):
    from onnxruntime.quantization import QuantFormat, quantize_static

    from stip.runtime.generate import StipGenerator, generate_plaintext

    src = zoo.get(family)

    class Calibration:
        def __init__(self):
            self.items = iter([random_feeds(src, batch=2, seq=5, past=3, seed=i) for i in range(4)])

        def get_next(self):
            return next(self.items, None)

    path = tmp_path / f"{family}-qop.onnx"
    quantize_static(str(src), str(path), Calibration(), quant_format=QuantFormat.QOperator, per_channel=True)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QLinearConcat", "QLinearMatMul"} <= ops, ops
    compile_model(path, tmp_path / "out", max_context=64)  # the self-check compares against the quantized original
    checks = verify(tmp_path / "out", path, past=4)
    assert all(c.ok for c in checks) and max(c.max_abs for c in checks) < 1e-2, checks
    prompt = [5, 9, 17, 3, 44]
    assert list(StipGenerator(tmp_path / "out", device="cpu").generate(prompt, 12)) == \
        generate_plaintext(path, prompt, 12)
