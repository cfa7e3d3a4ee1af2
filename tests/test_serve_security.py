"""`stip serve` as an attacker sees it, against real server processes on loopback: bearer tokens (missing, wrong,
hot-reloaded, a broken file), sequences isolated between two clients, random ids on a server without auth, the
attention mask of a step, TLS with a self-signed certificate, the Host allow-list and Content-Type checks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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
from stip.runtime.bundle import LocalDeployment, Server
from stip.runtime.errors import StipError
from stip.runtime.generate import StipGenerator, generate_plaintext
from stip.runtime.remote import RemoteClient, RemoteServer
from stip.runtime.verify import random_feeds

TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef",
          "carol": "carol-token-0123456789"}


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def write_tokens(path: Path, names: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# name token\n" + "".join(f"{n} {TOKENS[n]}\n" for n in names))
    tmp.chmod(0o600)
    os.replace(tmp, path)  # a new inode: the server sees the change even within one mtime tick


@pytest.fixture(scope="module")
def bundles(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("sec-bundles")
    out = {"bert": root / "bert", "gpt2": root / "gpt2"}
    compile_model(zoo.get("bert"), out["bert"])
    compile_model(zoo.get("gpt2-cache"), out["gpt2"], max_context=64)
    return out


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("auth") / "tokens"
    write_tokens(p, ["alice", "bob"])
    return p


@pytest.fixture(scope="module")
def auth_server(bundles, token_file, tmp_path_factory):
    srv = ServerProcess([f"bert={bundles['bert']}", f"gpt2={bundles['gpt2']}", "--device", "cpu",
                         "--auth-tokens", str(token_file), "--max-sequences-per-client", "2"],
                        tmp_path_factory.mktemp("logs") / "auth.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def open_server(bundles, tmp_path_factory):
    srv = ServerProcess([f"gpt2={bundles['gpt2']}", f"bert={bundles['bert']}", "--device", "cpu",
                         "--sequence-timeout", "600"], tmp_path_factory.mktemp("logs") / "open.log")
    yield srv
    srv.stop()


def test_tokens_missing_wrong_and_hot_reload(auth_server, bundles, token_file, tmp_path, zoo):
    url = auth_server.url
    ref = Server(bundles["bert"] / "server", device="cpu")
    feeds = bert_feeds(ref, 2, 5, seed=1)
    with httpx.Client(timeout=30) as http:
        assert http.get(url + "/v2/health/ready").status_code == 200  # probes stay open
        for path in ("/v2/models/bert", "/metrics", "/v2", "/v2/models/nope"):
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                            {"Authorization": f"Basic {TOKENS['alice']}"}, {"Authorization": "Bearer"}):
                r = http.get(url + path, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (path, r.text)
                assert "error" in r.json()
        r = http.post(url + "/v2/models/bert/infer", json=json_request(feeds))
        assert r.status_code == 401
        assert http.get(url + "/metrics", headers=bearer("alice")).status_code == 200
        got = decode_response(http.post(url + "/v2/models/bert/infer", json=json_request(feeds),
                                        headers=bearer("bob")))
        np.testing.assert_array_equal(got[ref.output_names[0]], ref.run(feeds)[ref.output_names[0]])

        def wait_for(name: str, status: int) -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if http.get(url + "/v2/models/bert", headers=bearer(name)).status_code == status:
                    return
                time.sleep(0.2)
            raise AssertionError(f"{name} did not get {status} within 10 s")

        write_tokens(token_file, ["alice", "carol"])  # carol added, bob revoked, no restart
        wait_for("carol", 200)
        wait_for("bob", 401)
        token_file.write_text("alice short\n")  # a broken edit refuses everyone rather than keep stale tokens
        wait_for("alice", 503)
        write_tokens(token_file, ["alice", "bob"])
        wait_for("alice", 200)
        wait_for("bob", 200)

    # the Python client and the CLI with a token
    (tmp_path / "token").write_text(TOKENS["alice"] + "\n")
    with pytest.raises(StipError, match="cannot get model metadata"):
        RemoteClient(bundles["bert"] / "client", url, "bert")
    model_feeds = random_feeds(zoo.get("bert"), batch=2, seq=6)
    remote = RemoteClient(bundles["bert"] / "client", url, "bert", token=TOKENS["alice"])
    want = LocalDeployment(bundles["bert"], device="cpu").run(model_feeds)
    got = remote.run(model_feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6)
    np.savez(tmp_path / "in.npz", **model_feeds)
    cli = [sys.executable, "-m", "stip.compiler.cli", "run", str(bundles["bert"] / "client"), "--server", url,
           "--model-name", "bert", "--inputs", str(tmp_path / "in.npz")]
    r = subprocess.run([*cli, "--token-file", str(tmp_path / "token"), "-o", str(tmp_path / "out.npz")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Bearer" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _step(http, url, name, feeds, sid, **params):
    return http.post(url + "/v2/models/gpt2/infer", json=json_request(feeds, sequence_id=sid, **params),
                     headers=bearer(name))


def test_sequences_are_isolated_between_clients(auth_server, bundles):
    """B can neither observe, continue, restart nor end A's sequence; a live id and a never-used id give B
    identical answers; A's generation stays bit-exact throughout. With auth, small ids are fine (per owner)."""
    url = auth_server.url
    steps, _ = decoder_steps(bundles["gpt2"], [5, 9, 17, 3], 6)
    logits = "logits.stip_server"
    with httpx.Client(timeout=30) as http:
        r = _step(http, url, "alice", steps[0][0], 1, sequence_start=True)
        np.testing.assert_array_equal(decode_response(r)[logits], steps[0][1][logits])
        probes = []
        for sid in (1, 2):  # 1 is alice's live id, 2 was never used
            answers = [_step(http, url, "bob", steps[1][0], sid),
                       _step(http, url, "bob", steps[1][0], sid, sequence_end=True)]
            probes.append([(a.status_code, a.content) for a in answers])
        assert probes[0] == probes[1], probes
        assert probes[0][0][0] == 400 and b"unknown sequence id" in probes[0][0][1]
        # B ends "its" sequence 1 with an end-only request: answered like any other id, A's is untouched
        ends = [http.post(url + "/v2/models/gpt2/infer", headers=bearer("bob"),
                          json={"inputs": [], "parameters": {"sequence_id": sid, "sequence_end": True}})
                for sid in (1, 2)]
        assert [(e.status_code, e.content) for e in ends][0] == (ends[1].status_code, ends[1].content)
        assert ends[0].status_code == 200
        # B restarts id 1: B gets a sequence of its own; A's context is not replaced
        r = _step(http, url, "bob", steps[0][0], 1, sequence_start=True)
        np.testing.assert_array_equal(decode_response(r)[logits], steps[0][1][logits])
        for k in range(1, len(steps)):
            r = _step(http, url, "alice", steps[k][0], 1, sequence_end=k == len(steps) - 1)
            np.testing.assert_array_equal(decode_response(r)[logits], steps[k][1][logits])
        # B's own sequence 1 still continues from B's start
        r = _step(http, url, "bob", steps[1][0], 1, sequence_end=True)
        np.testing.assert_array_equal(decode_response(r)[logits], steps[1][1][logits])
        # one client cannot take every slot: alice's third live sequence is refused, bob still gets one
        for sid in (10, 11):
            assert _step(http, url, "alice", steps[0][0], sid, sequence_start=True).status_code == 200
        r = _step(http, url, "alice", steps[0][0], 12, sequence_start=True)
        assert r.status_code == 429 and "per client" in r.json()["error"]
        assert _step(http, url, "bob", steps[0][0], 10, sequence_start=True).status_code == 200
        for name, sid in (("alice", 10), ("alice", 11), ("bob", 10)):
            r = http.post(url + "/v2/models/gpt2/infer", headers=bearer(name),
                          json={"inputs": [], "parameters": {"sequence_id": sid, "sequence_end": True}})
            assert r.status_code == 200
        # /metrics (same auth) shows counts only: no ids, no owners
        text = http.get(url + "/metrics", headers=bearer("bob")).text
        assert "alice" not in text and 'stip_live_sequences{model="gpt2"} 0.0' in text


