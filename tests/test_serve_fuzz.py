"""A table of hostile and broken requests against one real `stip serve` process (KV caches through ONNX Runtime IO
binding, where ORT raises plain RuntimeErrors): each must get a 4xx with a one-line JSON error, the server must
keep serving exact answers, and a live sequence touched by the bad requests must continue bit for bit."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
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

from stip.compiler.pipeline import compile_model
from stip.runtime.bundle import Server

SID = BIG + 4242


@pytest.fixture(scope="module")
def bundles(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-bundles")
    out = {"bert": root / "bert", "gpt2": root / "gpt2", "llama": root / "llama"}
    compile_model(zoo.get("bert"), out["bert"])
    compile_model(zoo.get("gpt2-cache"), out["gpt2"], max_context=64)
    compile_model(zoo.get("llama-cache"), out["llama"], max_context=64)
    return out


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    srv = ServerProcess([f"bert={bundles['bert']}", f"gpt2={bundles['gpt2']}", f"llama={bundles['llama']}",
                         "--device", "cpu", "--io-binding", "on", "--max-seq", "64"],
                        tmp_path_factory.mktemp("logs") / "fuzz.log")
    yield srv
    srv.stop()


def raw(text: str | bytes, **headers) -> dict:
    return {"content": text.encode() if isinstance(text, str) else text,
            "headers": {"Content-Type": "application/json", **headers}}


def cases(bert: Server, gpt2_steps, llama_steps) -> list[tuple[str, str, int, dict]]:
    """(what, model, expected status, httpx.request kwargs incl. method)."""
    f = bert_feeds(bert, 1, 3, seed=1)
    emb = next(iter(f))
    good = json_request(f)
    goods = json.dumps(good)

    def edit(fn, req=None) -> dict:
        r = json.loads(json.dumps(req or good))
        fn(r)
        return {"json": r}

    body, headers = binary_request(f)
    nan_f = {**f, emb: f[emb].copy()}
    nan_f[emb][0, 0, 0] = np.nan
    g0 = gpt2_steps[0][0]
    shape_in = next(n for n in g0 if g0[n].ndim == 1)
    l1 = llama_steps[1][0]
    lemb = next(n for n in l1 if l1[n].dtype == np.float32)

    end_only = json.dumps({"inputs": [], "parameters": {"sequence_id": SID, "sequence_end": True}}).encode()

    def llama(feeds, **params) -> dict:
        return {"json": json_request(feeds, sequence_id=SID, **params)}

    return [
        ("nested 100k deep", "bert", 400, raw("[" * 100_000 + "]" * 100_000)),
        ("nested object 50k deep", "bert", 400, raw('{"a":' * 50_000 + "1" + "}" * 50_000)),
        ("data nested past the rank", "bert", 400, edit(lambda r: r["inputs"][0].update(
            data=json.loads("[" * 10 + "1.0" + "]" * 10)))),
        ("data nested 3000 deep", "bert", 400, raw(goods.replace('"data": [', '"data": ' + "[" * 3000 + "1.0"
                                                                 + "]" * 2999 + ", [", 1))),
        ("NaN literal", "bert", 400, raw(goods.replace(str(good["inputs"][0]["data"][0]), "NaN", 1))),
        ("Infinity literal", "bert", 400, raw(goods.replace(str(good["inputs"][0]["data"][0]), "Infinity", 1))),
        ("-Infinity literal", "bert", 400, raw(goods.replace(str(good["inputs"][0]["data"][0]), "-Infinity", 1))),
        ("NaN in binary data", "bert", 400, dict(zip(("content", "headers"), binary_request(nan_f)))),
        ("float beyond FP32", "bert", 400, edit(lambda r: r["inputs"][0]["data"].__setitem__(0, 1e39))),
        ("int beyond INT64", "bert", 400, edit(lambda r: r["inputs"][1]["data"].__setitem__(0, 2**70))),
        ("mixed types in data", "bert", 400, edit(lambda r: r["inputs"][0]["data"].__setitem__(0, "x"))),
        ("data is an object", "bert", 400, edit(lambda r: r["inputs"][0].update(data={"a": 1}))),
        ("invalid UTF-8", "bert", 400, raw(b'{"inputs": "\xff\xfe"}')),
        ("empty body", "bert", 400, raw(b"")),
        ("inputs not a list", "bert", 400, {"json": {"inputs": {"a": 1}}}),
        ("input not an object", "bert", 400, {"json": {"inputs": [3]}}),
        ("id not a string", "bert", 400, edit(lambda r: r.update(id=5))),
        ("parameters not an object", "bert", 400, edit(lambda r: r.update(parameters=[1]))),
        ("datatype not a string", "bert", 400, edit(lambda r: r["inputs"][0].update(datatype=["FP32"]))),
        ("dim 2**62", "bert", 400, edit(lambda r: r["inputs"][0].update(shape=[1, 2**62, 32]))),
        ("rank 17", "bert", 400, edit(lambda r: r["inputs"][0].update(shape=[1] * 17))),
        ("bool dim", "bert", 400, edit(lambda r: r["inputs"][0].update(shape=[True, 3, 32]))),
        ("sequence length 0", "bert", 400, edit(lambda r: r["inputs"][0].update(shape=[1, 0, 32], data=[]))),
        ("binary_data_size negative", "bert", 400, edit(lambda r: r["inputs"][0].update(
            parameters={"binary_data_size": -4}))),
        ("binary_data_size bool", "bert", 400, edit(lambda r: r["inputs"][0].update(
            parameters={"binary_data_size": True}))),
        ("header length zero", "bert", 400, {"content": body, "headers": {HEADER: "0"}}),
        ("outputs not a list", "bert", 400, edit(lambda r: r.update(outputs={"name": "x"}))),
        ("binary_data_output not bool", "bert", 400, edit(lambda r: r.update(parameters={"binary_data_output": 1}))),
        ("no inputs, no sequence", "bert", 400, {"json": {"inputs": []}}),
        ("end-only with binary data", "llama", 400, {"content": end_only + b"xx",
                                                     "headers": {HEADER: str(len(end_only))}}),
        ("text/plain", "bert", 415, raw(goods, **{"Content-Type": "text/plain"})),
        ("form", "bert", 415, raw(goods, **{"Content-Type": "application/x-www-form-urlencoded"})),
        ("br encoding", "bert", 415, raw(goods, **{"Content-Encoding": "br"})),
        ("foreign Host", "bert", 400, raw(goods, Host="rebind.attacker.example")),
        ("GET infer", "bert", 405, {"method": "GET"}),
        ("PUT infer", "bert", 405, {"method": "PUT", "json": good}),
        ("unknown model", "nope", 404, {"json": good}),
        ("sequence_id float", "llama", 400, {"json": {**json_request(l1), "parameters": {"sequence_id": 1.5}}}),
        ("sequence_id negative", "llama", 400, {"json": json_request(l1, sequence_id=-3)}),
        ("sequence_id 2**64", "llama", 400, {"json": json_request(l1, sequence_id=2**64)}),
        ("sequence_id 300 chars", "llama", 400, {"json": json_request(l1, sequence_id="x" * 300)}),
        ("guessable sequence_id", "llama", 400, {"json": json_request(l1, sequence_id=7, sequence_start=True)}),
        ("shape value 10**9 (gpt2)", "gpt2", 400, {"json": json_request({**g0, shape_in: np.array([1, 10**9])})}),
        ("shape value negative (gpt2)", "gpt2", 400, {"json": json_request({**g0, shape_in: np.array([-5, 3])})}),
        ("lying shape value, IO binding", "gpt2", 400, {"json": json_request(
            {**g0, shape_in: np.array([1, 7])}, sequence_id=BIG + 1, sequence_start=True)}),
        ("mask shorter than the cache", "llama", 400, llama({**l1, "attention_mask": np.ones((1, 1), np.int64)})),
        ("mask longer than cache + new", "llama", 400, llama({**l1, "attention_mask": np.ones((1, 30), np.int64)})),
        ("batch differs from the sequence", "llama", 400, llama({k: np.concatenate([v, v]) for k, v in l1.items()})),
        ("positions disagree with tokens", "llama", 400, llama({**l1, "position_ids": np.zeros((1, 5), np.int64)})),
        ("wrong hidden size", "llama", 400, llama({**l1, lemb: np.zeros((1, 1, 31), np.float32)})),
    ]


def test_bad_requests_table(server, bundles):
    url = server.url
    bert = Server(bundles["bert"] / "server", device="cpu")
    gpt2_steps, _ = decoder_steps(bundles["gpt2"], [3, 1, 4], 2)
    llama_steps, _ = decoder_steps(bundles["llama"], [2, 7, 1, 8], 3)
    feeds = bert_feeds(bert, 2, 5, seed=9)
    want = bert.run(feeds)[bert.output_names[0]]
    logits = "logits.stip_server"
    table = cases(bert, gpt2_steps, llama_steps)
    assert len(table) >= 40
    with httpx.Client(timeout=60) as http:
        r = http.post(url + "/v2/models/llama/infer", json=json_request(llama_steps[0][0], sequence_id=SID,
                                                                        sequence_start=True))
        np.testing.assert_array_equal(decode_response(r)[logits], llama_steps[0][1][logits])
        for what, model, status, kw in table:
            kw = dict(kw)
            r = http.request(kw.pop("method", "POST"), f"{url}/v2/models/{model}/infer", **kw)
            assert r.status_code == status, (what, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert isinstance(err, str) and err and "\n" not in err and "Traceback" not in err, (what, err)
            assert server.alive(), what
            got = decode_response(http.post(url + "/v2/models/bert/infer", json=json_request(feeds)))
            np.testing.assert_array_equal(got[bert.output_names[0]], want)
        for k in (1, 2):  # the live sequence that every bad llama request aimed at continues exactly
            r = http.post(url + "/v2/models/llama/infer", json=json_request(llama_steps[k][0], sequence_id=SID,
                                                                            sequence_end=k == 2))
            np.testing.assert_array_equal(decode_response(r)[logits], llama_steps[k][1][logits])
        text = http.get(url + "/metrics").text
    assert 'stip_live_sequences{model="gpt2"} 0.0' in text and 'stip_live_sequences{model="llama"} 0.0' in text
    assert 'status="500"' not in text
    log = server.log.read_text()
    assert "Traceback" not in log and "inference failed" not in log, log[-2000:]
