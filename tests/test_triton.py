"""A real tritonserver (2.51, from the nvidia-pytriton wheel; see tests/triton_fixture.py) serving what
`stip export-triton` wrote: configs accepted by Triton (and a rejected one failing the start), encoders exact over
HTTP and gRPC (tritonclient and stip's RemoteClient), decoders generating the same tokens as local generation with
interleaved sequences and the sequence batcher's idle timeout, and a repository that holds nothing of the key."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import run_model
from triton_fixture import ensure_venv, triton, unsupported

from stip.compiler.pipeline import compile_model
from stip.compiler.triton import SEQUENCE_MODEL
from stip.runtime.bundle import Client, LocalDeployment, Server
from stip.runtime.errors import StipError
from stip.runtime.verify import random_feeds

pytestmark = pytest.mark.skipif(unsupported() is not None, reason=f"no real Triton here: {unsupported()}")

CLI = [sys.executable, "-m", "stip.compiler.cli"]
IDLE_S = 2
PROMPT = [5, 9, 17, 3, 44]
DECODERS = {"gpt2": "gpt2-cache", "llama": "llama-cache"}


def export(bundle: Path, repo: Path, *args: str) -> Path:
    r = subprocess.run([*CLI, "export-triton", str(bundle), "-o", str(repo), "--force", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return repo


@pytest.fixture(scope="module")
def bundles(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-bundles")
    out = {}
    for family in ("bert", "gpt2-cache", "llama-cache"):
        compile_model(zoo.get(family), root / family)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    """One tritonserver for the module, serving the exports as they are: the encoder ('bert', onnxruntime backend)
    and two decoders ('gpt2', 'llama', stip's model.py in the Python backend, idle sequences freed after 2 s)."""
    ensure_venv()
    repo = tmp_path_factory.mktemp("triton-repo") / "repo"
    export(bundles["bert"], repo, "--model-name", "bert")
    for family, name in (("gpt2-cache", "gpt2"), ("llama-cache", "llama")):
        export(bundles[family], repo, "--model-name", name, "--sequence-timeout", str(IDLE_S))
    with triton(repo) as t:
        yield t


def tensors(mod, feeds: dict[str, np.ndarray]) -> list:
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, value in feeds.items():
        i = mod.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        i.set_data_from_numpy(value)
        out.append(i)
    return out


def clients(t):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    return {"http": (th, th.InferenceServerClient(t.http_url[len("http://"):])),
            "grpc": (tg, tg.InferenceServerClient(t.grpc_url[len("grpc://"):]))}


def test_triton_loads_the_export_and_reports_its_config(server, bundles):
    for proto, (_, c) in clients(server).items():
        assert c.is_server_ready() and c.is_model_ready("bert"), proto
        cfg = c.get_model_config("bert", **({"as_json": True} if proto == "grpc" else {}))
        cfg = cfg.get("config", cfg)
        assert cfg["platform"] == "onnxruntime_onnx" and cfg["backend"] == "onnxruntime"
        assert int(cfg["max_batch_size"]) == 8 and "dynamic_batching" in cfg
        assert cfg["parameters"]["stip_key_id"]["string_value"] == Server(bundles["bert"] / "server").key_id


def test_rejected_config_fails_the_start(bundles, tmp_path):
    """--exit-on-error stays on: a repository Triton (or the backend) refuses is an error, not a skipped model."""
    repo = export(bundles["bert"], tmp_path / "repo")
    cfg = repo / "stip" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("TYPE_FP32", "TYPE_FP16", 1))
    with pytest.raises(RuntimeError, match="(?s)exited with code 1 before it was ready.*config type TYPE_FP16"):
        with triton(repo, timeout=60):
            pass
    cfg.write_text("name: \"stip\"\nplatform: \"onnxruntime_onnx\"\nmax_batch_size: 8\nno_such_field: 1\n")
    with pytest.raises(RuntimeError, match="(?s)exited with code 1.*failed to read text proto"):
        with triton(repo, timeout=60):
            pass


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_encoder_exact_through_tritonclient(server, zoo, bundles, proto):
    """pre here -> server graph on Triton (tritonclient) -> post here equals the original model in onnxruntime,
    and Triton's server output equals the in-process server graph's."""
    mod, c = clients(server)[proto]
    model, bundle = zoo.get("bert"), bundles["bert"]
    client, ref = Client(bundle / "client"), Server(bundle / "server", device="cpu")
    for batch, seq in ((1, 5), (3, 17), (8, 9)):
        feeds = random_feeds(model, batch=batch, seq=seq, seed=batch * 100 + seq)
        to_server, kept = client.prepare(feeds)
        r = c.infer("bert", tensors(mod, to_server))
        got = {n: r.as_numpy(n) for n in ref.output_names}
        want = ref.run(to_server)
        for n in want:
            np.testing.assert_allclose(got[n], want[n], atol=1e-6, rtol=1e-6, err_msg=n)
        final, original = client.finish(got, kept), run_model(model, feeds)
        for n in original:
            np.testing.assert_allclose(final[n], original[n], atol=1e-4, rtol=1e-4, err_msg=n)


