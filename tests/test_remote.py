"""Three parties over the network: `stip serve` in its own process, the user's pre/post here, talking KServe v2
through the official tritonclient. Results must equal the in-process deployment."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from stip.compiler.pipeline import compile_model
from stip.passes.errors import StipError
from stip.runtime.bundle import LocalDeployment
from stip.runtime.generate import StipGenerator, generate_plaintext
from stip.runtime.launch import stip_server
from stip.runtime.remote import RemoteClient, RemoteServer
from stip.runtime.verify import random_feeds

PROMPT = [5, 9, 17, 3, 44]


@pytest.fixture(scope="module")
def bundles(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    out = {}
    for family in ("bert", "gpt2-cache", "llama-cache"):
        compile_model(zoo.get(family), root / family)
        out[family] = root / family
    return out


def test_encoder_over_http_equals_in_process(zoo, bundles):
    model, bundle = zoo.get("bert"), bundles["bert"]
    local = LocalDeployment(bundle, device="cpu")
    with stip_server(bundle / "server") as url:
        remote = RemoteClient(bundle / "client", url)
        for batch, seq in ((1, 7), (3, 21)):
            feeds = random_feeds(model, batch=batch, seq=seq, seed=seq)
            got, want = remote.run(feeds), local.run(feeds)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-6)
        assert remote.bytes_sent(feeds) < sum(v.nbytes for v in feeds.values()) * 10_000


@pytest.mark.parametrize("family", ["gpt2-cache", "llama-cache"])
def test_generation_over_http_equals_plaintext(zoo, bundles, family):
    bundle = bundles[family]
    with stip_server(bundle / "server") as url:
        gen = StipGenerator(bundle / "client", server=RemoteServer(url))
        got = list(gen.generate(PROMPT, 32))
        assert got == generate_plaintext(zoo.get(family), PROMPT, 32)
        assert got == list(StipGenerator(bundle, device="cpu").generate(PROMPT, 32))
        # several users at once, each with a sequence of its own on the server
        assert [list(gen.generate(PROMPT[: k + 2], 6)) for k in range(3)] == \
            [generate_plaintext(zoo.get(family), PROMPT[: k + 2], 6) for k in range(3)]


def test_key_id_checked_at_connect(zoo, bundles, tmp_path):
    other = tmp_path / "other"
    compile_model(zoo.get("bert"), other)
    with stip_server(bundles["bert"] / "server") as url:
        with pytest.raises(StipError, match="key id"):
            RemoteClient(other / "client", url)
        with pytest.raises(StipError, match="cannot get model metadata"):
            RemoteClient(bundles["bert"] / "client", url, model_name="nope")
        # what a real Triton offers instead of metadata parameters: the model config written by export-triton
        server = RemoteServer(url)
        assert server._key_id_from_config() == server.key_id


def test_cli_generate_and_run_with_server(zoo, bundles, tmp_path):
    bundle = bundles["gpt2-cache"]
    cli = [sys.executable, "-m", "stip.compiler.cli"]
    with stip_server(bundle / "server") as url:
        r = subprocess.run([*cli, "generate", str(bundle / "client"), "--server", url, "--prompt-ids",
                            ",".join(map(str, PROMPT)), "--max-new-tokens", "8"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert [int(x) for x in r.stdout.split()] == generate_plaintext(zoo.get("gpt2-cache"), PROMPT, 8)
    feeds = random_feeds(zoo.get("bert"), batch=2, seq=5)
    np.savez(tmp_path / "in.npz", **feeds)
    with stip_server(bundles["bert"] / "server") as url:
        r = subprocess.run([*cli, "run", str(bundles["bert"] / "client"), "--server", url, "--inputs",
                            str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    want = LocalDeployment(bundles["bert"], device="cpu").run(feeds)
    with np.load(tmp_path / "out.npz") as z:
        for k in want:
            np.testing.assert_allclose(z[k], want[k], atol=1e-6)


def _live_sequences(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(r"^stip_live_sequences(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    assert m, text[:2000]
    return float(m.group(1))


SLOW_CLIENT = """
import sys, time
from stip.runtime.generate import StipGenerator
from stip.runtime.remote import RemoteServer
gen = StipGenerator(sys.argv[1], server=RemoteServer(sys.argv[2]))
for token in gen.generate([1, 2, 3], 50):
    print(token, flush=True)
    time.sleep(0.5)  # a user reading slowly; killed mid-generation below
"""


def test_killed_client_sequence_is_freed_after_idle_timeout(bundles):
    bundle = bundles["gpt2-cache"]
    with stip_server(bundle / "server", "--sequence-timeout", "2") as url:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_CLIENT, str(bundle / "client"), url],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip().isdigit()  # generation has started: the server holds its cache
        assert _live_sequences(url) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while _live_sequences(url) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _live_sequences(url) == 0
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
