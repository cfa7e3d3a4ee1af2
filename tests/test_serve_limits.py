"""`stip serve` under pressure, against real server processes on loopback: the memory budget (413 for a request
that can never fit, 503 while the budget is in use, KV caches counted, RSS bounded, the estimate checked against
measured RSS), the JSON response cap and NaN outputs, slow-drip headers and bodies, the connection cap, the cap on
buffered body bytes, and large JSON parsed without stalling health checks. Every loop is bounded in count and time."""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from serve_helpers import BIG, HEADER, ServerProcess, bert_feeds, binary_request, decode_response, json_request

from stip.compiler.pipeline import compile_model
from stip.runtime.bundle import Server
from stip.runtime.serve_limits import Limits
from stip.runtime.serve_model import Model
from stip.runtime.serve_protocol import parse_request

BUDGET = 1 << 30


@pytest.fixture(scope="module")
def bundles(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("limit-bundles")
    out = {"bert": root / "bert", "llama": root / "llama"}
    compile_model(zoo.get("bert"), out["bert"])
    compile_model(zoo.get("llama-cache"), out["llama"], max_context=64)
    return out


@pytest.fixture(scope="module")
def budget_server(bundles, tmp_path_factory):
    srv = ServerProcess([f"bert={bundles['bert']}", f"llama={bundles['llama']}", "--device", "cpu", "--workers", "2",
                         "--max-memory", "1GiB", "--max-json-response-bytes", "1MiB"],
                        tmp_path_factory.mktemp("logs") / "budget.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def edge_server(bundles, tmp_path_factory):
    srv = ServerProcess([f"bert={bundles['bert']}", "--device", "cpu", "--header-timeout", "1", "--body-timeout", "2",
                         "--max-connections", "8", "--max-request-bytes", "1000000", "--max-buffered-bytes",
                         "2000000"], tmp_path_factory.mktemp("logs") / "edge.log")
    yield srv
    srv.stop()


def gauge(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(name + " ")))


class RssPeak:
    """The server's peak RSS while the block runs, sampled every 2 ms."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = False
        self.thread = threading.Thread(target=self._sample)
        self.thread.start()
        return self

    def _sample(self):
        deadline = time.monotonic() + 120
        while not self.stop and time.monotonic() < deadline:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join(10)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def test_memory_budget(budget_server, bundles):
    url, pid = budget_server.url, budget_server.proc.pid
    ref = Server(bundles["bert"] / "server", device="cpu")
    model = Model("bert", bundles["bert"], device="cpu", limits=Limits(max_memory=BUDGET))

    def request(batch, seq, seed=0):
        feeds = bert_feeds(ref, batch, seq, seed)
        body, headers = binary_request(feeds, ref.output_names)
        return feeds, body, headers, model.estimate(parse_request(model.sig, body, headers[HEADER])[0], 0)

    # a request that can never fit: 413 before it runs, and the server's memory does not move
    _, body, headers, est = request(16, 2048)
    assert est > BUDGET
    with RssPeak(pid) as rss:
        r = httpx.post(url + "/v2/models/bert/infer", content=body, headers=headers, timeout=60)
    assert r.status_code == 413 and "--max-memory" in r.json()["error"], r.text
    assert rss.growth < len(body) + (64 << 20), rss.growth

    # one that fits, measured: the estimate must cover the real peak
    feeds, body, headers, est_big = request(2, 2048, seed=1)
    _, small_body, small_headers, est_small = request(1, 2048, seed=2)
    assert est_big < BUDGET < est_big + est_small and est_small < BUDGET
    results = {}

    def big():
        results["big"] = httpx.post(url + "/v2/models/bert/infer", content=body, headers=headers, timeout=120)

    with RssPeak(pid) as rss:
        t = threading.Thread(target=big)
        t.start()
        deadline = time.monotonic() + 30
        while gauge(url, "stip_memory_budget_used_bytes") < est_big and time.monotonic() < deadline:
            time.sleep(0.01)
        # the budget is in use: a request that would fit alone gets 503 at once
        r = httpx.post(url + "/v2/models/bert/infer", content=small_body, headers=small_headers, timeout=60)
        t.join(120)
    assert r.status_code == 503 and "memory budget in use" in r.json()["error"] and r.headers["retry-after"]
    np.testing.assert_array_equal(decode_response(results["big"])[ref.output_names[0]],
                                  ref.run(feeds)[ref.output_names[0]])
    print(f"memory estimate {est_big / 2**20:.0f} MiB, measured RSS growth {rss.growth / 2**20:.0f} MiB "
          f"(ratio {est_big / rss.growth:.2f})")
    assert rss.growth < est_big, (rss.growth, est_big)
    assert gauge(url, "stip_memory_budget_used_bytes") == 0
    r = httpx.post(url + "/v2/models/bert/infer", content=small_body, headers=small_headers, timeout=120)
    assert r.status_code == 200

    # live KV caches count against the budget, exactly their bytes, until they end
    llama = Server(bundles["llama"] / "server", device="cpu")
    emb = llama.input_names[0]
    batch, length = 4, 10
    step = {emb: np.random.default_rng(3).standard_normal((batch, length, 32)).astype(np.float32),
            "attention_mask": np.ones((batch, length), np.int64),
            "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1))}
    per_token = sum(4 * int(np.prod([d for a, d in enumerate(i.shape) if a not in (0, 2)]))
                    for i in llama.session.get_inputs() if i.name.startswith("past_key_values"))
    for k in range(3):
        r = httpx.post(url + "/v2/models/llama/infer", timeout=60,
                       json=json_request(step, sequence_id=BIG + k, sequence_start=True, binary_data_output=True))
        assert r.status_code == 200, r.text
        assert gauge(url, "stip_memory_budget_used_bytes") == (k + 1) * batch * length * per_token
    for k in range(3):
        r = httpx.post(url + "/v2/models/llama/infer", timeout=60,
                       json={"inputs": [], "parameters": {"sequence_id": BIG + k, "sequence_end": True}})
        assert r.status_code == 200
    assert gauge(url, "stip_memory_budget_used_bytes") == 0


def test_json_response_cap_nan_and_parsing_off_the_loop(budget_server, bundles):
    url = budget_server.url
    ref = Server(bundles["bert"] / "server", device="cpu")
    feeds = bert_feeds(ref, 4, 600, seed=4)  # 76,800 values of JSON output, over 1 MiB / 16 B
    r = httpx.post(url + "/v2/models/bert/infer", json=json_request(feeds), timeout=60)
    assert r.status_code == 413 and "binary" in r.json()["error"], r.text
    r = httpx.post(url + "/v2/models/bert/infer", json=json_request(feeds, binary_data_output=True), timeout=60)
    np.testing.assert_array_equal(decode_response(r)[ref.output_names[0]], ref.run(feeds)[ref.output_names[0]])
    # huge finite inputs make NaN outputs: JSON cannot carry them (422, pointing to binary); binary carries them
    emb = next(iter(feeds))
    nan_feeds = {emb: np.full((1, 3, 32), 3e38, np.float32), "attention_mask": np.ones((1, 3), np.int64)}
    nan_feeds[emb][0, 0, 0] = -3e38
    r = httpx.post(url + "/v2/models/bert/infer", json=json_request(nan_feeds), timeout=60)
    assert r.status_code == 422 and "NaN" in r.json()["error"] and "binary" in r.json()["error"]
    got = decode_response(httpx.post(url + "/v2/models/bert/infer", timeout=60,
                                     json=json_request(nan_feeds, binary_data_output=True)))
    assert np.isnan(got[ref.output_names[0]]).any()
    # a 20 MiB JSON body is parsed in a child process: health checks stay fast meanwhile
    big = json.dumps(json_request(bert_feeds(ref, 16, 2048, seed=5), binary_data_output=True)).encode()
    assert len(big) > 16 << 20
    latencies, done = [], threading.Event()

    def probe():
        with httpx.Client(timeout=10) as c:
            for _ in range(2000):
                if done.is_set():
                    return
                t0 = time.perf_counter()
                assert c.get(url + "/v2/health/live").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)

    t = threading.Thread(target=probe)
    t.start()
    t0 = time.perf_counter()
    r = httpx.post(url + "/v2/models/bert/infer", content=big, headers={"Content-Type": "application/json"},
                   timeout=120)
    spent = time.perf_counter() - t0
    done.set()
    t.join(20)
    assert r.status_code == 413  # it parses fine, and then needs more than the budget
    # a parse that held the event loop would stall one probe for about the whole parse; relative, not timed
    assert len(latencies) >= 5 and max(latencies) < spent / 2, (spent, len(latencies), max(latencies))


def _connect(url: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[1].split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One whole HTTP response (headers and Content-Length bytes of body), or what came before the timeout."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                           if ln.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                return data
        try:
            chunk = sock.recv(65536)
        except OSError:
            return data
        if not chunk:
            return data
        data += chunk
    return data


def _closed(sock: socket.socket, wait: float = 0.0) -> bool:
    r, _, _ = select.select([sock], [], [], wait)
    if not r:
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except OSError:
        return True


def test_slow_drip_headers_and_body(edge_server):
    url = edge_server.url
    latencies = []
    stop = threading.Event()

    def others():
        with httpx.Client(timeout=5) as c:
            for _ in range(500):
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                assert c.get(url + "/v2/health/live").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.05)

    t = threading.Thread(target=others)
    t.start()
    try:
        sock = _connect(url)
        request = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 100
        t0 = time.monotonic()
        closed_after = None
        for k in range(len(request)):  # one byte every 0.1 s: 10 s to send; the server gives 1 s
            try:
                sock.send(request[k:k + 1])
            except OSError:
                closed_after = time.monotonic() - t0
                break
            if _closed(sock, 0.1):
                closed_after = time.monotonic() - t0
                break
        sock.close()
        assert closed_after is not None and 0.8 < closed_after < 3.0, closed_after

        # headers on time, then a body that drips: 408 after --body-timeout (2 s)
        sock = _connect(url)
        sock.sendall(b"POST /v2/models/bert/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        answer = b""
        for _ in range(60):
            try:
                sock.send(b" ")
            except OSError:
                break
            if select.select([sock], [], [], 0.1)[0]:
                answer = sock.recv(65536)
                break
        elapsed = time.monotonic() - t0
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408") and 1.5 < elapsed < 4.0, (answer[:80], elapsed)
    finally:
        stop.set()
        t.join(30)
    assert len(latencies) > 20 and max(latencies) < 0.5, max(latencies)


def test_connection_cap_and_buffered_bytes(edge_server, bundles):
    url = edge_server.url
    idle = [_connect(url) for _ in range(8)]
    try:
        time.sleep(0.2)
        extra = _connect(url)
        extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = _response(extra)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"max-connections" in answer, answer[:120]
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5  # the closed sockets leave the count: others are served again
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v2/health/live", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    else:
        raise AssertionError("not served again after the idle connections closed")

    # stalled uploads: two hold 1.8 MB of the 2 MB cap; a third is refused with 503 while they stall
    head = (b"POST /v2/models/bert/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 990000\r\n\r\n")
    stalled = []
    try:
        for _ in range(2):
            s = _connect(url)
            s.sendall(head + b" " * 900_000)
            stalled.append(s)
        time.sleep(0.3)
        third = _connect(url)
        third.sendall(head)
        third.settimeout(5)
        try:
            third.sendall(b" " * 900_000)
        except OSError:
            pass
        answer = _response(third)
        third.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"max-buffered-bytes" in answer, answer[:200]
        for s in stalled:  # and the stalled ones get 408 at the body timeout
            assert _response(s).startswith(b"HTTP/1.1 408")
    finally:
        for s in stalled:
            s.close()
    ref = Server(bundles["bert"] / "server", device="cpu")
    feeds = bert_feeds(ref, 1, 4, seed=6)
    r = httpx.post(url + "/v2/models/bert/infer", json=json_request(feeds), timeout=30)
    np.testing.assert_array_equal(decode_response(r)[ref.output_names[0]], ref.run(feeds)[ref.output_names[0]])


def test_connection_cap_per_client_address(bundles, tmp_path):
    """Four idle sockets from 127.0.0.1 use up that address's share; 127.0.0.2 (also loopback) is still served."""
    srv = ServerProcess([str(bundles["bert"]), "--device", "cpu", "--max-connections-per-client", "4",
                         "--header-timeout", "5"], tmp_path / "per-client.log")
    try:
        host, port = srv.url.rsplit("/", 1)[1].split(":")
        time.sleep(0.3)  # the readiness probe's connection is gone
        idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
        try:
            time.sleep(0.2)
            again = socket.create_connection((host, int(port)), timeout=5)
            again.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = _response(again)
            again.close()
            assert answer.startswith(b"HTTP/1.1 503") and b"per-client" in answer, answer[:160]
            other = socket.create_connection((host, int(port)), timeout=5, source_address=("127.0.0.2", 0))
            other.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = _response(other)
            other.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer[:160]
        finally:
            for s in idle:
                s.close()
    finally:
        srv.stop()


def test_killed_server_leaves_no_process_behind(bundles, tmp_path):
    """SIGKILL gives the server no chance to shut its JSON parser pool down: the parser child (and multiprocessing's
    resource tracker) must notice and exit rather than live on as orphans."""
    srv = ServerProcess([str(bundles["bert"]), "--device", "cpu"], tmp_path / "killed.log")
    try:
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        assert children, "the server starts its request-parser child at startup"
    finally:
        srv.proc.kill()
        srv.proc.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.cmdline()[-3:] for p in alive]