def test_concurrent_requests_are_batched_and_stay_exact(server, zoo, bundles):
    """Eight users at once: Triton's dynamic batcher may merge them into one run; every user gets its own rows."""
    import tritonclient.http as th

    model, bundle = zoo.get("bert"), bundles["bert"]
    client, ref = Client(bundle / "client"), Server(bundle / "server", device="cpu")
    work = []
    for k in range(8):
        to_server, _ = client.prepare(random_feeds(model, batch=1 + k % 2, seq=11, seed=k))
        work.append((to_server, ref.run(to_server)))
    stats = clients(server)["http"][1].get_inference_statistics
    before = stats("bert")["model_stats"][0]

    def user(k: int) -> dict:
        c = th.InferenceServerClient(server.http_url[len("http://"):])
        r = c.infer("bert", tensors(th, work[k][0]))
        return {n: r.as_numpy(n) for n in ref.output_names}

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(user, range(8), timeout=120))
    for k, (_, want) in enumerate(work):
        for n in want:
            np.testing.assert_allclose(got[k][n], want[n], atol=1e-6, rtol=1e-6, err_msg=f"user {k} {n}")
    rows = sum(next(iter(w[0].values())).shape[0] for w in work)
    deadline = time.monotonic() + 10  # Triton counts a request when it is released, just after its response
    while True:
        after = stats("bert")["model_stats"][0]
        if int(after["inference_count"]) - int(before["inference_count"]) >= rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert int(after["inference_count"]) - int(before["inference_count"]) == rows  # each row run once
    runs = int(after["execution_count"]) - int(before["execution_count"])
    assert 1 <= runs <= 8
    print(f"8 concurrent requests ({rows} rows) ran in {runs} onnxruntime runs")


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_remote_client(server, zoo, bundles, proto):
    """stip's RemoteClient (pre here -> Triton -> post here) equals the original model and the in-process
    deployment, over HTTP and over gRPC."""
    from stip.runtime.remote import RemoteClient

    model, bundle = zoo.get("bert"), bundles["bert"]
    remote = RemoteClient(bundle / "client", getattr(server, f"{proto}_url"), model_name="bert")
    assert remote.server.grpc == (proto == "grpc")
    for batch, seq in ((2, 7), (5, 12)):
        feeds = random_feeds(model, batch=batch, seq=seq, seed=seq)
        got, want = remote.run(feeds), run_model(model, feeds)
        local = LocalDeployment(bundle, device="cpu").run(feeds)
        for n in want:
            np.testing.assert_allclose(got[n], want[n], atol=1e-4, rtol=1e-4, err_msg=n)
            np.testing.assert_allclose(got[n], local[n], atol=1e-6, rtol=1e-6, err_msg=n)


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_key_id_checked_at_connect(server, zoo, bundles, tmp_path, proto):
    """Triton's metadata has no parameters: the key id comes from the model config, over either transport."""
    from stip.runtime.remote import RemoteClient, RemoteServer

    url = getattr(server, f"{proto}_url")
    assert RemoteServer(url, "bert").key_id == Server(bundles["bert"] / "server").key_id
    other = tmp_path / "other"
    compile_model(zoo.get("bert"), other)
    with pytest.raises(StipError, match="key id .* does not match"):
        RemoteClient(other / "client", url, model_name="bert")
    with pytest.raises(StipError, match="cannot get model metadata"):
        RemoteClient(bundles["bert"] / "client", url, model_name="nope")


