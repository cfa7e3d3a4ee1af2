"""A real tritonserver (2.51, from the nvidia-pytriton wheel; see tests/triton_fixture.py) serving what
`stip export-triton` wrote: config accepted by Triton, exact results over HTTP and gRPC (tritonclient and stip's
RemoteClient), and a repository that holds nothing of the key."""

from __future__ import annotations

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
from stip.runtime.bundle import Client, LocalDeployment, Server
from stip.runtime.errors import StipError
from stip.runtime.verify import random_feeds

pytestmark = pytest.mark.skipif(unsupported() is not None, reason=f"no real Triton here: {unsupported()}")

CLI = [sys.executable, "-m", "stip.compiler.cli"]


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
    """One tritonserver for the module, serving the encoder as exported (model 'bert')."""
    ensure_venv()
    repo = tmp_path_factory.mktemp("triton-repo") / "repo"
    export(bundles["bert"], repo, "--model-name", "bert")
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
    """Keys never reach Triton: the exported repository is the server graph and its config, and no file in it
    holds a permutation of the key (or its inverse) or a client table, byte for byte."""
    bundle = bundles[family]
    repo = export(bundle, tmp_path / "repo")
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    server_files = sorted(p.name for p in (bundle / "server").iterdir())
    assert files == sorted(["stip/config.pbtxt", *[f"stip/1/{n}" for n in server_files]]), files
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