def test_attention_mask_must_cover_cache_exactly(open_server, bundles):
    url = open_server.url
    steps, _ = decoder_steps(bundles["gpt2"], [4, 8, 15], 3)
    logits = "logits.stip_server"
    sid = BIG + 77
    with httpx.Client(timeout=30) as http:
        r = http.post(url + "/v2/models/gpt2/infer", json=json_request(steps[0][0], sequence_id=sid,
                                                                       sequence_start=True))
        np.testing.assert_array_equal(decode_response(r)[logits], steps[0][1][logits])
        good = steps[1][0]
        mask = next(n for n in good if good[n].dtype == np.int64 and good[n].ndim == 2)
        for length in (good[mask].shape[1] - 1, good[mask].shape[1] + 1, 1):
            bad = {**good, mask: np.ones((1, length), np.int64)}
            r = http.post(url + "/v2/models/gpt2/infer", json=json_request(bad, sequence_id=sid))
            assert r.status_code == 400 and "must be exactly" in r.json()["error"], r.text
        for k in (1, 2):  # the refused steps moved nothing
            r = http.post(url + "/v2/models/gpt2/infer", json=json_request(steps[k][0], sequence_id=sid,
                                                                           sequence_end=k == 2))
            np.testing.assert_array_equal(decode_response(r)[logits], steps[k][1][logits])


