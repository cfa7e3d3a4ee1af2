"""compile checks its own output: a wrong bundle is refused with nothing written; --no-check skips the check."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from graphs import embed_then, ints, model, save, weight
from onnx import TensorProto, helper, numpy_helper

from stip.compiler import cli
from stip.compiler.pipeline import compile_model
from stip.passes import rules
from stip.passes.errors import StipError
from stip.runtime.verify import verify


@pytest.fixture
def bias_rule_bug(monkeypatch):
    """The BiasGelu bug in small: LayerNormalization's rule ignores its bias (beta), so beta gets a permutation
    of its own while the activation it is added to carries the hidden permutation."""

    def norm_ignoring_beta(ctx):
        rules.broadcast_into(ctx, 0)
        rules.broadcast_into(ctx, 1)

    monkeypatch.setitem(rules.OPS, "LayerNormalization",
                        dataclasses.replace(rules.OPS["LayerNormalization"], rule=norm_ignoring_beta))


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if "stip" in p.name or p.name == "out")


@pytest.mark.parametrize("family,output", [("bert", "last_hidden_state"), ("gpt2-cache", "logits")])
def test_wrong_bundle_is_refused_and_nothing_written(zoo, tmp_path, bias_rule_bug, family, output):
    out = tmp_path / "out"
    with pytest.raises(StipError, match=f"self-check failed: output '{output}'.*max abs") as e:
        compile_model(zoo.get(family), out)
    assert "nothing was written" in str(e.value)
    assert _leftovers(tmp_path) == []


def test_cli_refuses_wrong_bundle_with_one_line(zoo, tmp_path, bias_rule_bug, capsys):
    out = tmp_path / "out"
    assert cli.main(["compile", str(zoo.get("bert")), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "self-check failed: output 'last_hidden_state'" in err[0], err
    assert _leftovers(tmp_path) == []


def test_no_check_writes_the_wrong_bundle_that_verify_then_catches(zoo, tmp_path, bias_rule_bug):
    """--no-check really skips the check: the same broken compile is written, and only `verify` sees it."""
    model, out = zoo.get("bert"), tmp_path / "out"
    report = compile_model(model, out, check=False)
    assert report["self_check"] == "skipped (--no-check)"
    checks = verify(out, model, batch=2, seq=5)
    assert not all(c.ok for c in checks) and max(c.max_abs for c in checks) > 1e-2


@pytest.mark.parametrize("family", ["bert", "gpt2-cache"])
def test_normal_compile_passes_the_check(zoo, tmp_path, family, capsys):
    model, out = zoo.get(family), tmp_path / "out"
    assert cli.main(["compile", str(model), "-o", str(out), "-q"]) == 0
    assert "checked: pre -> server -> post matches the original" in capsys.readouterr().out
    chk = json.loads((out / "developer" / "report.json").read_text())["self_check"]
    assert chk["outputs"] and all(0 <= r["max_abs"] <= r["tolerance"] <= 1e-3 for r in chk["outputs"])
    assert np.isfinite([r["max_abs"] for r in chk["outputs"]]).all()


def _refused_models(tmp_path):
    """(model, extra flags): each is refused by compile at a different stage of the shared analysis."""
    leak = [helper.make_node("MatMul", ["h", "w"], ["m"]), helper.make_node("Cast", ["ids"], ["idf"], to=1),
            helper.make_node("Unsqueeze", ["idf", "ax"], ["idu"]),
            helper.make_node("Add", ["m", "idu"], ["y"], name="leaky_add")]
    cumsum = [helper.make_node("CumSum", ["h", "axis"], ["cs"], name="odd_cumsum"),
              helper.make_node("MatMul", ["cs", "w"], ["y"])]
    return {
        "partition": (save(embed_then(leak, ["B", "S", 4], [weight("w", 8, 4), ints("ax", [2])]),
                           tmp_path / "leak.onnx"), []),
        "no private input": (save(embed_then([helper.make_node("MatMul", ["h", "w"], ["y"])], ["B", "S", 4],
                                             [weight("w", 8, 4)]), tmp_path / "plain.onnx"), ["--public", "ids"]),
        "solver": (save(embed_then(cumsum, ["B", "S", 4], [ints("axis", 2), weight("w", 8, 4)]),
                        tmp_path / "cumsum.onnx"), []),
    }


@pytest.mark.parametrize("stage", ["partition", "no private input", "solver"])
def test_inspect_shows_the_blocker_compile_refuses_with(tmp_path, capsys, stage):
    model, flags = _refused_models(tmp_path)[stage]
    assert cli.main(["compile", str(model), "-o", str(tmp_path / "out"), "-q", *flags]) == 2
    refusal = capsys.readouterr().err.strip().removeprefix("stip compile: error: ")
    assert cli.main(["inspect", str(model), "--json", *flags]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["compiles"] is False and rep["blockers"]
    assert refusal.split(" (and ")[0] == rep["blockers"][0]
    assert cli.main(["inspect", str(model), *flags]) == 0
    text = capsys.readouterr().out
    assert "every node placed" not in text and "stip compile would refuse this model" in text
    assert rep["blockers"][0] in text


def test_inspect_of_a_compilable_model_says_so(zoo, capsys):
    assert cli.main(["inspect", str(zoo.get("bert"))]) == 0
    assert "every node placed: no blockers" in capsys.readouterr().out
    assert cli.main(["inspect", str(zoo.get("bert")), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["compiles"] is True and rep["blockers"] == [] and rep["unpermuted_crossings"] == []


def _merged_decoder(tmp_path):
    """optimum --legacy's decoder_model_merged.onnx in small: a top-level If on use_cache_branch."""
    def branch(name, w):
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)
        return helper.make_graph([helper.make_node("MatMul", ["h", w], [f"{name}_y"])], name, [], [out])

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])
    flag = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", 16])
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h"]),
             helper.make_node("If", ["use_cache_branch"], ["logits"], name="optimum::if",
                              then_branch=branch("with_past", "w1"), else_branch=branch("no_past", "w2"))]
    return save(model(nodes, [ids, flag], [y], [weight("table", 16, 8), weight("w1", 8, 16), weight("w2", 8, 16)]),
                tmp_path / "decoder_model_merged.onnx")


