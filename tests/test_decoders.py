"""Decoder LLMs: GPT-2 (fused QKV, tied embeddings, tanh-GELU) and Llama (RoPE, GQA, RMSNorm, SwiGLU), with and
without a KV cache, both exporters, both head placements: logits equal and greedy tokens identical."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, run_model

from stip.compiler.pipeline import compile_model
from stip.passes.errors import StipError
from stip.runtime.bundle import LocalDeployment
from stip.runtime.generate import Sampler, StipGenerator, generate_plaintext
from stip.runtime.verify import random_feeds, verify

PROMPT = [5, 9, 17, 3, 44]
CASES = [(fam, dynamo, opset) for fam in ("gpt2", "llama", "gpt2-cache", "llama-cache")
         for dynamo, opset in ((False, 17), (True, 18))] + [("gpt2-cache", True, 17), ("llama-cache", False, 18)]


@pytest.mark.parametrize("family,dynamo,opset", CASES, ids=lambda v: str(v))
def test_logits_match(zoo, tmp_path, family, dynamo, opset):
    model = zoo.get(family, dynamo, opset)
    compile_model(model, tmp_path / "out")
    if "cache" in family:
        for past, seq in ((0, 6), (5, 4), (9, 1)):
            checks = verify(tmp_path / "out", model, batch=2, seq=seq, past=past, device="cpu")
            assert all(c.ok for c in checks), (past, seq, checks)
    else:
        feeds = random_feeds(model, batch=3, seq=11, seed=2)
        assert_equivalent(run_model(model, feeds), LocalDeployment(tmp_path / "out", device="cpu").run(feeds))


@pytest.mark.parametrize("family", ["gpt2-cache", "llama-cache", "gpt2-cache-tied"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("head", ["server", "client"])
def test_greedy_generation_is_identical(zoo, tmp_path, family, dynamo, head):
    model = zoo.get(family, dynamo, 18 if dynamo else 17)
    compile_model(model, tmp_path / "out", head=head, max_context=64)
    gen = StipGenerator(tmp_path / "out", device="cpu")
    got = list(gen.generate(PROMPT, 40))
    assert got == generate_plaintext(model, PROMPT, 40)
    sampled = list(gen.generate(PROMPT, 12, Sampler(0.8, 20, 0.9, seed=7)))
    assert sampled == generate_plaintext(model, PROMPT, 12, Sampler(0.8, 20, 0.9, seed=7))


def test_kv_cache_never_reaches_the_client(zoo, tmp_path):
    model = zoo.get("llama-cache")
    compile_model(model, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "client" / "stip.json").read_text())
    assert manifest["cache"] and not any("past" in n or "present" in n for n in manifest["inputs"])
    post = onnx.load(str(tmp_path / "out" / "client" / "post.onnx"))
    assert [i.name for i in post.graph.input] == ["logits.stip_server"]
    server = onnx.load(str(tmp_path / "out" / "server" / "model.onnx"))
    assert {o.name for o in server.graph.output} >= {"present.0.key", "present.1.value"}
    assert not {i.name for i in server.graph.input} & {"input_ids"}


def test_head_placement(zoo, tmp_path):
    """--head client: the server returns the final hidden state; post holds the (permuted) LM head."""
    model = zoo.get("gpt2-cache")
    compile_model(model, tmp_path / "srv", head="server")
    compile_model(model, tmp_path / "cli", head="client")
    srv = onnx.load(str(tmp_path / "srv" / "server" / "model.onnx"))
    cli = onnx.load(str(tmp_path / "cli" / "server" / "model.onnx"))
    vocab = 128

    def user_out(m):
        return next(o for o in m.graph.output if not o.name.startswith("present"))

    assert user_out(srv).type.tensor_type.shape.dim[-1].dim_value == vocab
    assert user_out(cli).type.tensor_type.shape.dim[-1].dim_value == 32  # hidden, not logits
    post = onnx.load(str(tmp_path / "cli" / "client" / "post.onnx"))
    assert "MatMul" in {n.op_type for n in post.graph.node}
    assert any(tuple(t.dims) in ((32, vocab), (vocab, 32)) for t in post.graph.initializer)
    report = json.loads((tmp_path / "cli" / "developer" / "report.json").read_text())
    assert report["head"] == "client"


def test_inspect_shows_decoder_spaces(zoo):
    from stip.compiler.inspect import inspect_model

    names = {s["name"]: s for s in inspect_model(zoo.get("llama-cache"))["spaces"]}
    for layer in (0, 1):
        assert names[f"layer{layer}.heads"]["size"] == 2  # KV groups
        assert names[f"layer{layer}.q_heads_in_group"]["size"] == 2  # query heads inside their group
        assert names[f"layer{layer}.ffn"]["size"] == 64  # gate and up share it
        assert f"layer{layer}.qk" in names and f"layer{layer}.v" in names
    assert names["rotary"]["size"] == 4  # frequency pairs: both rotary halves move together
    assert names["out"]["size"] == 128
    gpt2 = {s["name"] for s in inspect_model(zoo.get("gpt2-cache"))["spaces"]}
    assert {"hidden", "layer0.qk", "layer0.v", "layer1.ffn", "out"} <= gpt2


def test_generation_errors(zoo, tmp_path):
    model = zoo.get("gpt2-cache")
    compile_model(model, tmp_path / "out")
    gen = StipGenerator(tmp_path / "out", device="cpu")
    with pytest.raises(StipError, match="outside the vocabulary"):
        list(gen.generate([1, 500], 3))
    with pytest.raises(StipError, match="exceeds the model's context of 64"):
        list(gen.generate(list(range(60)), 10))


def test_no_cache_bundle_falls_back_to_prefill_with_a_warning(zoo, tmp_path):
    model = zoo.get("gpt2")
    compile_model(model, tmp_path / "out")
    gen = StipGenerator(tmp_path / "out", device="cpu")
    with pytest.warns(UserWarning, match="without a KV cache"):
        got = list(gen.generate(PROMPT, 8))
    assert got == generate_plaintext(model, PROMPT, 8)


def test_unpaired_cache_is_refused(zoo, tmp_path):
    m = onnx.load(str(zoo.get("gpt2-cache")))
    keep = [o for o in m.graph.output if o.name != "present.1.value"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    onnx.save(m, str(tmp_path / "broken.onnx"))
    with pytest.raises(StipError, match="past_key_values.1.value"):
        compile_model(tmp_path / "broken.onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_server_weights_are_all_permuted_for_tied_embeddings(zoo, tmp_path):
    model = zoo.get("gpt2-cache-tied", dynamo=True, opset=18)
    compile_model(model, tmp_path / "out")
    original = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer if len(t.dims) >= 2]
    server = onnx.load(str(tmp_path / "out" / "server" / "model.onnx"))
    for t in server.graph.initializer:
        w = onnx.numpy_helper.to_array(t)
        if w.ndim >= 2:
            assert not any(o.shape == w.shape and np.array_equal(o, w) for o in original), t.name


@pytest.mark.parametrize("family", ["qwen2-cache", "mistral-cache", "phi3-cache", "gemma-cache"])
def test_other_llama_like_decoders_need_no_model_specific_code(zoo, tmp_path, family):
    """Qwen2 (q/k/v biases), Mistral, Phi-3 (fused qkv and gate|up), Gemma (GeGLU, scaled embeddings)."""
    model = zoo.get(family)
    compile_model(model, tmp_path / "out")
    checks = verify(tmp_path / "out", model, batch=2, seq=3, past=6, device="cpu")
    assert all(c.ok for c in checks), checks
    assert list(StipGenerator(tmp_path / "out", device="cpu").generate(PROMPT, 33)) == \
        generate_plaintext(model, PROMPT, 33)


def _tiny_tokenizer(path):
    """A real fast tokenizer (tokenizer.json) trained here, with ids inside the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world", "private inference on permuted weights"]
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=100, special_tokens=["[UNK]"]))
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return tok


def test_stip_generate_cli_with_tokenizer_streams_text(zoo, tmp_path):
    import subprocess
    import sys

    model = zoo.get("gpt2-cache")
    tok = _tiny_tokenizer(tmp_path / "tok")
    compile_model(model, tmp_path / "out", tokenizer=tmp_path / "tok")
    assert (tmp_path / "out" / "client" / "tokenizer" / "tokenizer.json").exists()
    prompt = "hello world"
    ids = tok.encode(prompt).ids
    expected = generate_plaintext(model, ids, 6)
    cli = [sys.executable, "-m", "stip.compiler.cli", "generate", str(tmp_path / "out")]
    r = subprocess.run([*cli, "--prompt", prompt, "--max-new-tokens", "6", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt) and tok.decode(expected) in r.stdout
    r = subprocess.run([*cli, "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "6"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and tok.decode(expected) in r.stdout
    r = subprocess.run([*cli, "--prompt-ids", "1,2,999", "--max-new-tokens", "3"], capture_output=True, text=True)
    assert r.returncode == 2 and "outside the vocabulary" in r.stderr and "Traceback" not in r.stderr