def test_cli_run_over_grpc(server, zoo, bundles, tmp_path):
    model, bundle = zoo.get("bert"), bundles["bert"]
    feeds = random_feeds(model, batch=2, seq=6, seed=11)
    np.savez(tmp_path / "in.npz", **feeds)
    r = subprocess.run([*CLI, "run", str(bundle / "client"), "--server", server.grpc_url, "--model-name", "bert",
                        "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = run_model(model, feeds)
    with np.load(tmp_path / "out.npz") as z:
        for n in want:
            np.testing.assert_allclose(z[n], want[n], atol=1e-4, rtol=1e-4, err_msg=n)
    r = subprocess.run([*CLI, "run", str(bundle / "client"), "--server", "grpc://", "--inputs",
                        str(tmp_path / "in.npz")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "expected grpc://HOST:PORT" in r.stderr and "Traceback" not in r.stderr


def _needles(bundle: Path) -> dict[str, bytes]:
    """Byte patterns of the secrets: every permutation of the key and its inverse (as int64/int32/int16/float32
    arrays), and every table of the client graphs (the permuted embeddings, position tables, post's weights)."""
    import onnx
    from onnx import numpy_helper

    from stip.compiler.keys import read_key

    out = {}
    _, perms = read_key(bundle / "developer" / "key.npz")
    for name, p in perms.items():
        flat = p.reshape(-1)
        if flat.size < 8:
            continue
        for kind, arr in (("", flat), ("inverse ", np.argsort(flat) if p.ndim == 1 else flat)):
            for dt in (np.int64, np.int32, np.int16, np.float32):
                out[f"{kind}permutation {name} as {np.dtype(dt).name}"] = arr.astype(dt).tobytes()
    for graph in ("pre.onnx", "post.onnx"):
        for t in onnx.load(str(bundle / "client" / graph)).graph.initializer:
            v = numpy_helper.to_array(t)
            if v.ndim >= 2 and v.size >= 64:
                out[f"{graph} table {t.name}"] = v.tobytes()
    return out


@pytest.mark.parametrize("family", ["bert", "gpt2-cache", "llama-cache"])
def test_repository_holds_no_key_material(bundles, tmp_path, family):
    """Keys never reach Triton: the exported repository is the server graph, its config (and, for decoders, stip's
    generic model.py), and no file in it holds a permutation of the key (or its inverse) or a client table."""
    bundle = bundles[family]
    repo = export(bundle, tmp_path / "repo")
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    server_files = sorted(p.name for p in (bundle / "server").iterdir())
    extra = ["stip/1/model.py"] if "cache" in family else []  # stip's generic model.py, the same for every bundle
    assert files == sorted(["stip/config.pbtxt", *[f"stip/1/{n}" for n in server_files], *extra]), files
    assert all((repo / f).read_bytes() == SEQUENCE_MODEL.read_bytes() for f in extra)
    blob = b"".join((repo / f).read_bytes() for f in files)
    needles = _needles(bundle)
    assert sum(k.startswith("permutation") for k in needles) >= 4 * 5 and any("table" in k for k in needles)
    # the search finds what is there: the key file holds the permutations, pre.onnx its tables
    key_blob = (bundle / "developer" / "key.npz").read_bytes() + (bundle / "client" / "pre.onnx").read_bytes()
    assert all(v in key_blob for k, v in needles.items()
               if (k.startswith("permutation") and k.endswith("int64")) or "pre.onnx" in k)
    found = [k for k, v in needles.items() if v in blob]
    assert not found, f"{family}: the Triton repository holds {found[:3]}"
    assert (bundle / "developer" / "key.npz").read_bytes() not in blob


# ---------------------------------------------------------------------------------------------------------------
# decoders: stip's model.py in Triton's Python backend keeps each sequence's permuted KV cache


@pytest.mark.parametrize("proto", ["http", "grpc"])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_generation_equals_local_with_interleaved_sequences(server, zoo, bundles, name, proto):
    """Greedy tokens through Triton equal the plaintext model's and in-process STIP generation's, for two
    sequences whose steps interleave on the server (each keeps its own cache under its correlation id)."""
    from stip.runtime.generate import StipGenerator, generate_plaintext
    from stip.runtime.remote import RemoteServer

    family = DECODERS[name]
    bundle, original = bundles[family], zoo.get(family)
    gen = StipGenerator(bundle / "client", server=RemoteServer(getattr(server, f"{proto}_url"), name))
    prompts = [PROMPT, [7, 1, 30]]
    a, b = gen.generate(prompts[0], 16), gen.generate(prompts[1], 16)
    got = [[], []]
    for x, y in zip(a, b):  # one request for sequence A, then one for sequence B, ...
        got[0].append(x)
        got[1].append(y)
    for p, tokens in zip(prompts, got):
        assert tokens == generate_plaintext(original, p, 16)
        assert tokens == list(StipGenerator(bundle, device="cpu").generate(p, 16))


def test_cli_generate_against_triton(server, zoo, bundles):
    from stip.runtime.generate import generate_plaintext

    want = generate_plaintext(zoo.get("gpt2-cache"), PROMPT, 8)
    for url in (server.http_url, server.grpc_url):
        r = subprocess.run([*CLI, "generate", str(bundles["gpt2-cache"] / "client"), "--server", url,
                            "--model-name", "gpt2", "--prompt-ids", ",".join(map(str, PROMPT)),
                            "--max-new-tokens", "8"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert [int(x) for x in r.stdout.split()] == want, url


def test_idle_sequence_is_refused_and_freed(server, zoo, bundles):
    """A sequence idle past --sequence-timeout: Triton refuses its next step, model.py frees its cache, and the
    server goes on serving new sequences exactly."""
    from stip.runtime.generate import StipGenerator, generate_plaintext
    from stip.runtime.remote import RemoteServer

    bundle = bundles["llama-cache"]
    remote = RemoteServer(server.grpc_url, "llama")
    client = Client(bundle / "client")
    seq = remote.sequence(steps=None)
    feeds = {"input_ids": np.array([PROMPT], np.int64), "attention_mask": np.ones((1, 5), np.int64),
             "position_ids": np.arange(5, dtype=np.int64)[None]}
    to_server, _ = client.prepare({k: v for k, v in feeds.items() if k in client.input_names})
    seq.run(to_server)  # the prefill: model.py now holds this sequence's cache
    time.sleep(IDLE_S + 1.5)
    step = {"input_ids": np.array([[3]], np.int64), "attention_mask": np.ones((1, 6), np.int64),
            "position_ids": np.array([[5]], np.int64)}
    to_server, _ = client.prepare({k: v for k, v in step.items() if k in client.input_names}, 5)
    with pytest.raises(StipError, match="must specify the START flag"):
        seq.run(to_server)
    gen = StipGenerator(bundle / "client", server=remote)
    assert list(gen.generate(PROMPT, 6)) == generate_plaintext(zoo.get("llama-cache"), PROMPT, 6)
    assert "freed the KV cache of 1 idle sequence(s)" in server.log.read_text()


# ---------------------------------------------------------------------------------------------------------------
# the repository itself, parsed with Triton's own model_config.proto


def test_export_triton_repository(bundles, tmp_path):
    import importlib.util

    import tritonclient
    from google.protobuf import text_format

    spec = importlib.util.spec_from_file_location(
        "triton_model_config_pb2", Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py")
    pb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb)
    refs = {name: Server(bundles[family] / "server", device="cpu") for name, family in
            (("bert", "bert"), ("gpt2", "gpt2-cache"), ("llama", "llama-cache"))}
    repo = tmp_path / "repo"

    def run(*args):
        return subprocess.run([*CLI, "export-triton", *map(str, args)], capture_output=True, text=True, timeout=120)

    r = run(bundles["llama-cache"], "-o", repo, "--model-name", "llama", "--sequence-timeout", "30")
    assert r.returncode == 0, r.stderr
    assert "tritonserver --model-repository" in r.stdout
    cfg = text_format.Parse((repo / "llama" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert cfg.name == "llama" and cfg.backend == "python" and not cfg.platform and cfg.max_batch_size == 0
    assert [i.name for i in cfg.input] == [n for n in refs["llama"].input_names if not n.startswith("past")]
    assert [o.name for o in cfg.output] == ["logits.stip_server"]
    assert cfg.input[0].data_type == pb.TYPE_FP32 and list(cfg.input[0].dims) == [-1, -1, 32]
    assert cfg.parameters["stip_key_id"].string_value == refs["llama"].key_id
    assert json.loads(cfg.parameters["stip_cache"].string_value) == [
        [f"past_key_values.{i}.{kv}", f"present.{i}.{kv}"] for i in range(2) for kv in ("key", "value")]
    sb = cfg.sequence_batching
    assert sb.HasField("oldest") and not sb.state and sb.max_sequence_idle_microseconds == 30_000_000
    assert not cfg.HasField("dynamic_batching") and [g.count for g in cfg.instance_group] == [1]
    assert (repo / "llama" / "1" / "model.onnx").read_bytes() == (bundles["llama-cache"] / "server" /
                                                                   "model.onnx").read_bytes()
    assert (repo / "llama" / "1" / "model.py").read_bytes() == SEQUENCE_MODEL.read_bytes()
    # a non-empty repository is refused without --force, and nothing is changed
    r = run(bundles["bert"], "-o", repo, "--model-name", "bert")
    assert r.returncode == 2 and "--force" in r.stderr and not (repo / "bert").exists()
    r = run(bundles["bert"], "-o", repo, "--model-name", "bert", "--force", "--max-batch-size", "16")
    assert r.returncode == 0, r.stderr
    cfg = text_format.Parse((repo / "bert" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16 and cfg.HasField("dynamic_batching")
    assert not cfg.HasField("sequence_batching") and "stip_cache" not in cfg.parameters
    assert [list(o.dims) for o in cfg.output] == [[-1, 32], [32]]
    assert sorted(p.name for p in repo.iterdir()) == ["bert", "llama"]  # no temporary left behind
    assert sorted(p.name for p in (repo / "bert" / "1").iterdir()) == ["model.onnx"]
    # gpt2's server graph takes [2]-shaped inputs without a batch dim: its own shapes, one sequence per request
    r = run(bundles["gpt2-cache"] / "server", "-o", tmp_path / "g")
    assert r.returncode == 0, r.stderr
    cfg = text_format.Parse((tmp_path / "g" / "stip" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert cfg.max_batch_size == 0 and [list(i.dims) for i in cfg.input][:2] == [[2], [2]]
    for bad, why in ((("--max-batch-size", "4"), "one sequence per request"), (("--sequence-timeout", "0"), "> 0"),
                     (("--max-sequences", "0"), ">= 1")):
        r = run(bundles["gpt2-cache"], "-o", tmp_path / "g2", *bad)
        assert r.returncode == 2 and why in r.stderr and not (tmp_path / "g2").exists(), r.stderr
