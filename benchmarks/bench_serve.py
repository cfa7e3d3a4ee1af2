"""End-to-end latency over loopback: user pre -> HTTP (KServe v2, binary tensors) -> `stip serve` -> post, against
plaintext onnxruntime in-process, measured interleaved in one run. Also the bytes each request / token sends.

    python benchmarks/bench_serve.py [--reps 30] [--tokens 32] [--threads 1] [--quick] [--json]

Goal (issue 4): MiniLM at sequence 128, end to end / plaintext <= 1.15. GPT-2-small generation is reported per
token (the logits of a 50257-word vocabulary come back on every step with --head server).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402

from stip.runtime.launch import stip_server  # noqa: E402


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def bench_encoder(reps: int, threads: int) -> dict:
    from stip.compiler.pipeline import compile_model
    from stip.runtime.remote import RemoteClient
    from stip.runtime.sessions import make_session

    model = models.model_path("minilm")
    feeds = models.feeds(batch=1, seq=128)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        compile_model(model, bundle)
        plain = make_session(model, "cpu", threads=threads)
        with stip_server(bundle / "server", "--threads", str(threads), "--workers", "1") as url:
            remote = RemoteClient(bundle / "client", url)
            for _ in range(3):
                plain.run(None, feeds)
                remote.run(feeds)
            t_plain, t_remote = [], []
            for _ in range(reps):
                t = time.perf_counter()
                ref = plain.run(None, feeds)[0]
                t_plain.append(time.perf_counter() - t)
                t = time.perf_counter()
                got = remote.run(feeds)["last_hidden_state"]
                t_remote.append(time.perf_counter() - t)
            to_server, _ = remote.client.prepare(feeds)
            sent = sum(v.nbytes for v in to_server.values())
            received = sum(v.nbytes for v in remote.server.run(to_server).values())
    ratios = [r / p for r, p in zip(t_remote, t_plain)]
    return {"model": "minilm", "seq": 128, "plaintext_ms": _median_ms(t_plain), "remote_ms": _median_ms(t_remote),
            "ratio": statistics.median(ratios), "bytes_sent": sent, "bytes_received": received,
            "max_abs_diff": float(np.abs(ref - got).max())}


def bench_decoder(name: str, tokens: int, threads: int, head: str) -> dict:
    from stip.compiler.pipeline import compile_model
    from stip.runtime.cache import CachedSession
    from stip.runtime.generate import Sampler, StipGenerator, decode
    from stip.runtime.remote import RemoteServer
    from stip.runtime.sessions import make_session

    model = models.decoder_path(name)
    prompt = models.prompt_ids(16)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        compile_model(model, bundle, head=head)
        with stip_server(bundle / "server", "--threads", str(threads), "--workers", "1") as url:
            gen = StipGenerator(bundle / "client", server=RemoteServer(url))
            list(gen.generate(prompt, 4))  # warm-up
            stamps = [time.perf_counter()]
            got = []
            for tok in gen.generate(prompt, tokens):
                got.append(tok)
                stamps.append(time.perf_counter())
            seq = CachedSession(make_session(model, "cpu", threads=threads))
            pstamps = [time.perf_counter()]
            ref = []
            for tok in decode(seq.run, seq.inputs, prompt, tokens, Sampler(), True):
                ref.append(tok)
                pstamps.append(time.perf_counter())
            feeds = {"input_ids": np.array([[ref[-1]]]), "attention_mask": np.ones((1, len(prompt) + 1), np.int64)}
            to_server, _ = gen.client.prepare({k: v for k, v in feeds.items() if k in gen.client.input_names}, 16)
            sent = sum(v.nbytes for v in to_server.values())
            out_names = RemoteServer(url).output_names
    per_tok = np.diff(stamps)[1:]  # the first step is the prefill
    per_tok_plain = np.diff(pstamps)[1:]
    vocab_or_hidden = 4 * (models.GPT2_VOCAB if head == "server" else 768)
    return {"model": name, "head": head, "tokens": tokens, "identical_greedy": got == ref,
            "plaintext_ms_per_token": float(np.median(per_tok_plain) * 1e3),
            "remote_ms_per_token": float(np.median(per_tok) * 1e3),
            "ratio": float(np.median(per_tok) / np.median(per_tok_plain)),
            "bytes_sent_per_token": sent, "bytes_received_per_token": vocab_or_hidden, "server_outputs": out_names}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads on both sides (default 1)")
    ap.add_argument("--quick", action="store_true", help="gpt2-mini and fewer repetitions")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    reps, tokens, dec = (8, 8, "gpt2-mini") if a.quick else (a.reps, a.tokens, "gpt2-small")
    enc = bench_encoder(reps, a.threads)
    decs = [bench_decoder(dec, tokens, a.threads, head) for head in ("server", "client")]
    if a.json:
        print(json.dumps({"encoder": enc, "decoder": decs}, indent=2))
        return 0
    print(f"MiniLM seq 128, batch 1 ({reps} reps, {a.threads} thread(s)): plaintext {enc['plaintext_ms']:.2f} ms, "
          f"over loopback {enc['remote_ms']:.2f} ms, ratio {enc['ratio']:.3f} (goal <= 1.15); "
          f"sent {enc['bytes_sent']:,} B, received {enc['bytes_received']:,} B; max|diff| {enc['max_abs_diff']:.1e}")
    for d in decs:
        print(f"{d['model']} --head {d['head']}: plaintext {d['plaintext_ms_per_token']:.2f} ms/token, over "
              f"loopback {d['remote_ms_per_token']:.2f} ms/token, ratio {d['ratio']:.3f}; per token sent "
              f"{d['bytes_sent_per_token']:,} B, received {d['bytes_received_per_token']:,} B; identical greedy "
              f"tokens: {d['identical_greedy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
