"""`stip audit`: the attacks succeed when the attacker holds the weights (or a fine-tuned copy of them), stay at
chance against an independently drawn model of the same architecture, and the CLI behaves."""

from __future__ import annotations

import json

import export_models
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from stip.compiler.audit import audit
from stip.compiler.cli import main
from stip.compiler.pipeline import compile_model

FAMILIES = {"bert": export_models.export_bert, "gpt2-cache": lambda p, **kw: export_models.export_gpt2(
    p, cache=True, **kw), "llama-cache": lambda p, **kw: export_models.export_llama(p, cache=True, **kw)}


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """Per family: the original, its bundle, a fine-tuned copy (1% relative noise on every weight), and an
    independently randomized model of the same architecture."""
    root = tmp_path_factory.mktemp("audit")
    cache = {}

    def get(family: str):
        if family not in cache:
            orig = FAMILIES[family](root / f"{family}.onnx", dynamo=False, seed=0)
            other = FAMILIES[family](root / f"{family}-other.onnx", dynamo=False, seed=7)
            tuned = root / f"{family}-tuned.onnx"
            m = onnx.load(str(orig))
            rng = np.random.default_rng(3)
            for t in m.graph.initializer:
                w = numpy_helper.to_array(t)
                if w.dtype == np.float32 and w.size > 1:
                    t.CopyFrom(numpy_helper.from_array((w * (1 + 0.01 * rng.standard_normal(w.shape)))
                                                       .astype(np.float32), t.name))
            onnx.save(m, str(tuned))
            out = root / f"{family}-bundle"
            compile_model(orig, out)
            cache[family] = (orig, tuned, other, out)
        return cache[family]

    return get


def _attack(result: dict, name: str) -> dict:
    return next(a for a in result["attacks"] if a["attack"] == name)


@pytest.mark.parametrize("family", ["bert", "gpt2-cache", "llama-cache"])
def test_original_as_reference_is_not_private(audited, family):
    orig, _, _, out = audited(family)
    r = audit(out, orig, samples=4, seq=8, layers=1)
    wm, vm = _attack(r, "weight matching"), _attack(r, "vocabulary matching")
    assert wm["success"] >= 0.99 and wm["hidden_recovered"] >= 0.99, wm
    assert vm["success"] >= 0.95 and vm["stages"][0]["sorted_l1"] >= 0.95, vm
    assert r["verdict"] == "not private" and "Not private" in r["summary"]
    assert _attack(r, "deterministic token encoding")["success"] == 1.0
    report = json.loads((out / "developer" / "report.json").read_text())
    assert report["audit"]["verdict"] == "not private" and "spaces" in report  # compile report kept


@pytest.mark.parametrize("family", ["bert", "llama-cache"])
def test_fine_tuned_copy_still_recovers(audited, family):
    _, tuned, _, out = audited(family)
    r = audit(out, tuned, samples=4, seq=8, layers=1, write_report=False)
    assert _attack(r, "weight matching")["success"] >= 0.9
    assert _attack(r, "vocabulary matching")["success"] >= 0.9
    assert r["verdict"] == "not private"


@pytest.mark.parametrize("family", ["bert", "gpt2-cache", "llama-cache"])
def test_independent_model_stays_at_chance(audited, family):
    _, _, other, out = audited(family)
    r = audit(out, other, samples=4, seq=8, layers=1, write_report=False)
    wm, vm = _attack(r, "weight matching"), _attack(r, "vocabulary matching")
    assert abs(wm["success"] - wm["chance"]) < 0.05, wm
    assert wm["verdict"] == "chance"
    for row in vm["stages"]:
        assert row["sorted_l1"] < row["chance"] + 0.05 and row["norm"] < row["chance"] + 0.05, row
    assert r["verdict"] == "private against this reference"


def test_cli_json_and_errors(audited, tmp_path, capsys):
    orig, _, _, out = audited("bert")
    assert main(["audit", str(out), "--json", "--samples", "2", "--seq", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reference"] is None and data["verdict"] == "private only while its weights are"
    assert _attack(data, "plaintext inputs")["inputs"][0]["tensor"] == "attention_mask"
    assert main(["audit", str(out), "--reference", str(tmp_path / "missing.onnx"), "-q"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["audit", str(tmp_path), "-q"]) == 2
    assert main(["audit", str(out), "--samples", "0", "-q"]) == 2
    other = FAMILIES["gpt2-cache"](tmp_path / "gpt2.onnx", dynamo=False)
    assert main(["audit", str(out), "--reference", str(other), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err


def test_prompt_texts_through_the_shipped_tokenizer(audited, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    orig, _, _, plain = audited("gpt2-cache")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello private world"] * 20,
                            trainers.BpeTrainer(vocab_size=100, special_tokens=["[UNK]"]))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    out = tmp_path / "out"
    compile_model(orig, out, tokenizer=tmp_path / "tok")
    prompts = ["the quick brown fox jumps", "hello private world over the dog"]
    r = audit(out, orig, prompts=prompts, layers=1, write_report=False)
    n = min(len(tok.encode(p).ids) for p in prompts)
    assert r["traffic"] == {"prompts": 2, "tokens_each": n, "source": "--prompt texts", "vocabulary": 128}
    assert _attack(r, "vocabulary matching")["stages"][0]["sorted_l1"] == 1.0
    assert main(["audit", str(plain), "--prompt", "hello", "-q"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_weight_matching_sees_through_per_channel_ffn_scaling(tmp_path):
    """A candidate defence (positive per-channel scalings folded into a ReLU FFN's up and down projections) stays
    exact but does not hide the FFN permutation from the audit's per-slice-normalised features."""
    import sys
    from pathlib import Path

    from stip.runtime.verify import verify

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from mitigation_ffn_scaling import scale_ffn

    model = export_models.export_bert(tmp_path / "relu.onnx", dynamo=False,
                                      config=export_models.tiny_bert_config(hidden_act="relu"))
    out = tmp_path / "out"
    compile_model(model, out)
    scale_ffn(out, model, spread=3.0)
    assert all(c.ok for c in verify(out, model, device="cpu"))
    r = audit(out, model, samples=2, seq=4, write_report=False)
    ffn = [s["recovered"] for s in _attack(r, "weight matching")["spaces"] if s["space"].endswith(".ffn")]
    assert ffn and min(ffn) >= 0.99
