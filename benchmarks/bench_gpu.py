"""Per-token latency of STIP against plaintext on onnxruntime's CUDA EP, fp16, with the KV cache on the device.

Both sides use IO binding: each step binds the new token's small inputs from the host, binds the previous step's
`present.*` OrtValues (already on the GPU) as `past_key_values.*`, and lets ORT allocate the new `present.*` on the
GPU; only the last position's logits come back to the host (the user needs them to pick the next token). So the KV
cache never makes a host round trip between tokens. On the STIP side, pre.onnx and post.onnx run on the user's
CPU as they would in deployment; the server graph runs on the GPU.

Not run in CI (no GPU there). Run on an H200 on 2026-11-29 through benchmarks/gpu_check.py (figures in
benchmarks/README.md). On a machine with an NVIDIA GPU and onnxruntime-gpu,

    python benchmarks/bench_gpu.py                        # the fp16 ~670M Llama of bench_llm_scale.py
    python benchmarks/bench_gpu.py --model m.onnx --bundle out/ --tokens 64 --prompt 128
    python benchmarks/bench_gpu.py --device cpu --model tiny.onnx   # the same IO-binding loop on the CPU EP

It refuses to report CUDA figures unless the sessions really run on CUDAExecutionProvider.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass
class Run:
    ids: list[int]
    times: list[float]
    providers: list[str]
    cache_device: str  # where the KV cache lived between tokens


def server_state(session, device: str):
    """`stip serve`'s own per-sequence state with IO binding (runtime.serve_sequences.BoundCache): each step binds
    the new token's inputs from the host and the previous `present.*` OrtValues as `past_key_values.*`, so the cache
    stays on the device, and only the non-cache outputs (logits) come back to the host."""
    from stip.runtime.axes import cache_past_axis
    from stip.runtime.bundle_format import pair_cache
    from stip.runtime.serve_sequences import BoundCache

    ins = {i.name: list(i.shape) for i in session.get_inputs()}
    outs = {o.name: list(o.shape) for o in session.get_outputs()}
    pairs = pair_cache(list(ins), list(outs), "graph")
    axis = next((cache_past_axis(ins[p], outs[o]) for p, o in pairs), None)
    return BoundCache(session, pairs, 1, device, axis)


class _Client:
    """pre before and post after each server step, on the user's CPU as in deployment."""

    def __init__(self, client_dir: Path):
        from stip.runtime.bundle import Client

        self.client = Client(client_dir, device="cpu")
        self.input_names = self.client.input_names

    def wrap(self, server_step, state):
        def step(feeds):
            to_server, kept = self.client.prepare(feeds, state.past_length)
            returned = {k: v[:, -1:] if v.ndim == 3 else v for k, v in server_step(to_server).items()}
            return self.client.finish(returned, kept)
        return step


def _greedy(session, device: str, prompt: list[int], tokens: int, client: _Client | None = None) -> Run:
    """Greedy decoding through the server state, each step timed; with a client, its pre and post run around
    every server step (STIP), and the time includes them."""
    from stip.runtime.generate import Sampler, decode

    state = server_state(session, device)

    def step(feeds):
        result, past = state.step(feeds)
        state.commit(past)
        return result

    times: list[float] = []
    run = client.wrap(step, state) if client else step
    names = client.input_names if client else state.inputs

    def timed(feeds):
        t = time.perf_counter()
        out = run(feeds)
        times.append(time.perf_counter() - t)
        return out

    ids = list(decode(timed, names, prompt, tokens, Sampler(), True))
    cache = next(iter(state.past.values())).device_name() if state.past else "none"
    return Run(ids, times, session.get_providers(), cache)


def plaintext(model: Path, device: str, prompt: list[int], tokens: int) -> Run:
    from stip.runtime.sessions import make_session

    return _greedy(make_session(model, device), device, prompt, tokens)


def stip(bundle: Path, device: str, prompt: list[int], tokens: int) -> Run:
    from stip.runtime.bundle_format import Layout
    from stip.runtime.sessions import make_session

    lay = Layout(bundle)
    return _greedy(make_session(lay.server_model, device), device, prompt, tokens, _Client(lay.client_dir))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="decoder with a KV cache (default: bench_llm_scale's fp16 Llama)")
    ap.add_argument("--bundle", type=Path, help="its compiled bundle (default: compiled here, into a temp dir)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length (random ids)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens to generate")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.model is None:
        import bench_llm_scale

        a.model = bench_llm_scale.model_for("fp16")
    if a.device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu on a GPU machine")
    from stip.passes.graph import load_graph
    from stip.runtime.verify import index_range

    vocab = index_range(load_graph(a.model), "input_ids")  # weights memory-mapped, not loaded
    prompt = np.random.default_rng(0).integers(0, vocab, size=a.prompt).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = a.bundle
        if bundle is None:
            from stip.compiler.pipeline import compile_model

            bundle = Path(tmp) / "bundle"
            compile_model(a.model, bundle, check=False)
        plain = plaintext(a.model, a.device, prompt, a.tokens)
        ours = stip(bundle, a.device, prompt, a.tokens)
    want = "CUDAExecutionProvider" if a.device == "cuda" else "CPUExecutionProvider"
    if plain.providers[0] != want or ours.providers[0] != want:
        raise SystemExit(f"sessions run on {plain.providers[0]} / {ours.providers[0]}, not {want}: no figures reported")
    res = {"device": a.device, "provider": want, "model": str(a.model), "prompt": a.prompt, "tokens": a.tokens,
           "greedy_equal": plain.ids == ours.ids,
           "plain_prefill_ms": 1e3 * plain.times[0], "stip_prefill_ms": 1e3 * ours.times[0],
           "plain_token_ms": 1e3 * statistics.median(plain.times[1:]),
           "stip_token_ms": 1e3 * statistics.median(ours.times[1:])}
    res["overhead"] = res["stip_token_ms"] / res["plain_token_ms"]
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{want}: prompt {a.prompt}, {a.tokens} tokens, greedy equal: {res['greedy_equal']}")
        print(f"  prefill  plaintext {res['plain_prefill_ms']:.2f} ms   STIP {res['stip_prefill_ms']:.2f} ms")
        print(f"  per token plaintext {res['plain_token_ms']:.2f} ms   STIP {res['stip_token_ms']:.2f} ms "
              f"({res['overhead']:.2f}x; STIP includes pre and post on the CPU)")
    return 0 if res["greedy_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