def test_open_server_requires_unguessable_ids_and_close_frees_at_once(open_server, bundles, zoo):
    url = open_server.url
    steps, _ = decoder_steps(bundles["gpt2"], [1, 2, 3], 1)
    with httpx.Client(timeout=30) as http:
        for sid in (1, 99, (1 << 32) - 1, "short-id"):
            r = http.post(url + "/v2/models/gpt2/infer", json=json_request(steps[0][0], sequence_id=sid,
                                                                           sequence_start=True))
            assert r.status_code == 400 and "auth-tokens" in r.json()["error"], (sid, r.text)
        r = http.post(url + "/v2/models/gpt2/infer", json=json_request(steps[0][0], sequence_id=1 << 32,
                                                                       sequence_start=True, sequence_end=True))
        assert r.status_code == 200

        def live() -> float:
            text = http.get(url + "/metrics").text
            return float(next(ln.split()[-1] for ln in text.splitlines()
                              if ln.startswith('stip_live_sequences{model="gpt2"}')))

        gen = StipGenerator(bundles["gpt2"] / "client", server=RemoteServer(url, "gpt2"))
        it = gen.generate([5, 9, 17], 20)
        first = [next(it), next(it)]
        assert live() == 1
        it.close()  # the user stops early: RemoteSequence.close() ends the sequence now (the timeout is 600 s)
        assert live() == 0
        assert first == generate_plaintext(zoo.get("gpt2-cache"), [5, 9, 17], 2)


def _self_signed(dir: Path) -> tuple[Path, Path]:
    cert, key = dir / "cert.pem", dir / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                        "subjectAltName=IP:127.0.0.1,DNS:localhost"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate here: {r.stderr[:200]}")
    return cert, key


