"""`stip serve` over gRPC (KServe v2 GRPCInferenceService, as Triton's), against real server processes: encoders
and generation equal in-process and plaintext through tritonclient.grpc and RemoteClient/RemoteServer with a
grpc:// URL; bearer tokens from metadata, sequence isolation between clients, a table of bad requests each answered
with a precise non-INTERNAL status while the server stays correct; RemoteSequence.close() frees the sequence at
once; TLS (grpcs://) with the same certificate as HTTPS."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from helpers import run_model
from serve_helpers import ServerProcess, decoder_steps
from test_serve_security import TOKENS, _self_signed, write_tokens
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from stip.compiler.pipeline import compile_model
from stip.runtime.bundle import Client, LocalDeployment, Server
from stip.runtime.generate import StipGenerator, generate_plaintext
from stip.runtime.remote import RemoteClient, RemoteServer
from stip.runtime.verify import random_feeds

PROMPT = [5, 9, 17, 3, 44]
DECODERS = {"gpt2": "gpt2-cache", "llama": "llama-cache"}
LIMIT_BYTES = 1 << 20
LOGITS = "logits.stip_server"


def md(name: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[name]}")] if name else []


@pytest.fixture(scope="module")
def bundles(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-bundles")
    out = {"bert": root / "bert"}
    compile_model(zoo.get("bert"), out["bert"])
    for name, family in DECODERS.items():
        out[name] = root / name
        compile_model(zoo.get(family), out[name], max_context=64)
    return out


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("grpc-auth") / "tokens"
    write_tokens(tokens, ["alice", "bob"])
    srv = ServerProcess([f"bert={bundles['bert']}", f"gpt2={bundles['gpt2']}", f"llama={bundles['llama']}",
                         "--device", "cpu", "--auth-tokens", str(tokens), "--max-request-bytes", str(LIMIT_BYTES),
                         "--max-batch", "8", "--max-seq", "48", "--sequence-timeout", "600"],
                        tmp_path_factory.mktemp("logs") / "grpc.log", grpc=True)
    assert srv.grpc_url.startswith("grpc://127.0.0.1:")
    yield srv
    srv.stop()


def hostport(srv) -> str:
    return srv.grpc_url.split("://", 1)[1]


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(hostport(server)) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def live_sequences(srv, model: str) -> float:
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {TOKENS['alice']}"}).text
    return float(next(ln.split()[-1] for ln in text.splitlines()
                      if ln.startswith(f'stip_live_sequences{{model="{model}"}}')))


def tensors(feeds: dict) -> list:
    out = []
    for n, a in feeds.items():
        t = tg.InferInput(n, list(a.shape), {np.float32: "FP32", np.int64: "INT64"}[a.dtype.type])
        t.set_data_from_numpy(a)
        out.append(t)
    return out


def test_health_metadata_and_config(server, bundles):
    c = tg.InferenceServerClient(hostport(server))
    assert c.is_server_live() and c.is_server_ready()  # open, as over HTTP (load balancers)
    h = {"authorization": f"Bearer {TOKENS['alice']}"}
    assert c.is_model_ready("bert", headers=h)
    meta = c.get_model_metadata("gpt2", headers=h, as_json=True)
    http_meta = httpx.get(server.url + "/v2/models/gpt2", headers=h).json()
    assert [i["name"] for i in meta["inputs"]] == [i["name"] for i in http_meta["inputs"]]
    assert not any("past_key_values" in i["name"] for i in meta["inputs"])
    cfg = c.get_model_config("gpt2", headers=h, as_json=True)["config"]
    assert cfg["parameters"]["stip_key_id"]["string_value"] == http_meta["parameters"]["stip_key_id"]
    assert c.get_server_metadata(headers=h, as_json=True)["name"] == "stip"


def test_encoder_equal_in_process_and_plaintext(server, zoo, bundles):
    model, bundle = zoo.get("bert"), bundles["bert"]
    client, ref = Client(bundle / "client"), Server(bundle / "server", device="cpu")
    c = tg.InferenceServerClient(hostport(server))
    h = {"authorization": f"Bearer {TOKENS['bob']}"}
    for batch, seq in ((1, 5), (3, 17)):
        feeds = random_feeds(model, batch=batch, seq=seq, seed=batch * 10 + seq)
        to_server, kept = client.prepare(feeds)
        r = c.infer("bert", tensors(to_server), headers=h, request_id="r1")
        assert r.get_response().id == "r1"
        want = ref.run(to_server)
        for n in want:
            np.testing.assert_array_equal(r.as_numpy(n), want[n])
    remote = RemoteClient(bundle / "client", server.grpc_url, model_name="bert", token=TOKENS["alice"])
    assert remote.server.grpc
    feeds = random_feeds(model, batch=2, seq=7, seed=7)
    got, local, original = remote.run(feeds), LocalDeployment(bundle, device="cpu").run(feeds), run_model(model,
                                                                                                          feeds)
    for n in original:
        np.testing.assert_array_equal(got[n], local[n])
        np.testing.assert_allclose(got[n], original[n], atol=1e-4, rtol=1e-4, err_msg=n)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_generation_equals_local_and_plaintext(server, zoo, bundles, name):
    """Two interleaved sequences over grpc:// equal plaintext and in-process STIP generation token for token."""
    gen = StipGenerator(bundles[name] / "client", server=RemoteServer(server.grpc_url, name, token=TOKENS["bob"]))
    prompts = [PROMPT, [7, 1, 30]]
    got = [[], []]
    for x, y in zip(gen.generate(prompts[0], 12), gen.generate(prompts[1], 12)):
        got[0].append(x)
        got[1].append(y)
    for p, tokens in zip(prompts, got):
        assert tokens == generate_plaintext(zoo.get(DECODERS[name]), p, 12)
        assert tokens == list(StipGenerator(bundles[name], device="cpu").generate(p, 12))
    assert live_sequences(server, name) == 0


