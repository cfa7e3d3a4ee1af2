"""The CUDA checks, in one run on a machine with an NVIDIA GPU and onnxruntime-gpu (not CI: CI has no GPU).

1. Equivalence on the CUDA EP: tiny BERT, GPT-2 and Llama (fp32, and the Llama in fp16) are compiled here, then
   `verify(device="cuda")` runs the original and the bundle's server graph on the GPU (pre/post on the GPU too);
   the figures are reported against verify's CPU tolerances and the dtype's self-check tolerance.
2. The server's IO-binding path: `stip serve`'s own per-sequence state (serve_sequences.BoundCache, which keeps
   the permuted KV cache on the device as OrtValues; bench_gpu drives it) decodes greedily on CUDA; the tokens
   must equal the original model's greedy tokens on the CPU and on CUDA.
3. The benchmark (benchmarks/bench_gpu.py): per-token latency of STIP against plaintext, fp16, on the CUDA EP.

    python benchmarks/gpu_check.py [--skip-bench] [--json OUT.json]

Every figure comes from sessions that really run on CUDAExecutionProvider; the script refuses otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

TOKENS = 16


def _tiny_models(work: Path) -> dict[str, Path]:
    import export_models as em
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out = {}
    out["bert"] = work / "bert.onnx"
    em.export_bert(out["bert"], dynamo=False, config=em.tiny_bert_config(hidden_size=64, intermediate_size=128))
    out["gpt2"] = work / "gpt2.onnx"
    em.export_gpt2(out["gpt2"], dynamo=False, cache=True, config=em.tiny_gpt2_config(vocab_size=512, n_embd=64))
    out["llama"] = work / "llama.onnx"
    em.export_llama(out["llama"], dynamo=False, cache=True,
                    config=em.tiny_llama_config(vocab_size=512, hidden_size=64, intermediate_size=128, head_dim=16))
    out["llama-fp16"] = work / "llama16.onnx"
    m = convert_float_to_float16(onnx.load(str(out["llama"])), keep_io_types=False, disable_shape_infer=True)
    onnx.save(m, str(out["llama-fp16"]))
    return out


def _cli(argv: list[str]) -> int:
    """The CLI as a user runs it (its output goes to this run's log)."""
    from stip.compiler.cli import main

    try:
        return main(argv) or 0
    except SystemExit as e:
        return int(e.code or 0)


def equivalence(work: Path, device: str) -> list[dict]:
    import bench_gpu

    from stip.compiler.pipeline import compile_model
    from stip.compiler.selfcheck import output_tolerances
    from stip.runtime.verify import verify

    rows = []
    for name, model in _tiny_models(work).items():
        bundle = work / f"{name}-bundle"
        compile_model(model, bundle, check=True)
        past = 3 if name != "bert" else 0
        tol = max(output_tolerances(model).values())
        for atol in sorted({1e-4, tol}):
            checks = verify(bundle, model, batch=2, seq=7, past=past, device=device, atol=atol, rtol=atol)
            rows.append({"model": name, "atol": atol, "ok": all(c.ok for c in checks),
                         "max_abs": max(c.max_abs for c in checks),
                         "max_rel_scale": max(c.max_abs / max(1.0, c.scale) for c in checks),
                         "argmax_agree": min(c.argmax_agree for c in checks)})
        cli_rc = _cli(["verify", str(bundle), "--original", str(model), "--device", device, "--past", str(past)])
        rows.append({"model": name, "cli": "stip verify --device " + device, "rc": cli_rc})
        if name == "bert":
            continue
        from stip.passes.graph import load_graph
        from stip.runtime.verify import index_range

        vocab = index_range(load_graph(model), "input_ids")
        prompt = np.random.default_rng(1).integers(0, vocab, size=5).tolist()
        cpu = bench_gpu.plaintext(model, "cpu", prompt, TOKENS).ids
        gpu = bench_gpu.plaintext(model, device, prompt, TOKENS).ids
        run = bench_gpu.stip(bundle, device, prompt, TOKENS)  # the server's own IO-bound sequence state
        served, providers, cache_on = run.ids, run.providers, run.cache_device
        gen_rc = _cli(["generate", str(bundle), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "8",
                       "--device", device])
        rows.append({"model": name, "cli": "stip generate --device " + device, "rc": gen_rc})
        rows.append({"model": name, "greedy_cpu_plain": cpu, "greedy_cuda_plain": gpu, "greedy_cuda_served": served,
                     "served_equal_cuda_plain": served == gpu, "served_equal_cpu_plain": served == cpu,
                     "server_providers": providers, "cache_device": cache_on})
    return rows


def bench(model: Path | None, device: str, res: dict) -> None:
    """bench_gpu twice (a short and a longer prompt) over one compile of the model."""
    import contextlib
    import io

    import bench_gpu
    import bench_llm_scale

    from stip.compiler.pipeline import compile_model

    model = model or bench_llm_scale.model_for("fp16")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        compile_model(model, Path(tmp) / "bundle", check=False)
        res["bench_compile_s"] = time.perf_counter() - t
        for prompt, tokens in ((32, 32), (128, 64), (32, 32)):
            buf = io.StringIO()
            t = time.perf_counter()
            with contextlib.redirect_stdout(buf):
                rc = bench_gpu.main(["--model", str(model), "--bundle", str(Path(tmp) / "bundle"), "--device", device,
                                     "--prompt", str(prompt), "--tokens", str(tokens), "--json"])
            r = json.loads(buf.getvalue())
            r["rc"], r["wall_s"] = rc, time.perf_counter() - t
            res.setdefault("bench", []).append(r)
            print(json.dumps(r), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the same code")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--bench-model", type=Path, help="benchmark decoder (default: bench_llm_scale's fp16 Llama)")
    a = ap.parse_args(argv)
    import onnxruntime as ort

    from stip.runtime.sessions import gpu_visible

    print("onnxruntime", ort.__version__, ort.get_available_providers(), "gpu visible:", gpu_visible(), flush=True)
    if a.device == "cuda" and ("CUDAExecutionProvider" not in ort.get_available_providers() or not gpu_visible()):
        raise SystemExit("no CUDA EP / GPU here")
    res: dict = {"onnxruntime": ort.__version__}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res["equivalence"] = equivalence(Path(tmp), a.device)
    res["equivalence_s"] = time.perf_counter() - t
    for r in res["equivalence"]:
        print(json.dumps(r), flush=True)
    if not a.skip_bench:
        bench(a.bench_model, a.device, res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
