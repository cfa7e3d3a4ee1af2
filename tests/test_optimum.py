"""Files made the way most users make them: `optimum-cli export onnx` (optimum-onnx 0.1.0, in its own cached venv,
see examples/export_optimum.py) of random-weight models. Each one is compiled and verified through the `stip`
command as a user would; decoders also generate. Cases the compiler cannot place yet are strict xfails naming
the cause, so they flip when that fix lands. No exporter-specific code in stip: dims are read by role."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import export_optimum
import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, run_model

from stip.compiler.pipeline import compile_model
from stip.passes.errors import StipError
from stip.runtime.generate import StipGenerator, generate_plaintext
from stip.runtime.launch import stip_server
from stip.runtime.remote import RemoteClient, RemoteServer
from stip.runtime.verify import random_feeds, verify

pytestmark = pytest.mark.optimum
STIP = [sys.executable, "-m", "stip.compiler.cli"]
PROMPT = [5, 9, 17, 3, 44]
DECODERS = ["gpt2", "llama", "qwen2"]
EXPECTED = (AssertionError, StipError)  # how a known compiler gap shows; a failed optimum export is not absorbed
XFAIL: dict[tuple[str, str], str] = {}  # (arch, task) -> the compiler gap that still refuses it
CASES = export_optimum.CASES  # the (arch, task) pairs the export script documents as covered


def stip(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*STIP, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def _param(arch, task):
    marks = [pytest.mark.xfail(strict=True, raises=EXPECTED, reason=XFAIL[arch, task])] if (arch, task) in XFAIL else []
    return pytest.param(arch, task, marks=marks, id=f"{arch}-{task}")


@pytest.fixture(scope="module")
def bundle(optimum_model, tmp_path_factory):
    """Compiled optimum exports, one per (arch, task), shared by the tests of this module."""
    root, made = tmp_path_factory.mktemp("optimum-bundles"), {}

    def get(arch: str, task: str):
        if (arch, task) not in made:
            model = optimum_model(arch, task)
            compile_model(model, root / f"{arch}-{task}")
            made[arch, task] = (model, root / f"{arch}-{task}")
        return made[arch, task]

    return get


@pytest.mark.parametrize("arch,task", [_param(*c) for c in CASES])
def test_compile_and_verify_with_the_cli(optimum_model, tmp_path, arch, task):
    model = optimum_model(arch, task)
    out = tmp_path / "out"
    r = stip("compile", model, "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    runs = [("--past", "0", "--seq", "5"), ("--past", "6", "--seq", "3")] if "with-past" in task else [("--seq", "11",)]
    for extra in runs:
        r = stip("verify", out, "--original", model, "--batch", "2", *extra, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads(r.stdout)
        assert rep["passed"] and rep["outputs"], rep
        for o in rep["outputs"]:
            assert o["ok"] and o["max_abs"] < 1e-4 and o["argmax_agree"] == 1.0, o


OPTIMIZED = [("bert", "text-classification"), ("gpt2", "text-generation-with-past"), ("vit", "image-classification"),
             ("llama", "text-generation-with-past")]


@pytest.mark.parametrize("arch,task", OPTIMIZED, ids=[f"{a}-{t}" for a, t in OPTIMIZED])
def test_optimum_optimize_o2(optimum_model, tmp_path, arch, task):
    """`optimum-cli export onnx --optimize O2`: onnxruntime's fused com.microsoft ops inside the export (BERT:
    Attention, SkipLayerNormalization, BiasGelu; GPT-2: FastGelu; ViT: BiasGelu; Llama: SiLU as QuickGelu).
    FastGelu's and BiasGelu's bias once stayed unpermuted: GPT-2 and ViT bundles were silently wrong."""
    model = optimum_model(arch, task, ["--optimize", "O2"])
    compile_model(model, tmp_path / "out")
    for past, seq in ((0, 5), (6, 3)) if "with-past" in task else ((0, 11),):
        checks = verify(tmp_path / "out", model, batch=2, seq=seq, past=past, device="cpu")
        assert checks and all(c.ok for c in checks), checks


def test_fp16_export(optimum_model, tmp_path):
    """`--dtype fp16`: weights and activations in half precision; compared with the fp16 original at fp16
    tolerance (the permuted sums round differently in the last bits)."""
    model = optimum_model("bert", "feature-extraction", ["--dtype", "fp16"])
    assert onnx.load(str(model)).graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    compile_model(model, tmp_path / "out")
    checks = verify(tmp_path / "out", model, batch=2, seq=11, device="cpu", atol=1e-2, rtol=1e-2)
    assert checks and all(c.ok and c.max_abs < 1e-2 for c in checks), checks


@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_axis_roles_and_greedy_generation(bundle, arch):
    """optimum's mask axis is named `past_sequence_length + sequence_length`: its role (total) comes from the
    graph. GPT-2 lists the cache before the mask and position_ids, Llama and Qwen2 after: order does not matter."""
    model, out = bundle(arch, "text-generation-with-past")
    names = [i.name for i in onnx.load(str(model), load_external_data=False).graph.input]
    first_cache = min(i for i, n in enumerate(names) if n.startswith("past_key_values"))
    assert (first_cache < names.index("attention_mask")) == (arch == "gpt2")
    axes = json.loads((out / "client" / "stip.json").read_text())["axes"]
    assert axes["attention_mask"] == ["batch", "total"]
    assert axes["position_ids"] == ["batch", "new"] and axes["input_ids"] == ["batch", "new"]
    assert axes["past_key_values.0.key"][2] == "past"
    gen = StipGenerator(out, device="cpu")
    assert list(gen.generate(PROMPT, 30)) == generate_plaintext(model, PROMPT, 30)


def test_generation_past_the_position_table_is_refused_upfront(bundle):
    """optimum's GPT-2 takes position_ids as an input, so they are private and reach the 64-row position table
    through a Gather in pre: the table is still found (its indices are positions), so `stip generate` past it
    refuses in one line before running, rather than dying inside onnxruntime. The vocabulary table (indexed by
    token ids) and Llama's rotary positions (no table) set no limit."""
    model, out = bundle("gpt2", "text-generation-with-past")
    man = json.loads((out / "client" / "stip.json").read_text())
    assert "position_ids" in man["private"] and man["max_context"] == 64, man
    _one_line_error(stip("generate", out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "60",
                         "--device", "cpu"), "prompt of 5 tokens + 60 new tokens exceeds the model's context of 64")
    r = stip("generate", out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "59", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    _, llama = bundle("llama", "text-generation-with-past")
    assert json.loads((llama / "client" / "stip.json").read_text())["max_context"] is None
    _, opt = bundle("opt", "text-generation-with-past")  # 66 rows; positions counted by CumSum start at row 2
    assert json.loads((opt / "client" / "stip.json").read_text())["max_context"] == 64


def test_fixed_sin_cos_table_may_stay_in_plain_order(optimum_model, tmp_path):
    """CodeGen gathers rotary sines and cosines from a fixed buffer by position_ids; the rotary pairs pin its
    feature axis. It holds no learned weight, so that is allowed. position_ids are an input, hence private by
    default, and the rotated heads then mix them in on the server: refused naming the fix, exact with it."""
    model = optimum_model("codegen", "text-generation-with-past")
    with pytest.raises(StipError, match="reads private data .*mark the input --public"):
        compile_model(model, tmp_path / "refused")
    compile_model(model, tmp_path / "out", public=["position_ids"])
    for past, seq in ((0, 5), (6, 3)):
        checks = verify(tmp_path / "out", model, batch=2, seq=seq, past=past, device="cpu")
        assert checks and all(c.ok for c in checks), checks


def test_vit_image_size_comes_from_the_graph(bundle):
    """pixel_values is [batch_size, num_channels, height, width], all symbolic; the patch Conv and the position
    table fix 3 x 32 x 32 (patch 8: 16 patches + 1 class token = 17 table rows)."""
    model, out = bundle("vit", "image-classification")
    dims = [d.dim_param for d in onnx.load(str(model)).graph.input[0].type.tensor_type.shape.dim]
    assert all(dims), dims
    axes = json.loads((out / "client" / "stip.json").read_text())["axes"]
    assert axes["pixel_values"] == ["batch", 3, 32, 32]
    feeds = random_feeds(model, batch=2, axes=axes)
    assert feeds["pixel_values"].shape == (2, 3, 32, 32)
    # DeiT: class and distillation tokens in front (18 rows); their batch is read from the patches' Shape
    _, deit = bundle("deit", "image-classification")
    assert json.loads((deit / "client" / "stip.json").read_text())["axes"]["pixel_values"] == ["batch", 3, 32, 32]


def test_dim_names_do_not_decide_roles(bundle, tmp_path):
    """Rename every dim adversarially (the total length called `past`, the past called `total`): compile, verify
    and generation still work, since roles come from how the cache grows, not from names."""
    src, _ = bundle("llama", "text-generation-with-past")
    m = onnx.load(str(src))
    rename = {"batch_size": "sequence", "sequence_length": "past_len", "past_sequence_length": "total",
              "past_sequence_length + sequence_length": "past"}
    for vi in [*m.graph.input, *m.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = rename[d.dim_param]
    model = tmp_path / "renamed.onnx"
    onnx.save(m, str(model))
    compile_model(model, tmp_path / "out")
    axes = json.loads((tmp_path / "out" / "client" / "stip.json").read_text())["axes"]
    assert axes["attention_mask"] == ["batch", "total"] and axes["past_key_values.1.value"] == ["batch", 2, "past", 8]
    for past, seq in ((0, 4), (5, 2)):
        checks = verify(tmp_path / "out", model, batch=2, seq=seq, past=past, device="cpu")
        assert checks and all(c.ok for c in checks), checks
    assert list(StipGenerator(tmp_path / "out", device="cpu").generate(PROMPT, 12)) == \
        generate_plaintext(model, PROMPT, 12)


def test_over_http_with_stip_serve(bundle):
    """The remote client and stip serve with optimum's names: Llama generation, and a BERT classifier."""
    model, out = bundle("llama", "text-generation-with-past")
    with stip_server(out / "server") as url:
        gen = StipGenerator(out / "client", server=RemoteServer(url))
        assert list(gen.generate(PROMPT, 16)) == generate_plaintext(model, PROMPT, 16)
    model, out = bundle("bert", "text-classification")
    with stip_server(out / "server") as url:
        feeds = random_feeds(model, batch=2, seq=9)
        got = RemoteClient(out / "client", url).run(feeds)
        assert_equivalent(run_model(model, feeds), got)


def _cache_sequence_major(src, dst) -> None:
    """The same decoder with its KV cache laid out [batch, past, heads, head_dim]: a Transpose after each cache
    input and before each present output, so the cache grows along axis 1, not Hugging Face's axis 2."""
    m = onnx.load(str(src))
    g, front = m.graph, []

    def rename(old: str, new: str) -> None:
        for n in g.node:
            for field in (n.input, n.output):
                for k, x in enumerate(field):
                    if x == old:
                        field[k] = new

    def swap(vi) -> None:
        d = vi.type.tensor_type.shape.dim
        one, two = onnx.TensorShapeProto.Dimension(), onnx.TensorShapeProto.Dimension()
        one.CopyFrom(d[1])
        two.CopyFrom(d[2])
        d[1].CopyFrom(two)
        d[2].CopyFrom(one)

    for vi in g.input:
        if vi.name.startswith("past_key_values"):
            rename(vi.name, vi.name + "_bhsd")
            front.append(onnx.helper.make_node("Transpose", [vi.name], [vi.name + "_bhsd"], perm=[0, 2, 1, 3]))
            swap(vi)
    for vi in g.output:
        if vi.name.startswith("present"):
            rename(vi.name, vi.name + "_bhsd")
            g.node.append(onnx.helper.make_node("Transpose", [vi.name + "_bhsd"], [vi.name], perm=[0, 2, 1, 3]))
            swap(vi)
    for n in reversed(front):
        g.node.insert(0, n)
    onnx.save(m, str(dst))


def test_serve_reads_the_cache_axis_from_the_graph(bundle, tmp_path):
    """A cache that grows along axis 1: stip serve takes the past axis from how the graph's past and present dims
    differ (the role the compiler writes into the manifest), so the sequence's length, the mask check and the
    cache's memory are right; with axis 2 assumed it read the head count (2) as the cached length."""
    from stip.runtime.serve_model import Model

    src, _ = bundle("llama", "text-generation-with-past")
    model = tmp_path / "bshd.onnx"
    _cache_sequence_major(src, model)
    compile_model(model, tmp_path / "out")
    axes = json.loads((tmp_path / "out" / "client" / "stip.json").read_text())["axes"]
    assert axes["past_key_values.0.key"] == ["batch", "past", 2, 8]
    served = Model("m", tmp_path / "out" / "server", device="cpu")
    assert served.past_axis == 1 and served.mask_input == ("attention_mask", 1)
    assert served.cache_bytes(1, 10) == 4 * 10 * 2 * 8 * 4  # 4 caches of [1, 10, 2, 8] float32
    with stip_server(tmp_path / "out" / "server") as url:
        gen = StipGenerator(tmp_path / "out" / "client", server=RemoteServer(url))
        assert list(gen.generate(PROMPT, 12)) == generate_plaintext(model, PROMPT, 12)


def _one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_user_mistakes_give_one_line(bundle, tmp_path):
    model, out = bundle("bert", "text-classification")
    other, _ = bundle("gpt2", "text-generation-with-past")
    _one_line_error(stip("verify", out, "--original", other), "not the model", "pass the .onnx given")
    _one_line_error(stip("generate", out, "--prompt-ids", "1,2,3", "--device", "cpu"),
                    "generation feeds input_ids, attention_mask and position_ids")
    feeds = random_feeds(model, batch=2, seq=7)
    np.savez(tmp_path / "ok.npz", **feeds)
    r = stip("run", out, "--inputs", tmp_path / "ok.npz", "--device", "cpu")
    assert r.returncode == 0 and "logits: float32[2, 3]" in r.stdout, r.stdout + r.stderr
    bad = {
        "wrong-name": ({**{k: v for k, v in feeds.items() if k != "token_type_ids"},
                        "token_types": feeds["token_type_ids"]}, "unknown model input(s): token_types"),
        "missing": ({k: v for k, v in feeds.items() if k != "attention_mask"}, "missing model input(s)"),
        "rank": ({**feeds, "input_ids": feeds["input_ids"][0]}, "has rank 1"),
        "batch": ({**feeds, "attention_mask": feeds["attention_mask"][:1]}, "input 'attention_mask' dim 0 is 1"),
        "float-ids": ({**feeds, "input_ids": feeds["input_ids"].astype(np.float32)}, "dtype float32"),
    }
    for case, (f, words) in bad.items():
        np.savez(tmp_path / f"{case}.npz", **f)
        _one_line_error(stip("run", out, "--inputs", tmp_path / f"{case}.npz", "--device", "cpu"), words)