def _step(stub, who, feeds, sid, **flags):
    req = pb.ModelInferRequest(model_name="gpt2")
    req.parameters["sequence_id"].int64_param = sid
    for f, v in flags.items():
        req.parameters[f].bool_param = v
    for n, a in feeds.items():
        req.inputs.add(name=n, datatype="FP32" if a.dtype == np.float32 else "INT64", shape=list(a.shape))
        req.raw_input_contents.append(np.ascontiguousarray(a).tobytes())
    try:
        r = stub.ModelInfer(req, metadata=md(who), timeout=30)
        if not r.outputs:
            return "OK", None
        i = [o.name for o in r.outputs].index(LOGITS)
        return "OK", np.frombuffer(r.raw_output_contents[i], np.float32).reshape(r.outputs[i].shape)
    except grpc.RpcError as e:
        return e.code().name, e.details()


def test_auth_and_isolation(server, bundles, stub):
    """No or a wrong token: UNAUTHENTICATED. Bob gets identical answers for Alice's live id and a never-used one,
    cannot end or replace Alice's sequence; Alice's generation stays bit-exact."""
    steps, _ = decoder_steps(bundles["gpt2"], [5, 9, 17, 3], 5)
    for who in (None, "carol"):
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="gpt2"), metadata=md(who) if who != "carol" else
                               [("authorization", "Bearer carol-token-0123456789")])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(pb.ModelInferRequest(model_name="bert"), metadata=[("authorization", "Basic x")])
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    code, out = _step(stub, "alice", steps[0][0], 1, sequence_start=True)
    assert code == "OK"
    np.testing.assert_array_equal(out, steps[0][1][LOGITS])
    probes = [[_step(stub, "bob", steps[1][0], sid), _step(stub, "bob", steps[1][0], sid, sequence_end=True),
               _step(stub, "bob", {}, sid, sequence_end=True)] for sid in (1, 2)]
    assert [p if p[0] != "OK" else (p[0], None if p[1] is None else p[1].shape) for p in probes[0]] == \
        [p if p[0] != "OK" else (p[0], None if p[1] is None else p[1].shape) for p in probes[1]]
    assert probes[0][2] == ("OK", None)  # bob "ends" id 1: answered like any id; alice's sequence is untouched
    assert probes[0][0] == ("INVALID_ARGUMENT", probes[0][0][1]) and "unknown sequence id" in probes[0][0][1]
    code, out = _step(stub, "bob", steps[0][0], 1, sequence_start=True)  # bob's own sequence 1
    np.testing.assert_array_equal(out, steps[0][1][LOGITS])
    for k in range(1, len(steps)):
        code, out = _step(stub, "alice", steps[k][0], 1, sequence_end=k == len(steps) - 1)
        np.testing.assert_array_equal(out, steps[k][1][LOGITS])
    code, out = _step(stub, "bob", steps[1][0], 1, sequence_end=True)
    np.testing.assert_array_equal(out, steps[1][1][LOGITS])
    assert live_sequences(server, "gpt2") == 0


