"""Merged decoders (optimum 1.27 `--legacy` decoder_model_merged.onnx: both decoders inside one If on
`use_cache_branch`): compiled as the with-past branch, generating from the first token exactly as the original does
when fed as optimum feeds it (use_cache_branch False with an empty past, then True). Ifs of any other shape, and
with-past branches that cannot serve the first token, are refused naming the If."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from stip.compiler.pipeline import compile_model
from stip.passes.errors import StipError
from stip.passes.merged import branch_model
from stip.runtime.bundle import LocalDeployment
from stip.runtime.generate import StipGenerator
from stip.runtime.verify import random_feeds, verify

pytestmark = pytest.mark.optimum
STIP = [sys.executable, "-m", "stip.compiler.cli"]
PROMPT = [5, 9, 17, 3, 44]
MERGED = "decoder_model_merged.onnx"


def stip(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*STIP, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def optimum_greedy(model, prompt: list[int], n: int, first_with_past: bool = False) -> list[int]:
    """Greedy decoding through the original merged file in onnxruntime, fed as optimum's ORTModelForCausalLM feeds
    it: the whole prompt with an empty past and use_cache_branch False, then one token at a time with True
    (`first_with_past`: True from the start, the with-past branch on the empty past)."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    outs = [o.name for o in sess.get_outputs()]
    past = {n: np.zeros([1 if a == 0 else (d if isinstance(d, int) else 0) for a, d in enumerate(i.shape)],
                        np.float32) for n, i in ins.items() if n.startswith("past_key_values")}
    ids, new, tokens = list(prompt), list(prompt), []
    for step in range(n):
        feeds = {"input_ids": np.array([new], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
                 "use_cache_branch": np.array([step > 0 or first_with_past]), **past}
        if "position_ids" in ins:
            feeds["position_ids"] = np.arange(len(ids) - len(new), len(ids), dtype=np.int64)[None]
        res = dict(zip(outs, sess.run(None, feeds)))
        past = {n: res[n.replace("past_key_values", "present", 1)] for n in past}
        token = int(np.argmax(res["logits"][0, -1]))
        ids.append(token)
        tokens.append(token)
        new = [token]
    return tokens


@pytest.fixture(scope="module")
def merged(optimum_legacy, tmp_path_factory):
    """(original merged file, its compiled bundle) per arch, compiled once for this module."""
    root, made = tmp_path_factory.mktemp("merged-bundles"), {}

    def get(arch: str):
        if arch not in made:
            model = optimum_legacy(arch) / MERGED
            report = compile_model(model, root / arch)
            made[arch] = (model, root / arch, report)
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_decoder_generates_like_the_original(merged, arch):
    model, out, report = merged(arch)
    man = json.loads((out / "client" / "stip.json").read_text())
    assert man["fixed_inputs"] == {"use_cache_branch": True} and "use_cache_branch" not in man["inputs"]
    assert man["axes"]["attention_mask"] == ["batch", "total"], man["axes"]
    server = onnx.load(str(out / "server" / "model.onnx"))
    assert "If" not in {n.op_type for n in server.graph.node}
    assert "use_cache_branch" not in {i.name for i in server.graph.input}
    assert report["merged_decoder"]["fixed_input"] == "use_cache_branch"
    assert report["self_check"]["merged_first_token_max_abs"] < 1e-4
    want = optimum_greedy(model, PROMPT, 12)
    assert len(set(want)) > 1, want  # not a degenerate model that repeats one token
    assert list(StipGenerator(out, device="cpu").generate(PROMPT, 12)) == want
    # the reference's first token came from the first-token branch; the with-past branch agrees from the start
    assert optimum_greedy(model, PROMPT, 12, first_with_past=True) == want
    for past, seq in ((0, 6), (5, 3)):
        checks = verify(out, model, batch=2, seq=seq, past=past, device="cpu")
        assert checks and all(c.ok and c.max_abs < 1e-4 for c in checks), checks


def test_merged_decoder_cli_as_a_user_runs_it(optimum_legacy, tmp_path):
    """stip compile decoder_model_merged.onnx -o out && stip generate out --prompt-ids ... && stip verify out."""
    model = optimum_legacy("llama") / MERGED
    out = tmp_path / "out"
    r = stip("inspect", model)
    assert r.returncode == 0 and "merged decoder: If node 'optimum::if' on input 'use_cache_branch'" in r.stdout, r
    r = stip("compile", model, "-o", out)
    assert r.returncode == 0 and "checked:" in r.stdout, r.stdout + r.stderr
    assert "Unable to determine" not in r.stdout + r.stderr  # onnxruntime's shape-inference chatter is muted
    r = stip("generate", out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "10", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert [int(x) for x in r.stdout.split()] == optimum_greedy(model, PROMPT, 10)
    for past in ("0", "4"):
        r = stip("verify", out, "--original", model, "--past", past, "--device", "cpu")
        assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr


def test_callers_may_still_feed_use_cache_branch(merged, tmp_path):
    """The condition is no bundle input, but a caller written for the merged file that feeds it (either value) is
    accepted and the input ignored: `stip run` and the in-process client give the original's outputs."""
    model, out, _ = merged("gpt2")
    feeds = random_feeds(model, batch=2, seq=4, axes=json.loads((out / "client" / "stip.json").read_text())["axes"])
    assert feeds["past_key_values.0.key"].shape[2] == 0
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ref = sess.run(["logits"], {**feeds, "use_cache_branch": np.array([False])})[0]
    dep = LocalDeployment(out, "cpu")
    plain = {k: v for k, v in feeds.items() if not k.startswith("past_key_values")}
    for flag in (None, True, False):
        got = dep.run(plain if flag is None else {**plain, "use_cache_branch": np.array([flag])})["logits"]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    np.savez(tmp_path / "in.npz", **{**plain, "use_cache_branch": np.array([False])})
    r = stip("run", out, "--inputs", tmp_path / "in.npz", "--device", "cpu")
    assert r.returncode == 0 and "logits: float32[2, 4, " in r.stdout, r.stdout + r.stderr


def _edit(src, dst, change) -> None:
    m = onnx.load(str(src))
    change(m.graph, {a.name: a.g for a in m.graph.node[0].attribute})
    onnx.save(m, str(dst))


def _one_line(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_an_if_of_another_shape_is_refused_naming_it(optimum_legacy, tmp_path):
    """An If whose outputs are not the graph's outputs (here logits are post-processed after it) is not a choice
    between two whole decoders: refused in one line naming the If, the reason and what to do; nothing written."""
    src = optimum_legacy("gpt2") / MERGED

    def post_processed(g, _branches):
        g.node[0].output[0] = "if_logits"
        g.node.append(helper.make_node("Relu", ["if_logits"], ["logits"], name="after_if"))

    _edit(src, tmp_path / "m.onnx", post_processed)
    _one_line(stip("compile", tmp_path / "m.onnx", "-o", tmp_path / "out", "-q"), "merged decoder",
              "If node 'optimum::if' on input 'use_cache_branch'", "are not exactly the graph's outputs",
              "decoder_with_past_model.onnx")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how,words", [
    ("identity", "returns 'past_key_values.0.key' passed through unchanged as 'present.0.key'"),
    ("constant", "returns a constant as 'present.0.key'"),
])
def test_a_with_past_branch_that_never_computes_a_cache_is_refused(optimum_legacy, tmp_path, how, words):
    """A with-past branch that returns a past input unchanged, or a constant, as its present (optimum's seq2seq
    merged decoders do so with the cross-attention cache) cannot start from an empty past: refused, naming the
    If and the output, and pointing to the two-file pair."""
    src = optimum_legacy("gpt2") / MERGED

    def never_computed(_g, branches):
        then = branches["then_branch"]
        old = then.output[1].name
        for n in then.node:
            n.output[:] = [o + "_unused" if o == old else o for o in n.output]
            n.input[:] = [x + "_unused" if x == old else x for x in n.input]
        if how == "identity":
            then.node.append(helper.make_node("Identity", ["past_key_values.0.key"], [old]))
        else:
            then.node.append(helper.make_node("Constant", [], [old], value=onnx.numpy_helper.from_array(
                np.zeros((1, 4, 1, 8), np.float32))))

    _edit(src, tmp_path / "m.onnx", never_computed)
    with pytest.raises(StipError, match=rf"If node 'optimum::if' on input 'use_cache_branch': its with-past branch "
                                        rf"\(then_branch\) {re.escape(words)} .*cannot start from an empty past.*"
                                        r"decoder_model.onnx and decoder_with_past_model.onnx together"):
        compile_model(tmp_path / "m.onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert branch_model(onnx.load(str(tmp_path / "m.onnx")), tmp_path / "m.onnx", "first_token") is not None


def test_branch_model_splits_a_merged_decoder_into_its_pair(optimum_legacy):
    """branch_model (for compiling both decoders with one key): the first-token branch computes what optimum's
    decoder_model.onnx computes, the with-past branch what the merged file computes with use_cache_branch True;
    neither keeps the condition, and the first-token decoder has no cache inputs."""
    d = optimum_legacy("gpt2")
    merged_model = onnx.load(str(d / MERGED))
    first = branch_model(merged_model, d / MERGED, "first_token")
    past = branch_model(merged_model, d / MERGED, "with_past")
    assert {i.name for i in first.graph.input} == {"input_ids", "attention_mask"}
    assert "use_cache_branch" not in {i.name for i in past.graph.input}
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(0, 300, (2, 4)), np.ones((2, 4), np.int64)
    run = lambda m, feeds: ort.InferenceSession(m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m),  # noqa: E731
                                                providers=["CPUExecutionProvider"]).run(None, feeds)
    ref = run(d / "decoder_model.onnx", {"input_ids": ids, "attention_mask": mask})
    for a, b in zip(run(first, {"input_ids": ids, "attention_mask": mask}), ref):
        np.testing.assert_allclose(a, b, atol=1e-5)
    cache = {f"past_key_values.{i}.{kv}": rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
             for i in range(2) for kv in ("key", "value")}
    feeds = {"input_ids": ids[:, :1], "attention_mask": np.ones((2, 4), np.int64), **cache}
    want = run(d / MERGED, {**feeds, "use_cache_branch": np.array([True])})
    for a, b in zip(run(past, feeds), want):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_branches_that_disagree_on_the_first_token_are_refused(optimum_legacy, tmp_path):
    """When the first-token branch computes something the with-past branch on an empty past does not (here its
    logits are shifted), compiling the with-past branch would change the first token: the self-check refuses, naming
    the If and the output, and writes nothing."""
    src = optimum_legacy("llama") / MERGED

    def shift_first_token(_g, branches):
        first = branches["else_branch"]
        old = first.output[0].name
        for n in first.node:
            n.output[:] = [o + "_raw" if o == old else o for o in n.output]
        first.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "shift"))
        first.node.append(helper.make_node("Add", [old + "_raw", "shift"], [old]))

    _edit(src, tmp_path / "m.onnx", shift_first_token)
    with pytest.raises(StipError, match=r"If node 'optimum::if' on input 'use_cache_branch': the with-past branch "
                                        r"\(use_cache_branch=True\) on an empty past gives output 'logits' differing "
                                        r"by max abs 0.5"):
        compile_model(tmp_path / "m.onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merged_bundle_over_http_with_stip_serve(merged):
    """stip serve with a merged decoder's bundle: remote generation equals the original's, and a remote caller
    that feeds use_cache_branch has it ignored on the client side (the server never sees it)."""
    from stip.runtime.launch import stip_server
    from stip.runtime.remote import RemoteClient, RemoteServer

    model, out, _ = merged("llama")
    with stip_server(out / "server") as url:
        gen = StipGenerator(out / "client", server=RemoteServer(url))
        assert list(gen.generate(PROMPT, 10)) == optimum_greedy(model, PROMPT, 10)
        feeds = {"input_ids": np.array([PROMPT]), "attention_mask": np.ones((1, len(PROMPT)), np.int64)}
        got = RemoteClient(out / "client", url).run({**feeds, "use_cache_branch": np.array([False])})["logits"]
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    empty = {i.name: np.zeros((1, 2, 0, 8), np.float32) for i in sess.get_inputs() if "past" in i.name}
    ref = sess.run(["logits"], {**feeds, **empty, "use_cache_branch": np.array([False])})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