@pytest.mark.parametrize("case,needles", [
    ("merged decoder", ["merged decoder", "If node 'optimum::if'", "'use_cache_branch'",
                        "decoder_with_past_model.onnx", "without --legacy"]),
])
def test_message_names_the_real_cause(zoo, tmp_path, capsys, case, needles):
    model_path = {"merged decoder": lambda: _merged_decoder(tmp_path)}[case]()  # quantized: test_quantized.py
    for cmd in (["compile", str(model_path), "-o", str(tmp_path / "out"), "-q"], ["inspect", str(model_path)]):
        assert cli.main(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no Transformer" not in err[0], err
        for n in needles:
            assert n in err[0], (n, err[0])
    assert not (tmp_path / "out").exists()


def _roles_mixed_into_hidden(tmp_path):
    """Role features multiplied into the hidden state (outer product, then flattened into one projection): the
    client sends the product with the roles' own axis, pinned by the graph input, inside the permuted one."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])
    roles = helper.make_tensor_value_info("roles", TensorProto.FLOAT, ["B", "S", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 6])
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
             helper.make_node("Unsqueeze", ["h", "ax3"], ["h4"]),
             helper.make_node("Unsqueeze", ["roles", "ax2"], ["r4"]),
             helper.make_node("Mul", ["h4", "r4"], ["mixed"], name="role_mix"),
             helper.make_node("Reshape", ["mixed", "flat"], ["role_features"]),
             helper.make_node("MatMul", ["role_features", "w"], ["y"], name="proj")]
    inits = [weight("table", 16, 8), ints("ax3", [3]), ints("ax2", [2]), ints("flat", [0, 0, 32]), weight("w", 32, 6)]
    return save(model(nodes, [ids, roles], [y], inits), tmp_path / "roles.onnx")


def test_warns_about_a_crossing_tensor_with_a_plaintext_feature_block(tmp_path, capsys):
    path = _roles_mixed_into_hidden(tmp_path)
    assert cli.main(["compile", str(path), "-o", str(tmp_path / "out"), "-q", "--public", "roles"]) == 0
    io = capsys.readouterr()
    assert "checked: pre -> server -> post matches" in io.out  # exact, but not private: hence the warning
    warning = [ln for ln in io.err.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "'role_features'" in warning[0] and "block of size 4" in warning[0], io.err
    assert "graph input 'roles'" in warning[0] and "weight 'w'" in warning[0]
    assert cli.main(["inspect", str(path), "--json", "--public", "roles"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["unpermuted_crossings"] == [warning[0].removeprefix("stip compile: warning: ")]
    assert cli.main(["inspect", str(path)]) == 0
    assert "warning: tensor 'role_features' sent to the server keeps" in capsys.readouterr().out


INT8_VARIANTS = ["per-row", "per-column", "dequantize-after", "dequantize-before"]


def int8_embedding(src, dst, variant: str, ids_input: str = "input_ids") -> None:
    """Rewrite the token embedding as int8 weight-only quantized: int8 table, per-row or per-column scale,
    dequantized by Cast + Mul or by DequantizeLinear (after the Gather, as quantize_dynamic does, or before)."""
    m = onnx.load(str(src))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    node = next(n for n in g.node if n.op_type == "Gather" and n.input[1] == ids_input and n.input[0] in inits)
    name, out = node.input[0], node.output[0]
    table = numpy_helper.to_array(inits[name]).astype(np.float32)
    scale = np.abs(table).max(axis=1, keepdims=True) if variant == "per-row" else np.abs(table).max(axis=0)
    scale = (scale / 127).astype(np.float32)
    q = np.round(table / scale).clip(-127, 127).astype(np.int8)
    qn, sn, zn = name + ".int8", name + ".scale", name + ".zp"
    g.initializer.remove(inits[name])
    g.initializer.extend([numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn),
                          numpy_helper.from_array(np.zeros(scale.shape, np.int8), zn)])
    gather_q = helper.make_node("Gather", [qn, ids_input], [out + ".q"], name="emb_q")
    cast = helper.make_node("Cast", [out + ".q"], [out + ".f"], to=TensorProto.FLOAT)
    new = {
        "per-row": [gather_q, cast, helper.make_node("Gather", [sn, ids_input], [out + ".s"], name="emb_scale"),
                    helper.make_node("Mul", [out + ".f", out + ".s"], [out])],
        "per-column": [gather_q, cast, helper.make_node("Mul", [out + ".f", sn], [out])],
        "dequantize-after": [gather_q, helper.make_node("DequantizeLinear", [out + ".q", sn, zn], [out], axis=-1)],
        "dequantize-before": [helper.make_node("DequantizeLinear", [qn, sn, zn], [name + ".deq"], axis=1),
                              helper.make_node("Gather", [name + ".deq", ids_input], [out], name="emb")],
    }[variant]
    idx = list(g.node).index(node)
    g.node.remove(node)
    for k, n in enumerate(new):
        g.node.insert(idx + k, n)
    onnx.save(m, str(dst))


@pytest.mark.parametrize("family,variant", [("bert", v) for v in INT8_VARIANTS] + [("llama-cache", "per-row")])
def test_int8_embedding_compiles_exactly_with_private_ids(zoo, tmp_path, family, variant):
    src, path, out = zoo.get(family), tmp_path / "int8.onnx", tmp_path / "out"
    int8_embedding(src, path, variant)
    report = compile_model(path, out)  # the self-check compares against the int8 original
    assert "input_ids" in report["private_inputs"]
    manifest = json.loads((out / "client" / "stip.json").read_text())
    q = next(numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.name.endswith(".int8"))
    assert manifest["vocab_size"]["input_ids"] == q.shape[0]  # verify and generate draw from the whole vocabulary
    checks = verify(out, path, batch=3, seq=13, past=4)
    assert all(c.ok for c in checks), checks
    pre = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out / "client" / "pre.onnx")).graph.initializer}
    shipped = [v for v in pre.values() if v.dtype == np.int8 and v.shape == q.shape]
    assert len(shipped) == 1 and not np.array_equal(shipped[0], q)  # the int8 table's feature axis is permuted
    assert sorted(map(bytes, shipped[0].T)) == sorted(map(bytes, q.T))


def _fp16(zoo, tmp_path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path = tmp_path / "bert-fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(zoo.get("bert"))), keep_io_types=False), str(path))
    return path


def test_fp16_model_is_checked_at_fp16_precision(zoo, tmp_path):
    report = compile_model(_fp16(zoo, tmp_path), tmp_path / "out")
    tol = {r["output"]: r["tolerance"] for r in report["self_check"]["outputs"]}
    assert 1e-2 <= min(tol.values()) and max(tol.values()) < 0.1


def test_fp16_tolerance_still_catches_a_wrong_bundle(zoo, tmp_path, bias_rule_bug):
    with pytest.raises(StipError, match="self-check failed: output '(last_hidden_state|pooler_output)'"):
        compile_model(_fp16(zoo, tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
