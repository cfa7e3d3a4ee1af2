"""Several files, one key: seq2seq models (T5, BART) exported by optimum as encoder_model.onnx +
decoder_model.onnx + decoder_with_past_model.onnx compile into one bundle. Greedy generation through the bundle
equals the original files' in onnxruntime, the encoder output and both caches never reach the client, the
decoders' shared weights reach the server under one permutation, and one key id marks every graph."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from stip.compiler.keys import read_key
from stip.compiler.multifile import compile_files
from stip.passes.errors import StipError
from stip.passes.multifile import discover, merged_supported
from stip.runtime.bundle_format import KEY_ID_PROP, Layout, Manifest
from stip.runtime.generate import Sampler
from stip.runtime.multifile import MultiGenerator, generate_original, verify_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import export_multifile  # noqa: E402
from export_optimum import ExportError  # noqa: E402

pytestmark = pytest.mark.optimum
HELD = ("last_hidden_state", "encoder_hidden_states", "present.", "past_key_values.")
PAIR = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


def pair(src: Path) -> list[Path]:
    """The export's separate files (a directory would give the merged decoder instead, when stip has that pass)."""
    return [src / n for n in PAIR if (src / n).exists()]


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    """case -> (export dir, bundle dir), compiled once per module (with the self-check)."""
    made: dict[str, tuple[Path, Path]] = {}
    root = tmp_path_factory.mktemp("multifile")

    def get(case: str) -> tuple[Path, Path]:
        if case not in made:
            try:
                src = export_multifile.cached_export(case)
            except ExportError as e:
                pytest.fail(f"optimum export of {case} failed: {e}", pytrace=False)
            out = root / case
            compile_files(pair(src), out)
            made[case] = (src, out)
        return made[case]

    return get


@pytest.mark.parametrize("case", ["t5", "bart"])
def test_greedy_generation_equals_the_original_files(seq2seq, case):
    src, out = seq2seq(case)
    gen = MultiGenerator(out, device="cpu")
    assert gen.kind == "seq2seq" and gen.start_id is not None  # from the config.json beside the files
    gen.eos_id = None  # a random model may emit eos at once; compare a fixed number of tokens
    prompt = [5, 17, 42, 8, 99, 3]
    got = list(gen.generate(prompt, 10, Sampler()))
    man = Manifest.read(Layout(out).manifest)
    want = generate_original(discover(pair(src)), man["links"], "seq2seq", prompt, 10, Sampler(), gen.start_id,
                             None)
    assert len(got) == 10 and got == want
    gen.eos_id = got[0]  # eos stops generation after it is emitted
    assert list(gen.generate(prompt, 10, Sampler())) == [got[0]]
    gen.eos_id = None
    if case == "bart":  # learned position tables of 64 rows (T5's relative positions have no limit)
        with pytest.raises(StipError, match="75 tokens exceed the 64-token context of the model's encoder"):
            list(gen.generate(list(range(5, 80)), 4, Sampler()))
    sampled = list(gen.generate(prompt, 8, Sampler(temperature=1.0, seed=3)))
    assert sampled == generate_original(discover(pair(src)), man["links"], "seq2seq", prompt, 8,
                                        Sampler(temperature=1.0, seed=3), gen.start_id, None)


@pytest.mark.parametrize("case", ["t5", "bart"])
def test_verify_passes_on_every_call(seq2seq, case):
    src, out = seq2seq(case)
    checks = verify_files(out, discover(pair(src)), batch=3, seq=7, steps=4, device="cpu")
    assert [c.name for c in checks] == ["decoder#0:logits"] + [f"decoder_with_past#{k}:logits" for k in range(1, 5)]
    assert all(c.ok for c in checks), [(c.name, c.max_abs) for c in checks]
    assert max(c.max_abs for c in checks) < 1e-4


def _graphs(d: Path) -> list[Path]:
    return sorted(d.rglob("*.onnx"))