def _bad_requests(feeds: dict) -> list[tuple[str, object, str]]:
    """(what, request, expected status) for ModelInfer."""
    def req(model="bert", **kw):
        r = pb.ModelInferRequest(model_name=model, **kw)
        return r

    def good(mutate=None, raw=True, model="bert"):
        r = req(model)
        for n, a in feeds.items():
            r.inputs.add(name=n, datatype="FP32" if a.dtype == np.float32 else "INT64", shape=list(a.shape))
            if raw:
                r.raw_input_contents.append(a.tobytes())
        if mutate:
            mutate(r)
        return r

    def set_param(key, **v):
        def m(r):
            for k, x in v.items():
                setattr(r.parameters[key], k, x)
        return m

    emb = next(n for n in feeds if feeds[n].dtype == np.float32)
    k_emb = list(feeds).index(emb)
    out = [
        ("unknown model", req("nope"), "NOT_FOUND"),
        ("unknown version", good(lambda r: setattr(r, "model_version", "7")), "NOT_FOUND"),
        ("no inputs", req(), "INVALID_ARGUMENT"),
        ("no data", good(raw=False), "INVALID_ARGUMENT"),
        ("raw count", good(lambda r: r.raw_input_contents.pop()), "INVALID_ARGUMENT"),
        ("short raw", good(lambda r: r.raw_input_contents.__setitem__(k_emb, b"\0" * 12)), "INVALID_ARGUMENT"),
        ("wrong dtype", good(lambda r: setattr(r.inputs[k_emb], "datatype", "FP64")), "INVALID_ARGUMENT"),
        ("bad dtype", good(lambda r: setattr(r.inputs[k_emb], "datatype", "NOPE")), "INVALID_ARGUMENT"),
        ("negative dim", good(lambda r: r.inputs[k_emb].shape.__setitem__(0, -1)), "INVALID_ARGUMENT"),
        ("wrong rank", good(lambda r: r.inputs[k_emb].shape.append(1)), "INVALID_ARGUMENT"),
        ("unknown input", good(lambda r: setattr(r.inputs[k_emb], "name", "x")), "INVALID_ARGUMENT"),
        ("duplicate input", good(lambda r: (r.inputs.append(r.inputs[0]),
                                            r.raw_input_contents.append(r.raw_input_contents[0]))),
         "INVALID_ARGUMENT"),
        ("unknown output", good(lambda r: r.outputs.add(name="nope")), "INVALID_ARGUMENT"),
        ("empty parameter", good(lambda r: r.parameters["sequence_id"].Clear()), "INVALID_ARGUMENT"),
        ("bad sequence flag", good(set_param("sequence_start", int64_param=1)), "INVALID_ARGUMENT"),
        ("shared memory", good(lambda r: r.inputs[0].parameters["shared_memory_region"].__setattr__(
            "string_param", "x")), "INVALID_ARGUMENT"),
        ("HTTP binary size", good(lambda r: r.inputs[0].parameters["binary_data_size"].__setattr__(
            "int64_param", 4)), "INVALID_ARGUMENT"),
        ("NaN", good(lambda r: r.raw_input_contents.__setitem__(
            k_emb, np.full(feeds[emb].shape, np.nan, np.float32).tobytes())), "INVALID_ARGUMENT"),
        ("batch over --max-batch", None, "INVALID_ARGUMENT"),
        ("over --max-request-bytes", None, "RESOURCE_EXHAUSTED"),
        ("decoder continuation of unknown id", None, "INVALID_ARGUMENT"),
    ]
    return out


