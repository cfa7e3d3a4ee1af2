"""`stip serve` as a real process on loopback (no mocks): KServe v2 / Open Inference Protocol endpoints, JSON and
binary tensors, tritonclient interop, server-held KV-cache sequences, limits, bad requests, /metrics, and a
bounded load test."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as th
from serve_helpers import (
    BIG,
    HEADER,
    ServerProcess,
    bert_feeds,
    binary_request,
    decode_response,
    decoder_steps,
    json_request,
)
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from stip.compiler.pipeline import compile_model
from stip.runtime.bundle import Server

LIMIT_BYTES = 4 << 20
MAX_BATCH, MAX_SEQ = 8, 64


# ---------------------------------------------------------------------------------------------------------------
# fixtures: three compiled bundles, two server processes


@pytest.fixture(scope="module")
def bundles(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-bundles")
    out = {}
    for family, name in (("bert", "bert"), ("gpt2-cache", "gpt2"), ("llama-cache", "llama")):
        out[name] = root / name
        compile_model(zoo.get(family), out[name], max_context=64 if "cache" in family else None)
    return out


@pytest.fixture(scope="module")
def main_server(bundles, tmp_path_factory):
    """bert, gpt2 and llama in one process, with small limits for the bad-request tests."""
    srv = ServerProcess([f"bert={bundles['bert'] / 'server'}", f"gpt2={bundles['gpt2'] / 'server'}",
                         f"llama={bundles['llama']}", "--device", "cpu", "--max-request-bytes", str(LIMIT_BYTES),
                         "--max-batch", str(MAX_BATCH), "--max-seq", str(MAX_SEQ), "--workers", "2",
                         "--max-queue", "256"], tmp_path_factory.mktemp("logs") / "main.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tight_server(bundles, tmp_path_factory):
    """One ORT worker and no queue, at most 2 sequences, a 1 s idle timeout, the KV cache through IO binding;
    the llama bundle root under the default model name 'stip'."""
    srv = ServerProcess([str(bundles["llama"]), f"bert={bundles['bert']}", "--device", "cpu", "--workers", "1",
                         "--max-queue", "0", "--max-sequences", "2", "--sequence-timeout", "1",
                         "--io-binding", "on"], tmp_path_factory.mktemp("logs") / "tight.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def refs(bundles):
    """In-process references: the server graphs and the client halves."""
    return {name: Server(b / "server", device="cpu") for name, b in bundles.items()}


# ---------------------------------------------------------------------------------------------------------------
# helpers


def triton_inputs(feeds: dict, binary: bool = True) -> list:
    ins = []
    for n, a in feeds.items():
        i = th.InferInput(n, list(a.shape), np_to_triton_dtype(a.dtype))
        i.set_data_from_numpy(a, binary_data=binary)
        ins.append(i)
    return ins


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    assert found, f"{name}{labels} not in /metrics"
    return total


# ---------------------------------------------------------------------------------------------------------------
# tests


def test_health_and_metadata(main_server, refs):
    url = main_server.url
    assert httpx.get(url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(url + "/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(url + "/v2").json()
    assert {"binary_tensor_data", "sequence"} <= set(meta["extensions"]) and meta["name"] and meta["version"]
    for name, ref in refs.items():
        md = httpx.get(f"{url}/v2/models/{name}").json()
        assert md == httpx.get(f"{url}/v2/models/{name}/versions/1").json()
        assert md["name"] == name and md["versions"] == ["1"] and md["platform"] == "onnxruntime_onnx"
        assert md["parameters"]["stip_key_id"] == ref.key_id
        names = [t["name"] for t in md["inputs"] + md["outputs"]]
        assert not any(n.startswith(("past_key_values", "present")) for n in names)
        assert [t["name"] for t in md["inputs"]] == [n for n in ref.input_names if not n.startswith("past")]
        for t in md["inputs"] + md["outputs"]:
            assert t["datatype"] in ("FP32", "INT64") and all(isinstance(d, int) and d >= -1 for d in t["shape"])
        assert httpx.get(f"{url}/v2/models/{name}/ready").status_code == 200
        cfg = httpx.get(f"{url}/v2/models/{name}/config").json()
        assert cfg["parameters"]["stip_key_id"]["string_value"] == ref.key_id
        assert ("sequence_batching" in cfg) == (name != "bert")
    bert = httpx.get(f"{url}/v2/models/bert").json()
    assert bert["inputs"][0]["shape"] == [-1, -1, 32] and bert["outputs"][0]["datatype"] == "FP32"
    client = th.InferenceServerClient(url[len("http://"):])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("llama")
    assert client.get_model_metadata("llama")["parameters"]["stip_key_id"] == refs["llama"].key_id
    assert [m["name"] for m in client.get_model_repository_index()] == ["bert", "gpt2", "llama"]


def test_json_and_binary_inference_equal_in_process(main_server, refs):
    url, ref = main_server.url, refs["bert"]
    feeds = bert_feeds(ref, 3, 11, seed=1)
    want = ref.run(feeds)
    got = decode_response(httpx.post(f"{url}/v2/models/bert/infer", json={**json_request(feeds), "id": "r1"}))
    for n in ref.output_names:
        np.testing.assert_array_equal(got[n], want[n])
    body, headers = binary_request(feeds, ref.output_names)
    r = httpx.post(f"{url}/v2/models/bert/versions/1/infer", content=body, headers=headers)
    assert r.headers["content-type"] == "application/octet-stream" and int(r.headers[HEADER]) < len(r.content)
    got = decode_response(r)
    for n in ref.output_names:
        np.testing.assert_array_equal(got[n], want[n])
    # mixed: one input binary, one JSON; one output binary, one JSON; only the requested output comes back
    emb, mask = list(feeds)
    req = {"id": "mixed", "inputs": [
        {"name": emb, "datatype": "FP32", "shape": list(feeds[emb].shape),
         "parameters": {"binary_data_size": feeds[emb].nbytes}},
        {"name": mask, "datatype": "INT64", "shape": list(feeds[mask].shape), "data": feeds[mask].tolist()}],
        "outputs": [{"name": ref.output_names[1], "parameters": {"binary_data": True}},
                    {"name": ref.output_names[0]}]}
    head = json.dumps(req).encode()
    r = httpx.post(f"{url}/v2/models/bert/infer", content=head + feeds[emb].tobytes(),
                   headers={HEADER: str(len(head))})
    got = decode_response(r)
    assert json.loads(r.content[:int(r.headers[HEADER])])["id"] == "mixed"
    assert list(got) == [ref.output_names[1], ref.output_names[0]]
    for n in ref.output_names:
        np.testing.assert_array_equal(got[n], want[n])
    # a gzip-compressed request (tritonclient's request_compression_algorithm) is accepted too
    r = httpx.post(f"{url}/v2/models/bert/infer", content=gzip.compress(body),
                   headers={**headers, "Content-Encoding": "gzip"})
    np.testing.assert_array_equal(decode_response(r)[ref.output_names[0]], want[ref.output_names[0]])


def test_tritonclient_interop(main_server, bundles, refs):
    client = th.InferenceServerClient(main_server.url[len("http://"):])
    ref = refs["bert"]
    feeds = bert_feeds(ref, 2, 9, seed=2)
    want = ref.run(feeds)
    for binary_in in (True, False):
        for binary_out in (True, False):
            outs = [th.InferRequestedOutput(n, binary_data=binary_out) for n in ref.output_names]
            r = client.infer("bert", triton_inputs(feeds, binary_in), outputs=outs, request_id="x")
            assert r.get_response()["id"] == "x"
            for n in ref.output_names:
                np.testing.assert_array_equal(r.as_numpy(n), want[n])
    r = client.infer("bert", triton_inputs(feeds), model_version="1")  # no outputs listed: all, binary
    for n in ref.output_names:
        np.testing.assert_array_equal(r.as_numpy(n), want[n])
    r = client.infer("bert", triton_inputs(feeds), request_compression_algorithm="deflate")
    np.testing.assert_array_equal(r.as_numpy(ref.output_names[0]), want[ref.output_names[0]])
    # a cache model without sequence_id: an empty cache, nothing kept
    steps, _ = decoder_steps(bundles["gpt2"], [5, 9, 17], 1)
    to_server, server_out = steps[0]
    before = metric(main_server.url, "stip_live_sequences", model="gpt2")
    r = client.infer("gpt2", triton_inputs(to_server))
    np.testing.assert_array_equal(r.as_numpy("logits.stip_server"), server_out["logits.stip_server"])
    assert metric(main_server.url, "stip_live_sequences", model="gpt2") == before
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", triton_inputs(feeds))


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_sequence_equals_in_process(main_server, bundles, model):
    """Greedy generation through the server (tritonclient, sequence_id/start/end) equals in-process generation,
    step by step and bit for bit; a failed step changes nothing; a restart replaces the sequence."""
    steps, tokens = decoder_steps(bundles[model], [5, 9, 17, 3], 8)
    url = main_server.url
    client = th.InferenceServerClient(url[len("http://"):])
    base = metric(url, "stip_live_sequences", model=model)
    sid = (1 << 40) + 7001 if model == "gpt2" else "llama-session-000001"
    for k, (to_server, server_out) in enumerate(steps):
        if k == 3:  # a bad step: wrong dtype; the cache must not move
            bad = {n: (a.astype(np.float64) if a.dtype == np.float32 else a) for n, a in to_server.items()}
            with pytest.raises(InferenceServerException, match="datatype"):
                client.infer(model, triton_inputs(bad), sequence_id=sid)
        r = client.infer(model, triton_inputs(to_server, binary=k % 2 == 0), sequence_id=sid,
                         sequence_start=k == 0, sequence_end=k == len(steps) - 1)
        np.testing.assert_array_equal(r.as_numpy("logits.stip_server"), server_out["logits.stip_server"])
        if k == 0:
            assert metric(url, "stip_live_sequences", model=model) == base + 1
    assert metric(url, "stip_live_sequences", model=model) == base
    with pytest.raises(InferenceServerException, match="unknown sequence id") as e:
        client.infer(model, triton_inputs(steps[1][0]), sequence_id=sid)
    assert e.value.status() == "400"
    # sequence_start on a live id restarts it (as Triton does)
    for _ in range(2):
        r = client.infer(model, triton_inputs(steps[0][0]), sequence_id=sid, sequence_start=True)
        np.testing.assert_array_equal(r.as_numpy("logits.stip_server"), steps[0][1]["logits.stip_server"])
    r = client.infer(model, triton_inputs(steps[1][0]), sequence_id=sid, sequence_end=True)
    np.testing.assert_array_equal(r.as_numpy("logits.stip_server"), steps[1][1]["logits.stip_server"])
    assert len(tokens) == 8 and metric(url, "stip_live_sequences", model=model) == base


def _bad_requests(ref: Server, llama: Server) -> list[tuple[str, int, dict]]:
    """(what, expected status, httpx.post kwargs) for /v2/models/bert/infer unless 'path' is given."""
    f = bert_feeds(ref, 2, 5, seed=3)
    emb = next(iter(f))
    good = json_request(f)

    def edit(fn) -> dict:
        req = json.loads(json.dumps(good))
        fn(req)
        return {"json": req}

    body, headers = binary_request(f)
    cut = len(body) - 7
    big = np.zeros((1, 8, 32), np.float32)
    small = {emb: big, "attention_mask": np.ones((1, 8), np.int64)}
    return [
        ("malformed JSON", 400, {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}),
        ("not an object", 400, {"json": [1, 2]}),
        ("no inputs", 400, {"json": {"inputs": []}}),
        ("unknown input name", 400, edit(lambda r: r["inputs"][0].update(name="nope"))),
        ("missing input", 400, edit(lambda r: r["inputs"].pop())),
        ("duplicate input", 400, edit(lambda r: r["inputs"].append(r["inputs"][1]))),
        ("wrong datatype", 400, edit(lambda r: r["inputs"][0].update(datatype="FP64"))),
        ("wrong rank", 400, edit(lambda r: r["inputs"][0].update(shape=[2, 160]))),
        ("wrong static dim", 400, edit(lambda r: r["inputs"][0].update(shape=[2, 10, 16]))),
        ("negative dim", 400, edit(lambda r: r["inputs"][0].update(shape=[2, -5, 32]))),
        ("data length", 400, edit(lambda r: r["inputs"][0]["data"].pop())),
        ("strings as data", 400, edit(lambda r: r["inputs"][0].update(data=["a"] * 320))),
        ("floats for INT64", 400, edit(lambda r: r["inputs"][1].update(data=[0.5] * 10))),
        ("no data", 400, edit(lambda r: r["inputs"][0].pop("data"))),
        ("batch over --max-batch", 400, {"json": json_request(bert_feeds(ref, MAX_BATCH + 1, 3, seed=4))}),
        ("dim 1 over --max-seq", 400, {"json": json_request(bert_feeds(ref, 1, MAX_SEQ + 1, seed=4))}),
        ("dims disagree", 400, {"json": json_request({emb: big, "attention_mask": np.ones((1, 7), np.int64)})}),
        ("unknown output", 400, edit(lambda r: r.update(outputs=[{"name": "nope"}]))),
        ("classification", 400, edit(lambda r: r.update(outputs=[{"name": ref.output_names[0],
                                                                   "parameters": {"classification": 3}}]))),
        ("bad sequence flag", 400, edit(lambda r: r.update(parameters={"sequence_id": 3, "sequence_start": "y"}))),
        ("start without id", 400, edit(lambda r: r.update(parameters={"sequence_start": True}))),
        ("truncated binary body", 400, {"content": body[:cut], "headers": headers}),
        ("extra binary bytes", 400, {"content": body + b"xx", "headers": headers}),
        ("header length past the body", 400, {"content": body, "headers": {HEADER: str(len(body) + 1)}}),
        ("header length not a number", 400, {"content": body, "headers": {HEADER: "ten"}}),
        ("binary size vs shape", 400, {"content": binary_request(small)[0], "headers": {
            HEADER: binary_request(small)[1][HEADER]}, "_shape": (emb, [1, 8, 31])}),
        ("corrupt gzip", 400, {"content": b"\x1f\x8b not gzip", "headers": {"Content-Encoding": "gzip"}}),
        ("unknown encoding", 415, {"content": body, "headers": {**headers, "Content-Encoding": "br"}}),
        ("oversized (Content-Length)", 413, {"content": b"x" * (LIMIT_BYTES + 1)}),
        ("oversized (chunked)", 413, {"content": iter([b"y" * (1 << 20)] * 5)}),
        ("oversized after gzip", 413, {"content": gzip.compress(b" " * (LIMIT_BYTES + 10)),
                                       "headers": {"Content-Encoding": "gzip"}}),
        ("unknown model", 404, {"json": good, "path": "/v2/models/nope/infer"}),
        ("unknown version", 404, {"json": good, "path": "/v2/models/bert/versions/2/infer"}),
        ("unknown endpoint", 404, {"json": good, "path": "/v2/models/bert/explode"}),
        ("unknown sequence id", 400, {"json": json_request(decoder_feeds(llama), sequence_id=BIG + 99),
                                      "path": "/v2/models/llama/infer"}),
    ]


def decoder_feeds(server: Server) -> dict:
    emb = server.input_names[0]
    return {emb: np.zeros((1, 2, 32), np.float32), "attention_mask": np.ones((1, 2), np.int64),
            "position_ids": np.arange(2, dtype=np.int64)[None]}


def test_bad_requests_get_4xx_and_the_server_stays_correct(main_server, bundles, refs):
    url, ref = main_server.url, refs["bert"]
    feeds = bert_feeds(ref, 2, 6, seed=5)
    want = ref.run(feeds)
    ok_before = metric(url, "stip_requests_total", model="bert", endpoint="infer", status="200")
    cases = _bad_requests(ref, refs["llama"])
    with httpx.Client(timeout=30) as http:
        for what, status, kw in cases:
            kw = dict(kw)
            path = kw.pop("path", "/v2/models/bert/infer")
            shape = kw.pop("_shape", None)
            if shape is not None:  # rewrite one declared shape inside the JSON header
                head_len = int(kw["headers"][HEADER])
                head = json.loads(kw["content"][:head_len])
                next(i for i in head["inputs"] if i["name"] == shape[0])["shape"] = shape[1]
                new_head = json.dumps(head).encode()
                kw["content"] = new_head + kw["content"][head_len:]
                kw["headers"] = {HEADER: str(len(new_head))}
            r = http.post(url + path, **kw)
            assert r.status_code == status, (what, r.status_code, r.text)
            err = r.json()["error"]
            assert isinstance(err, str) and err and "\n" not in err, (what, err)
            assert main_server.alive(), what
            got = decode_response(http.post(url + "/v2/models/bert/infer", json=json_request(feeds)))
            np.testing.assert_array_equal(got[ref.output_names[0]], want[ref.output_names[0]])
        assert http.get(url + "/v2/models/bert/infer").status_code == 405
        # inputs that pass every check but that the graph cannot take (a past shape that disagrees with the
        # embeddings): ONNX Runtime's error becomes a 400, and the failed start leaves no sequence behind
        to_server = dict(decoder_steps(bundles["gpt2"], [1, 2, 3], 1)[0][0][0])
        shape_in = next(n for n in to_server if "Shape" in n)
        to_server[shape_in] = np.array([1, 7], np.int64)  # within the dim bound, but a lie
        live = metric(url, "stip_live_sequences", model="gpt2")
        for params in ({}, {"sequence_id": BIG + 12, "sequence_start": True}):
            r = http.post(url + "/v2/models/gpt2/infer", json=json_request(to_server, **params))
            assert r.status_code == 400 and "model rejected" in r.json()["error"], r.text
        assert metric(url, "stip_live_sequences", model="gpt2") == live and main_server.alive()
    assert metric(url, "stip_requests_total", model="bert", endpoint="infer", status="400") >= 20
    assert metric(url, "stip_requests_total", model="bert", endpoint="infer", status="413") >= 3
    assert metric(url, "stip_requests_total", model="", endpoint="infer", status="404") >= 1
    assert metric(url, "stip_requests_total", model="bert", endpoint="infer", status="200") >= ok_before + len(cases)


def test_metrics_content(main_server):
    r = httpx.get(main_server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for needle in ("# TYPE stip_requests_total counter", "# TYPE stip_request_duration_seconds histogram",
                   'stip_request_duration_seconds_bucket{endpoint="infer",le="0.005",model="bert"}',
                   "# TYPE stip_live_sequences gauge", 'stip_live_sequences{model="llama"}',
                   "stip_queue_depth", "stip_inflight_requests", "stip_inference_duration_seconds_bucket",
                   'stip_requests_total{endpoint="health_ready",model="",status="200"}'):
        assert needle in text, needle


def test_cap_idle_timeout_and_io_binding(tight_server, bundles, tmp_path):
    """--max-sequences 2: a third sequence gets 429 while the two live ones keep working; a client killed
    mid-generation has its sequence freed by the 1 s idle timeout. The cache runs through ORT IO binding here
    and must still equal the in-process CachedSession."""
    url = tight_server.url
    client = th.InferenceServerClient(url[len("http://"):])
    steps, _ = decoder_steps(bundles["llama"], [4, 8, 15], 4)

    def step(sid, k, **kw):
        r = client.infer("stip", triton_inputs(steps[k][0]), sequence_id=sid, **kw)
        np.testing.assert_array_equal(r.as_numpy("logits.stip_server"), steps[k][1]["logits.stip_server"])

    step(BIG + 1, 0, sequence_start=True)
    step(BIG + 2, 0, sequence_start=True)
    with pytest.raises(InferenceServerException, match="too many live sequences") as e:
        client.infer("stip", triton_inputs(steps[0][0]), sequence_id=BIG + 3, sequence_start=True)
    assert e.value.status() == "429"
    for k in (1, 2):
        step(BIG + 1, k)
        step(BIG + 2, k)
    step(BIG + 2, 3, sequence_end=True)
    step(BIG + 3, 0, sequence_start=True)
    step(BIG + 1, 3, sequence_end=True)
    step(BIG + 3, 1, sequence_end=True)
    assert metric(url, "stip_live_sequences", model="stip") == 0

    # a client process that starts a sequence and is killed mid-generation
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, **steps[0][0])
    script = textwrap.dedent(f"""
        import sys, time, numpy as np, tritonclient.http as th
        from tritonclient.utils import np_to_triton_dtype
        f = dict(np.load({str(feeds)!r}))
        ins = []
        for n, a in f.items():
            i = th.InferInput(n, list(a.shape), np_to_triton_dtype(a.dtype)); i.set_data_from_numpy(a); ins.append(i)
        th.InferenceServerClient({url[len("http://"):]!r}).infer("stip", ins, sequence_id="doomed-sequence-0001",
                                                                 sequence_start=True)
        print("started", flush=True)
        time.sleep(60)
    """)
    victim = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "started"
        assert metric(url, "stip_live_sequences", model="stip") == 1
    finally:
        victim.kill()
        victim.wait(10)
    expired = metric(url, "stip_sequences_expired_total", model="stip") if "stip_sequences_expired_total{" in \
        httpx.get(url + "/metrics").text else 0.0
    deadline = time.monotonic() + 10
    while metric(url, "stip_live_sequences", model="stip") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, "stip_live_sequences", model="stip") == 0
    assert metric(url, "stip_sequences_expired_total", model="stip") == expired + 1
    with pytest.raises(InferenceServerException, match="unknown sequence id"):
        client.infer("stip", triton_inputs(steps[1][0]), sequence_id="doomed-sequence-0001")


def test_full_queue_gets_503_at_once(tight_server, refs):
    """One worker and --max-queue 0: concurrent requests beyond the one running get 503 immediately; every
    accepted one is correct, and the server serves normally afterwards."""
    ref = refs["bert"]
    feeds = bert_feeds(ref, 8, 1024, seed=6)
    want = ref.run(feeds)[ref.output_names[0]]
    body, headers = binary_request(feeds, [ref.output_names[0]])
    results: list = []

    def one():
        t0 = time.perf_counter()
        r = httpx.post(tight_server.url + "/v2/models/bert/infer", content=body, headers=headers, timeout=60)
        results.append((r, time.perf_counter() - t0))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 8
    codes = sorted(r.status_code for r, _ in results)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for r, _ in results:
        if r.status_code == 200:
            np.testing.assert_array_equal(decode_response(r)[ref.output_names[0]], want)
        else:
            assert "busy" in r.json()["error"]
    assert metric(tight_server.url, "stip_rejected_requests_total", model="bert") >= 1
    r = httpx.post(tight_server.url + "/v2/models/bert/infer", content=body, headers=headers, timeout=60)
    np.testing.assert_array_equal(decode_response(r)[ref.output_names[0]], want)


def test_load_32_clients_x_50_requests(main_server, bundles, refs):
    """32 concurrent tritonclient clients x 50 requests, mixed models (bert at several lengths, gpt2 and llama
    sequences of 5 steps), JSON and binary: zero errors, zero lost requests, every answer exact."""
    url = main_server.url
    bert = refs["bert"]
    bert_cases = []
    for k, (b, s) in enumerate([(1, 8), (2, 16), (1, 32), (4, 12), (1, 64), (8, 4)]):
        f = bert_feeds(bert, b, s, seed=100 + k)
        bert_cases.append((f, bert.run(f)[bert.output_names[0]]))
    seqs = {m: decoder_steps(bundles[m], [3 + k for k in range(p)], 5)[0]
            for m, p in (("gpt2", 4), ("llama", 6))}
    before = metric(url, "stip_requests_total", endpoint="infer", status="200")
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    n_clients, n_requests = 32, 50

    def client_loop(c: int):
        cli = th.InferenceServerClient(url[len("http://"):], connection_timeout=60, network_timeout=60)
        kind = ("bert", "gpt2", "llama")[c % 3]
        try:
            for k in range(n_requests):
                binary = (c + k) % 2 == 0
                t0 = time.perf_counter()
                if kind == "bert":
                    f, want = bert_cases[(c + k) % len(bert_cases)]
                    r = cli.infer("bert", triton_inputs(f, binary), outputs=[
                        th.InferRequestedOutput(bert.output_names[0], binary_data=binary)])
                    got = r.as_numpy(bert.output_names[0])
                else:
                    steps = seqs[kind]
                    j = k % len(steps)
                    sid = BIG + c * 1000 + k // len(steps)
                    r = cli.infer(kind, triton_inputs(steps[j][0], binary), sequence_id=sid,
                                  sequence_start=j == 0, sequence_end=j == len(steps) - 1)
                    got, want = r.as_numpy("logits.stip_server"), steps[j][1]["logits.stip_server"]
                dt = time.perf_counter() - t0
                ok = np.array_equal(got, want)
                with lock:
                    latencies.append(dt)
                    if not ok:
                        errors.append(f"client {c} request {k}: wrong result")
        except Exception as e:  # any failure is an error of the test, reported below
            with lock:
                errors.append(f"client {c}: {type(e).__name__}: {e}")
        finally:
            cli.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    wall = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads), "load test did not finish in time"
    assert not errors, errors[:5]
    assert len(latencies) == n_clients * n_requests
    served = metric(url, "stip_requests_total", endpoint="infer", status="200") - before
    assert served == n_clients * n_requests, served
    assert metric(url, "stip_live_sequences", model="gpt2") == 0 == metric(url, "stip_live_sequences",
                                                                           model="llama")
    lat = np.array(latencies) * 1000
    report = (f"load: {len(lat)} requests from {n_clients} clients in {wall:.1f} s ({len(lat) / wall:.0f} req/s), "
              f"p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, "
              f"max {lat.max():.1f} ms")
    print(report)
    if os.environ.get("STIP_SERVE_REPORT"):  # where to keep the numbers, e.g. for a benchmark note
        Path(os.environ["STIP_SERVE_REPORT"]).write_text(report + "\n")
    assert main_server.alive()