@pytest.mark.parametrize("case", ["t5", "bart"])
def test_held_tensors_never_reach_the_client_and_one_key_marks_every_graph(seq2seq, case):
    _, out = seq2seq(case)
    lay = Layout(out)
    for f in _graphs(lay.client_dir):
        m = onnx.load(str(f))
        names = [v.name for v in list(m.graph.input) + list(m.graph.output)]
        assert not [n for n in names if n.startswith(HELD)], (f, names)
    key_id, perms = read_key(lay.key)
    graphs = _graphs(lay.client_dir) + _graphs(lay.server_dir)
    assert len(graphs) == 8  # 3 pre, 2 post (the encoder has none), 3 server
    for f in graphs:
        props = {p.key: p.value for p in onnx.load(str(f), load_external_data=False).metadata_props}
        assert props[KEY_ID_PROP] == key_id, f
    # the server holds graphs only, and no integer tensor that is a permutation from the key
    assert {f.name for f in lay.server_dir.rglob("*") if f.is_file()} == {"model.onnx"}
    key_bytes = {np.asarray(p).astype(np.int64).tobytes() for p in perms.values()}
    for f in _graphs(lay.server_dir):
        for t in onnx.load(str(f)).graph.initializer:
            arr = onnx.numpy_helper.to_array(t)
            if arr.dtype.kind in "iu" and arr.size > 2:
                assert arr.astype(np.int64).tobytes() not in key_bytes, (f, t.name)
    assert all(k.split("/")[0] in ("encoder", "decoder", "decoder_with_past") for k in perms)


def _weights(path: Path) -> set[str]:
    m = onnx.load(str(path))
    return {hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()).hexdigest() for t in m.graph.initializer
            if len(t.dims) >= 2 and t.data_type == onnx.TensorProto.FLOAT}


@pytest.mark.parametrize("case", ["t5", "bart"])
def test_shared_weights_reach_the_server_under_one_permutation(seq2seq, case):
    src, out = seq2seq(case)
    srv = Layout(out).server_dir
    dec, past = _weights(srv / "decoder" / "model.onnx"), _weights(srv / "decoder_with_past" / "model.onnx")
    assert len(past) > 10 and past <= dec  # every with-past weight is byte-identical to one the decoder holds
    original = _weights(src / "decoder_with_past_model.onnx")
    assert len(past & original) <= 1  # ...and permuted (a weight whose every axis is unpermuted may stay)