def test_bad_requests_get_precise_status_and_the_server_stays_correct(server, bundles, stub):
    ref = Server(bundles["bert"] / "server", device="cpu")
    rng = np.random.default_rng(0)
    feeds = {n: (rng.standard_normal((2, 5, 32)).astype(np.float32) if n != "attention_mask"
                 else np.ones((2, 5), np.int64)) for n in ref.input_names}
    want = ref.run(feeds)
    table = _bad_requests(feeds)
    big = {n: np.repeat(a, 9, axis=0) for n, a in feeds.items()}
    huge = {n: (np.zeros((8, 48, 32 * 30), np.float32) if a.dtype == np.float32 else np.ones((8, 48), np.int64))
            for n, a in feeds.items()}
    steps, _ = decoder_steps(bundles["gpt2"], [1, 2], 2)
    for what, request, expected in table:
        if what == "batch over --max-batch":
            request = _raw("bert", big)
        elif what == "over --max-request-bytes":
            request = _raw("bert", huge)
        elif what == "decoder continuation of unknown id":
            request = _raw("gpt2", steps[1][0], sequence_id=12345)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, metadata=md("alice"), timeout=30)
        assert e.value.code().name == expected, (what, e.value.code(), e.value.details())
        assert e.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        assert e.value.details() and "\n" not in e.value.details(), what
        # the server keeps serving, exactly
        r = stub.ModelInfer(_raw("bert", feeds), metadata=md("alice"), timeout=30)
        i = [o.name for o in r.outputs].index(ref.output_names[0])
        np.testing.assert_array_equal(np.frombuffer(r.raw_output_contents[i], np.float32).reshape(
            r.outputs[i].shape), want[ref.output_names[0]])
    for call, request in ((stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
                          (stub.ModelConfig, pb.ModelConfigRequest(name="bert", version="2")),
                          (stub.ModelReady, pb.ModelReadyRequest(name="nope"))):
        with pytest.raises(grpc.RpcError) as e:
            call(request, metadata=md("bob"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # bytes that are no protobuf message at all: INVALID_ARGUMENT (grpc's own answer would be INTERNAL)
    channel = grpc.insecure_channel(hostport(server))
    for method in ("ModelInfer", "ModelMetadata", "ServerLive"):
        raw = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff\x0f", metadata=md("bob"), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.value)
    channel.close()
    with pytest.raises(grpc.RpcError) as e:  # a method stip does not offer: UNIMPLEMENTED, not INTERNAL
        stub.ModelStatistics(pb.ModelStatisticsRequest(name="bert"), metadata=md("bob"), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _raw(model: str, feeds: dict, **params) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model)
    for k, v in params.items():
        r.parameters[k].int64_param = v
    for n, a in feeds.items():
        r.inputs.add(name=n, datatype="FP32" if a.dtype == np.float32 else "INT64", shape=list(a.shape))
        r.raw_input_contents.append(np.ascontiguousarray(a).tobytes())
    return r


def test_typed_contents_equal_raw(server, bundles, stub):
    """A client that sends typed contents (fp32_contents, int64_contents) instead of raw bytes gets the same."""
    ref = Server(bundles["bert"] / "server", device="cpu")
    rng = np.random.default_rng(3)
    feeds = {n: (rng.standard_normal((1, 4, 32)).astype(np.float32) if n != "attention_mask"
                 else np.ones((1, 4), np.int64)) for n in ref.input_names}
    r = pb.ModelInferRequest(model_name="bert")
    for n, a in feeds.items():
        t = r.inputs.add(name=n, datatype="FP32" if a.dtype == np.float32 else "INT64", shape=list(a.shape))
        (t.contents.fp32_contents if a.dtype == np.float32 else t.contents.int64_contents).extend(a.ravel().tolist())
    out = stub.ModelInfer(r, metadata=md("bob"), timeout=30)
    i = [o.name for o in out.outputs].index(ref.output_names[0])
    np.testing.assert_array_equal(np.frombuffer(out.raw_output_contents[i], np.float32).reshape(
        out.outputs[i].shape), ref.run(feeds)[ref.output_names[0]])


def test_remote_sequence_close_frees_over_grpc(server, zoo, bundles):
    gen = StipGenerator(bundles["gpt2"] / "client", server=RemoteServer(server.grpc_url, "gpt2",
                                                                         token=TOKENS["alice"]))
    it = gen.generate([5, 9, 17], 20)
    first = [next(it), next(it)]
    assert live_sequences(server, "gpt2") == 1
    it.close()  # RemoteSequence.close() ends the sequence now (the idle timeout is 600 s)
    assert live_sequences(server, "gpt2") == 0
    assert first == generate_plaintext(zoo.get("gpt2-cache"), [5, 9, 17], 2)


def test_tls_grpcs(bundles, tmp_path, zoo):
    cert, key = _self_signed(tmp_path)
    srv = ServerProcess([str(bundles["bert"]), "--device", "cpu", "--tls-cert", str(cert), "--tls-key", str(key)],
                        tmp_path / "tls.log", verify=str(cert), grpc=True)
    try:
        assert srv.grpc_url.startswith("grpcs://")
        model = zoo.get("bert")
        feeds = random_feeds(model, batch=1, seq=6, seed=1)
        remote = RemoteClient(bundles["bert"] / "client", srv.grpc_url, ca_cert=cert)
        got, want = remote.run(feeds), LocalDeployment(bundles["bert"], device="cpu").run(feeds)
        for n in want:
            np.testing.assert_array_equal(got[n], want[n])
        plain = tg.InferenceServerClient(hostport(srv))  # plaintext against the TLS port: refused, not served
        with pytest.raises(InferenceServerException):
            plain.get_model_metadata("stip", client_timeout=5)
        assert srv.alive()
    finally:
        srv.stop()


def test_bad_grpc_port_is_one_line_error(bundles):
    import socket
    import subprocess
    import sys

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        busy = held.getsockname()[1]
        for port, needle in ((70000, "--grpc-port 70000"), (busy, f"--grpc-port {busy}")):
            r = subprocess.run([sys.executable, "-m", "stip.compiler.cli", "serve", str(bundles["bert"]), "--port",
                                "0", "--grpc-port", str(port)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_full_queue_is_resource_exhausted_over_grpc(bundles, tmp_path):
    """One worker and no queue, shared with HTTP: concurrent gRPC calls beyond it are refused at once with
    RESOURCE_EXHAUSTED ("server busy"), the others are exact."""
    srv = ServerProcess([f"bert={bundles['bert']}", "--device", "cpu", "--workers", "1", "--max-queue", "0"],
                        tmp_path / "queue.log", grpc=True)
    try:
        ref = Server(bundles["bert"] / "server", device="cpu")
        rng = np.random.default_rng(5)
        feeds = {n: (rng.standard_normal((8, 512, 32)).astype(np.float32) if n != "attention_mask"
                     else np.ones((8, 512), np.int64)) for n in ref.input_names}
        want = ref.run(feeds)[ref.output_names[0]]
        with grpc.insecure_channel(hostport(srv)) as ch:
            s = pb_grpc.GRPCInferenceServiceStub(ch)
            futures = [s.ModelInfer.future(_raw("bert", feeds), timeout=120) for _ in range(8)]
            codes = []
            for f in futures:
                try:
                    r = f.result()
                    i = [o.name for o in r.outputs].index(ref.output_names[0])
                    np.testing.assert_array_equal(np.frombuffer(r.raw_output_contents[i], np.float32).reshape(
                        r.outputs[i].shape), want)
                    codes.append("OK")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in e.details(), e
                    codes.append(e.code().name)
        assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
    finally:
        srv.stop()
