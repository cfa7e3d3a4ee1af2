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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


class BoundCache:
    """A decoder session run through IO binding; its KV cache stays where the device put it."""

    def __init__(self, session, device: str, batch: int = 1):
        import onnxruntime as ort

        from stip.runtime.bundle_format import pair_cache
        from stip.runtime.cache import empty_past

        self.session, self.device = session, device
        ins = {i.name: i for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]
        self.pairs = pair_cache(list(ins), self.outputs, "graph")
        self.cache_out = {o: p for p, o in self.pairs}
        self.inputs = [n for n in ins if n not in dict(self.pairs)]
        self.past = {p: ort.OrtValue.ortvalue_from_numpy(empty_past(ins[p], batch), device, 0) for p, _ in self.pairs}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = self.session.io_binding()
        for n in self.inputs:
            b.bind_cpu_input(n, np.ascontiguousarray(feeds[n]))
        for p, v in self.past.items():
            b.bind_ortvalue_input(p, v)
        for o in self.outputs:
            b.bind_output(o, self.device if o in self.cache_out else "cpu", 0)
        self.session.run_with_iobinding(b)
        out = {}
        for name, v in zip(self.outputs, b.get_outputs()):
            if name in self.cache_out:
                self.past[self.cache_out[name]] = v  # stays on the device for the next token
            else:
                out[name] = v.numpy()
        return out


def _timed(fn, times: list[float]):
    def run(feeds):
        t = time.perf_counter()
        out = fn(feeds)
        times.append(time.perf_counter() - t)
        return out
    return run


def plaintext(model: Path, device: str, prompt: list[int], tokens: int) -> tuple[list[int], list[float], list[str]]:
    from stip.runtime.generate import Sampler, decode
    from stip.runtime.sessions import make_session

    sess = make_session(model, device)
    seq = BoundCache(sess, device)
    times: list[float] = []
    ids = list(decode(_timed(seq.run, times), seq.inputs, prompt, tokens, Sampler(), True))
    return ids, times, sess.get_providers()


def stip(bundle: Path, device: str, prompt: list[int], tokens: int) -> tuple[list[int], list[float], list[str]]:
    from stip.runtime.bundle import Client
    from stip.runtime.bundle_format import Layout
    from stip.runtime.generate import Sampler, decode
    from stip.runtime.sessions import make_session

    lay = Layout(bundle)
    client = Client(lay.client_dir, device="cpu")
    sess = make_session(lay.server_model, device)
    seq = BoundCache(sess, device)
    fed = [0]

    def step(feeds):
        to_server, kept = client.prepare(feeds, fed[0])
        returned = {k: v[:, -1:] if v.ndim == 3 else v for k, v in seq.run(to_server).items()}
        fed[0] += int(feeds["input_ids"].shape[1])
        return client.finish(returned, kept)

    times: list[float] = []
    ids = list(decode(_timed(step, times), client.input_names, prompt, tokens, Sampler(), True))
    return ids, times, sess.get_providers()


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
        plain_ids, plain_t, plain_prov = plaintext(a.model, a.device, prompt, a.tokens)
        stip_ids, stip_t, stip_prov = stip(bundle, a.device, prompt, a.tokens)
    want = "CUDAExecutionProvider" if a.device == "cuda" else "CPUExecutionProvider"
    if plain_prov[0] != want or stip_prov[0] != want:
        raise SystemExit(f"sessions run on {plain_prov[0]} / {stip_prov[0]}, not {want}: no figures reported")
    res = {"device": a.device, "provider": want, "model": str(a.model), "prompt": a.prompt, "tokens": a.tokens,
           "greedy_equal": plain_ids == stip_ids,
           "plain_prefill_ms": 1e3 * plain_t[0], "stip_prefill_ms": 1e3 * stip_t[0],
           "plain_token_ms": 1e3 * statistics.median(plain_t[1:]),
           "stip_token_ms": 1e3 * statistics.median(stip_t[1:])}
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