def test_cli_compile_generate_verify(tmp_path):
    src = export_multifile.cached_export("t5")
    stip = [sys.executable, "-m", "stip.compiler.cli"]
    out = tmp_path / "b"
    r = subprocess.run([*stip, "compile", str(src), "-o", str(out), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "3 files" in r.stdout and "checked:" in r.stdout
    r = subprocess.run([*stip, "generate", str(out), "--prompt-ids", "5,6,7", "--max-new-tokens", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 1 <= len(r.stdout.split()) <= 8 and all(t.isdigit() for t in r.stdout.split())
    r = subprocess.run([*stip, "verify", str(out), "--original", str(src)], capture_output=True, text=True)
    assert r.returncode == 0 and "PASS: original files" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*stip, "generate", str(out), "--prompt-ids", "5", "--server", "http://127.0.0.1:1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "stip.encoder" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*stip, "export-triton", str(out), "-o", str(tmp_path / "t")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "a bundle of several files" in r.stderr and "Traceback" not in r.stderr


def test_inspect_an_export_directory_as_compile_takes_it():
    """`stip inspect DIR` on optimum's export: each file analysed with the tensors between files held on the server
    (standalone, the decoder's encoder_hidden_states would look like a private input and block the cross-attention)."""
    src = export_multifile.cached_export("t5")
    stip = [sys.executable, "-m", "stip.compiler.cli"]
    r = subprocess.run([*stip, "inspect", str(src), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report["files"]) >= {"encoder", "decoder", "decoder_with_past"}
    assert all(f["compiles"] for f in report["files"].values())
    assert ["encoder", "last_hidden_state", "decoder", "encoder_hidden_states"] in report["links"]
    r = subprocess.run([*stip, "inspect", str(src)], capture_output=True, text=True)
    assert r.returncode == 0 and "== encoder:" in r.stdout and "server-held tensors between files" in r.stdout


def test_ambiguous_inputs_are_refused_precisely(tmp_path):
    src = export_multifile.cached_export("t5")
    only_merged = tmp_path / "merged"
    only_merged.mkdir()
    for name in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        shutil.copy(src / name, only_merged / name)
    if merged_supported():  # both decoder roles are branches of the merged file
        assert discover([only_merged])["decoder_with_past"].name == "decoder_model_merged.onnx"
    else:
        with pytest.raises(StipError, match="merged decoder .* not supported yet .*--no-post-process"):
            discover([only_merged])
    odd = tmp_path / "odd"
    odd.mkdir()
    for name in ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"):
        shutil.copy(src / name, odd / name)
    shutil.copy(src / "decoder_model.onnx", odd / "model.onnx")
    with pytest.raises(StipError, match="model.onnx: not a file name optimum writes"):
        discover([odd])
    (odd / "model.onnx").unlink()
    (odd / "decoder_with_past_model.onnx").unlink()
    with pytest.raises(StipError, match="no decoder_with_past_model.onnx"):
        discover([odd])
    with pytest.raises(StipError, match="given twice"):
        discover([odd, odd / "encoder_model.onnx"])
    with pytest.raises(StipError, match="reads 'encoder_hidden_states': pass encoder_model.onnx"):
        compile_files([src / "decoder_model.onnx", src / "decoder_with_past_model.onnx"], tmp_path / "x")


def test_legacy_decoder_pair(tmp_path):
    """optimum 1.27 --legacy GPT-2: decoder_model.onnx (prefill, writes present.*) + decoder_with_past_model.onnx,
    compiled from the directory (the merged file beside them is left out): the prefill's presents feed the
    with-past graph on the server, and greedy generation equals the original pair's."""
    legacy = pytest.importorskip("export_optimum_legacy", reason="needs examples/export_optimum_legacy.py "
                                 "(the `merged` branch)")
    try:
        src = legacy.cached_export("gpt2")
    except ExportError as e:
        pytest.fail(f"optimum 1.27 --legacy export failed: {e}", pytrace=False)
    out = tmp_path / "b"
    report = compile_files(pair(src), out)
    assert set(report["files"]) == {"decoder", "decoder_with_past"}
    assert all(lk[2] == "decoder_with_past" and lk[1].startswith("present.") for lk in report["links"])
    gen = MultiGenerator(out, device="cpu")
    gen.eos_id = None
    prompt = [5, 17, 42, 8]
    got = list(gen.generate(prompt, 10, Sampler()))
    assert got == generate_original(discover(pair(src)), report["links"], "decoder", prompt, 10, Sampler())
    assert len(got) == 10
    checks = verify_files(out, discover(pair(src)), batch=2, seq=6, steps=3, device="cpu")
    assert all(c.ok for c in checks) and len(checks) == 4
    for f in _graphs(Layout(out).client_dir):
        m = onnx.load(str(f))
        assert not [v.name for v in list(m.graph.input) + list(m.graph.output) if v.name.startswith(HELD)]
    dec = _weights(Layout(out).server_dir / "decoder" / "model.onnx")
    assert _weights(Layout(out).server_dir / "decoder_with_past" / "model.onnx") <= dec


@pytest.mark.parametrize("case", ["t5", "bart"])
def test_merged_seq2seq_decoder_generates_like_the_pair(seq2seq, tmp_path, case):
    """decoder_model_merged.onnx alone (with the encoder): its two If branches become the decoder and
    decoder_with_past roles (stip.passes.merged.branch_model), with one key. Greedy generation through that bundle
    equals the original *pair* files' (decoder_model.onnx + decoder_with_past_model.onnx, written by the same
    export), a reference independent of the branch extraction."""
    pytest.importorskip("stip.passes.merged", reason="needs passes/merged.py (the `merged` branch)")
    src, _ = seq2seq(case)
    only = tmp_path / "src"
    only.mkdir()
    for name in ("encoder_model.onnx", "decoder_model_merged.onnx", "config.json"):
        shutil.copy(src / name, only / name)
    out = tmp_path / "b"
    report = compile_files([only], out)
    assert set(report["files"]) == {"encoder", "decoder", "decoder_with_past"}
    gen = MultiGenerator(out, device="cpu")
    gen.eos_id = None
    prompt = [5, 17, 42, 8, 99, 3]
    got = list(gen.generate(prompt, 10, Sampler()))
    want = generate_original(discover(pair(src)), report["links"], "seq2seq", prompt, 10, Sampler(), gen.start_id, None)
    assert len(got) == 10 and got == want
    srv = Layout(out).server_dir
    assert _weights(srv / "decoder_with_past" / "model.onnx") <= _weights(srv / "decoder" / "model.onnx")


def test_merged_legacy_decoder_generates_like_the_pair(tmp_path):
    """optimum 1.27 --legacy GPT-2 directory as given (merged file and pair): the merged decoder is preferred, its
    branches compiled with one key; greedy generation equals the original pair's."""
    pytest.importorskip("stip.passes.merged", reason="needs passes/merged.py (the `merged` branch)")
    legacy = pytest.importorskip("export_optimum_legacy", reason="needs examples/export_optimum_legacy.py")
    src = legacy.cached_export("gpt2")
    out = tmp_path / "b"
    report = compile_files([src], out)
    man = Manifest.read(Layout(out).client_dir / "decoder_with_past" / "stip.json")
    assert man["source"] == "decoder_model_merged.onnx" and man["branch"] == "with_past"
    gen = MultiGenerator(out, device="cpu")
    gen.eos_id = None
    prompt = [5, 17, 42, 8]
    got = list(gen.generate(prompt, 10, Sampler()))
    assert len(got) == 10
    assert got == generate_original(discover(pair(src)), report["links"], "decoder", prompt, 10, Sampler())


def test_text_prompt_with_the_tokenizer_beside_the_files(tmp_path):
    """--tokenizer pointing at optimum's output directory ships the tokenizer files only, never the .onnx files;
    --prompt then encodes on the client and generation matches the originals fed the same ids."""
    src = export_multifile.cached_export("t5")
    out = tmp_path / "b"
    compile_files(pair(src), out, tokenizer=src, check=False)
    shipped = sorted(f.name for f in (Layout(out).client_dir / "tokenizer").iterdir())
    assert "tokenizer.json" in shipped and not [n for n in shipped if n.endswith((".onnx", ".data", ".log"))]
    gen = MultiGenerator(out, device="cpu")
    gen.eos_id = None
    prompt = gen.encode("hello world")
    assert prompt and all(0 <= t < gen.vocab for t in prompt)
    got = list(gen.generate(prompt, 8, Sampler()))
    man = Manifest.read(Layout(out).manifest)
    assert got == generate_original(discover(pair(src)), man["links"], "seq2seq", prompt, 8, Sampler(),
                                    gen.start_id, None)
    with pytest.raises(StipError, match="no tokenizer files"):
        compile_files(pair(src), tmp_path / "c", tokenizer=tmp_path, check=False)


@pytest.mark.parametrize("case", ["bart"])
def test_serve_hosts_a_multi_file_bundle(seq2seq, tmp_path, case):
    """`stip serve BUNDLE`: one model per file (stip.encoder, stip.decoder, stip.decoder_with_past) sharing one
    sequence store; `stip generate --server` encodes and decodes remotely (HTTP and gRPC), the encoder output and
    both caches held by the server under one sequence id. Same tokens as in process; sequences must start with the
    encoder."""
    import httpx
    from serve_helpers import BIG, ServerProcess, json_request

    from stip.runtime.multifile import RemoteChain

    src, out = seq2seq(case)
    srv = ServerProcess([str(out)], tmp_path / "serve.log", grpc=True)
    try:
        meta = httpx.get(srv.url + "/v2/models/stip.decoder").json()
        assert not [t["name"] for t in meta["inputs"] + meta["outputs"] if t["name"].startswith(HELD)]
        prompt = [5, 17, 42, 8, 99, 3]
        local = MultiGenerator(out, device="cpu")
        local.eos_id = None
        remote = MultiGenerator(out, device="cpu", server=RemoteChain(srv.url, "stip", local.dep.roles))
        remote.eos_id = None
        got = list(remote.generate(prompt, 9, Sampler()))
        assert len(got) == 9 and got == list(local.generate(prompt, 9, Sampler()))
        over_grpc = MultiGenerator(out, device="cpu", server=RemoteChain(srv.grpc_url, "stip", local.dep.roles))
        over_grpc.eos_id = None
        assert list(over_grpc.generate(prompt, 9, Sampler())) == got
        ids = np.array([[local.start_id]], dtype=np.int64)
        to_server, _ = local.dep.clients["decoder"].prepare({"input_ids": ids, "encoder_attention_mask":
                                                             np.ones((1, 6), np.int64)})
        r = httpx.post(srv.url + "/v2/models/stip.decoder/infer",
                       json=json_request(to_server, sequence_id=BIG + 7, sequence_start=True))
        assert r.status_code == 400 and "starts with model 'stip.encoder'" in r.text
        r = httpx.post(srv.url + "/v2/models/stip.decoder/infer", json=json_request(to_server))
        assert r.status_code == 400 and "belongs to a sequence" in r.text
        r = httpx.post(srv.url + "/v2/models/stip.decoder/infer", json=json_request(to_server, sequence_id=BIG + 8))
        assert r.status_code == 400 and "unknown sequence id" in r.text
        assert srv.alive()
    finally:
        srv.stop()


def test_link_and_start_token_refusals(seq2seq):
    """A linked tensor whose layout differs between the files is refused naming both; a seq2seq bundle without a
    decoder start token asks for --decoder-start-id."""
    from stip.passes.multifile import Link, find_links, load_role, unify
    from stip.passes.solve import solve

    src, out = seq2seq("t5")
    graphs = {r: load_role(r, p) for r, p in discover(pair(src)).items()}
    links = find_links(graphs)
    sols = {r: solve(g) for r, g in graphs.items()}
    bad = links + [Link("encoder", "last_hidden_state", "decoder", "encoder_attention_mask")]
    with pytest.raises(StipError, match="input 'encoder_attention_mask' has shape .* but encoder_model.onnx writes "
                                        "'last_hidden_state'"):
        unify(graphs, sols, bad)
    gen = MultiGenerator(out, device="cpu")
    gen.start_id = None
    with pytest.raises(StipError, match="--decoder-start-id"):
        list(gen.generate([5, 6], 3, Sampler()))


def test_sharded_external_data(tmp_path):
    """--external-data always --shard-size: each file's server weights stream into shards beside its graph; the
    bundle still generates like the originals and verifies."""
    src = export_multifile.cached_export("t5")
    out = tmp_path / "b"
    compile_files(pair(src), out, external_data="always", shard_size=16 << 10)
    for role in ("encoder", "decoder", "decoder_with_past"):
        names = sorted(f.name for f in (Layout(out).server_dir / role).iterdir())
        assert "model.onnx" in names and len([n for n in names if n.endswith(".onnx.data")]) >= 3, names
    gen = MultiGenerator(out, device="cpu")
    gen.eos_id = None
    man = Manifest.read(Layout(out).manifest)
    prompt = [5, 17, 42, 8]
    assert list(gen.generate(prompt, 8, Sampler())) == generate_original(
        discover(pair(src)), man["links"], "seq2seq", prompt, 8, Sampler(), gen.start_id, None)
    assert all(c.ok for c in verify_files(out, discover(pair(src)), device="cpu"))


def test_directory_with_one_model_is_a_one_file_compile(tmp_path):
    from stip.compiler.multifile import is_multifile, single_file

    d = tmp_path / "export"
    d.mkdir()
    src = export_multifile.cached_export("t5")
    shutil.copy(src / "encoder_model.onnx", d / "model.onnx")
    assert single_file([d]) == d / "model.onnx" and not is_multifile([d])
    assert is_multifile([src]) and is_multifile([d / "model.onnx", src / "decoder_model.onnx"])
    assert not is_multifile([d / "model.onnx"])