def test_tls(bundles, tmp_path, zoo):
    cert, key = _self_signed(tmp_path)
    srv = ServerProcess([str(bundles["bert"]), "--device", "cpu", "--tls-cert", str(cert), "--tls-key", str(key)],
                        tmp_path / "tls.log", verify=str(cert))
    try:
        assert srv.url.startswith("https://")
        ref = Server(bundles["bert"] / "server", device="cpu")
        feeds = bert_feeds(ref, 1, 4, seed=2)
        r = httpx.post(srv.url + "/v2/models/stip/infer", json=json_request(feeds), verify=str(cert))
        np.testing.assert_array_equal(decode_response(r)[ref.output_names[0]], ref.run(feeds)[ref.output_names[0]])
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no answer
            httpx.get(srv.url.replace("https://", "http://") + "/v2/health/ready", timeout=5)
        with pytest.raises(httpx.HTTPError):  # an unknown CA is refused by the client
            httpx.get(srv.url + "/v2/health/ready", timeout=5)
        model_feeds = random_feeds(zoo.get("bert"), batch=1, seq=5)
        got = RemoteClient(bundles["bert"] / "client", srv.url, ca_cert=cert).run(model_feeds)
        want = LocalDeployment(bundles["bert"], device="cpu").run(model_feeds)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-6)
        with pytest.raises(StipError, match="cannot get model metadata"):
            RemoteClient(bundles["bert"] / "client", srv.url)
        assert srv.alive()
    finally:
        srv.stop()
    r = subprocess.run([sys.executable, "-m", "stip.compiler.cli", "serve", str(bundles["bert"]), "--tls-cert",
                        str(cert)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--tls-key" in r.stderr


def test_host_allow_list_and_content_type(open_server, bundles):
    url = open_server.url
    port = url.rsplit(":", 1)[1]
    ref = Server(bundles["bert"] / "server", device="cpu")
    feeds = bert_feeds(ref, 1, 3, seed=3)
    want = ref.run(feeds)[ref.output_names[0]]
    body, headers = binary_request(feeds)
    with httpx.Client(timeout=30) as http:
        for host in (f"evil.example:{port}", "attacker.test", "127.0.0.2", f"[::2]:{port}", "localhost.evil.example"):
            r = http.get(url + "/v2/models/bert", headers={"Host": host})
            assert r.status_code == 400 and "Host header" in r.json()["error"], host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert http.get(url + "/v2/models/bert", headers={"Host": host}).status_code == 200, host
        import json

        text = json.dumps(json_request(feeds))
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                      "application/octet-stream", "application/xml"):
            r = http.post(url + "/v2/models/bert/infer", content=text, headers={"Content-Type": ctype})
            assert r.status_code == 415 and "Content-Type" in r.json()["error"], ctype
        for ctype in ("application/json", "application/json; charset=utf-8", None):
            r = http.post(url + "/v2/models/bert/infer", content=text,
                          headers={"Content-Type": ctype} if ctype else {})
            np.testing.assert_array_equal(decode_response(r)[ref.output_names[0]], want)
        r = http.post(url + "/v2/models/bert/infer", content=body,
                      headers={**headers, "Content-Type": "application/octet-stream"})
        np.testing.assert_array_equal(decode_response(r)[ref.output_names[0]], want)
        assert HEADER in headers


def test_bad_serve_flags_are_one_line_errors(bundles, tmp_path):
    bad_tokens = tmp_path / "tokens"
    bad_tokens.write_text("alice alice-token-0123456789abcdef\nbob short\n")
    dup = tmp_path / "dup"
    dup.write_text("alice alice-token-0123456789abcdef\nalice other-token-0123456789abcdef\n")
    pem = [str(tmp_path / "c.pem"), str(tmp_path / "k.pem")]
    for args, needle in ((["--max-memory", "lots"], "--max-memory lots"),
                         (["--auth-tokens", str(bad_tokens)], "tokens:2"),
                         (["--auth-tokens", str(dup)], "appears twice"),
                         (["--auth-tokens", str(tmp_path / "missing")], "cannot read"),
                         (["--tls-cert", pem[0], "--tls-key", pem[1]], "no such file"),
                         (["--max-connections", "0"], "--max-connections"),
                         (["--header-timeout", "0"], "--header-timeout")):
        r = subprocess.run([sys.executable, "-m", "stip.compiler.cli", "serve", str(bundles["bert"]), "--port", "0",
                            *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
