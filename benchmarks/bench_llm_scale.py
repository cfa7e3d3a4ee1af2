"""LLM scale: compile a >2 GiB Llama (random weights) in bounded memory; greedy generation and per-token latency.

Not CI: the fp32 export is ~2.7 GB (hidden 2048, 12 layers, GQA 16/4 heads, FFN 5632, vocab 32000, ~670M
parameters) plus its fp16 version, both cached under benchmarks/.cache/llm-scale/. Each measurement runs in a
fresh process (peak RSS is a high-water mark, read with os.wait4):

- compile: `stip compile --no-check` wall time and peak RSS, against `cp` of the model's files plus `sync`
  (the physical floor: every byte read once and written once); budget 1.5 GiB + the largest tensor;
- verify: `stip verify` (original, then bundle, one after the other), 1 sequence of 4 tokens after 3 cached;
- generation: greedy tokens through the bundle equal the original's; per-token latency (decode steps, median)
  of the bundle (pre -> server -> post) against the plaintext model, one after the other in the same process.

    python benchmarks/bench_llm_scale.py [--dtypes fp32,fp16] [--new-tokens 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

ROOT = models.CACHE / "llm-scale"
GIB = 2**30
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
              num_attention_heads=16, num_key_value_heads=4, head_dim=128, max_position_embeddings=2048,
              tie_word_embeddings=False)


def _consolidate(src: Path, dst: Path) -> None:
    """TorchScript writes one file per tensor above 2 GiB; gather them into dst + dst.data, 4 KiB aligned."""
    import onnx

    m = onnx.load(str(src))
    onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)


def export_fp32(path: Path) -> None:
    import tempfile

    em = models._examples()
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        raw = Path(tmp) / "model.onnx"
        em.export_llama(raw, dynamo=False, cache=True, config=em.tiny_llama_config(**CONFIG))
        _consolidate(raw, path)


def export_fp16(src: Path, path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = convert_float_to_float16(onnx.load(str(src)), keep_io_types=False, disable_shape_infer=True)
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def model_for(dtype: str) -> Path:
    fp32 = ROOT / "fp32" / "model.onnx"
    if not fp32.exists():
        fp32.parent.mkdir(parents=True, exist_ok=True)
        print(f"exporting {fp32} (once; cached)", file=sys.stderr, flush=True)
        export_fp32(fp32)
    if dtype == "fp32":
        return fp32
    fp16 = ROOT / "fp16" / "model.onnx"
    if not fp16.exists():
        fp16.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {fp16} (once; cached)", file=sys.stderr, flush=True)
        export_fp16(fp32, fp16)
    return fp16


def _files(model: Path) -> list[Path]:
    return [model] + sorted(model.parent.glob(model.name + ".data"))


def run_child(argv: list[str], cwd: Path | None = None) -> dict:
    """Wall time and peak RSS of one fresh process."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    out, err = p.stdout.read(), p.stderr.read()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({rc}):\n{out[-2000:]}\n{err[-2000:]}")
    return {"wall_s": wall, "peak_gib": ru.ru_maxrss * 1024 / GIB, "stdout": out}


def copy_floor(model: Path, work: Path) -> float:
    dst = work / "copy"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run(["cp", *map(str, _files(model)), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t
    shutil.rmtree(dst)
    return wall


def largest_tensor(model: Path) -> int:
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    return max(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in m.graph.initializer)


def generation_child(model: str, bundle: str, new_tokens: int) -> None:
    """In a fresh process: plaintext greedy decode, freed; then the bundle's. Prints JSON."""
    from stip.runtime.cache import CachedSession
    from stip.runtime.generate import Sampler, StipGenerator, decode
    from stip.runtime.sessions import make_session

    prompt = models.prompt_ids(8, vocab=CONFIG["vocab_size"])

    def timed(step):
        times = []

        def run(feeds):
            t = time.perf_counter()
            out = step(feeds)
            times.append(time.perf_counter() - t)
            return out
        return run, times

    seq = CachedSession(make_session(model, "cpu"))
    run, plain_t = timed(seq.run)
    plain = list(decode(run, seq.inputs, prompt, new_tokens, Sampler(), True))
    del seq, run
    gen = StipGenerator(bundle, device="cpu")
    stip_t: list[float] = []
    orig_step = gen.server.sequence

    def sequence(steps):  # time the whole per-token round (pre -> server -> post) through the server's sequence
        s = orig_step(steps=steps)
        inner = s.run

        def run(feeds):
            t = time.perf_counter()
            out = inner(feeds)
            stip_t.append(time.perf_counter() - t)
            return out
        s.run = run
        return s

    gen.server.sequence = sequence
    t_tokens = []
    t0 = time.perf_counter()
    stip = []
    for tok in gen.generate(prompt, new_tokens):
        stip.append(tok)
        t_tokens.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    print(json.dumps({"plain": plain, "stip": stip, "plain_decode_ms": 1e3 * statistics.median(plain_t[1:]),
                      "plain_prefill_ms": 1e3 * plain_t[0], "stip_server_decode_ms": 1e3 * statistics.median(
                          stip_t[1:]), "stip_token_ms": 1e3 * statistics.median(t_tokens[1:]),
                      "stip_first_token_ms": 1e3 * t_tokens[0]}))


def bench(dtype: str, new_tokens: int, repeat: int = 1, compile_only: bool = False) -> dict:
    model = model_for(dtype)
    work = ROOT / f"work-{dtype}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    stip = str(Path(sys.executable).with_name("stip"))
    size = sum(f.stat().st_size for f in _files(model))
    res = {"dtype": dtype, "model_bytes": size, "largest_tensor_bytes": largest_tensor(model)}
    copies, compiles, peaks = [], [], []
    for _ in range(repeat):  # alternated, so that both see the same load on a shared machine
        copies.append(copy_floor(model, work))
        shutil.rmtree(work / "bundle", ignore_errors=True)
        before = set(os.listdir(work))
        c = run_child([stip, "compile", str(model), "-o", str(work / "bundle"), "--no-check", "-q", "--force"],
                      cwd=work)
        compiles.append(c["wall_s"])
        peaks.append(c["peak_gib"])
        res["left_behind"] = sorted(set(os.listdir(work)) - before - {"bundle"})
    res["copy_sync_s"], res["compile_s"] = statistics.median(copies), statistics.median(compiles)
    res["compile_peak_gib"] = max(peaks)
    res["copy_sync_runs"], res["compile_runs"] = copies, compiles
    res["ratio_runs"] = [c / k for c, k in zip(compiles, copies)]
    res["budget_gib"] = 1.5 + res["largest_tensor_bytes"] / GIB
    res["server_files"] = sorted(p.name for p in (work / "bundle" / "server").iterdir())
    if compile_only:
        return res
    v = run_child([stip, "verify", str(work / "bundle"), "--original", str(model), "--batch", "1", "--seq", "4",
                   "--past", "3", "--device", "cpu", "--atol", "1e-2" if dtype == "fp16" else "1e-4",
                   "--rtol", "1e-2" if dtype == "fp16" else "1e-4"])
    res["verify_s"], res["verify_peak_gib"], res["verify"] = v["wall_s"], v["peak_gib"], v["stdout"].strip()
    g = run_child([sys.executable, __file__, "--generation-child", str(model), str(work / "bundle"),
                   str(new_tokens)])
    res["generation_peak_gib"] = g["peak_gib"]
    res.update(json.loads(g["stdout"].strip().splitlines()[-1]))
    res["greedy_equal"] = res["plain"] == res["stip"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,fp16")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="compiles (each after a cp+sync); medians reported")
    ap.add_argument("--compile-only", action="store_true", help="skip verify and generation")
    ap.add_argument("--generation-child", nargs=3, metavar=("MODEL", "BUNDLE", "TOKENS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.generation_child:
        generation_child(a.generation_child[0], a.generation_child[1], int(a.generation_child[2]))
        return 0
    models._ensure_cache()
    ROOT.mkdir(exist_ok=True)
    if a.export_only:
        for d in a.dtypes.split(","):
            print(model_for(d))
        return 0
    results = [bench(d, a.new_tokens, a.repeat, a.compile_only) for d in a.dtypes.split(",")]
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"[{r['dtype']}] model {r['model_bytes'] / GIB:.2f} GiB (largest tensor "
              f"{r['largest_tensor_bytes'] / GIB:.2f} GiB)")
        print(f"  compile {r['compile_s']:.1f} s (median of {len(r['compile_runs'])}), peak RSS "
              f"{r['compile_peak_gib']:.2f} GiB (budget {r['budget_gib']:.2f}); cp+sync {r['copy_sync_s']:.1f} s -> "
              f"{r['compile_s'] / r['copy_sync_s']:.1f}x (per run: "
              f"{', '.join(f'{x:.1f}' for x in r['ratio_runs'])}); left in cwd: {r['left_behind'] or 'nothing'}")
        print(f"  server files: {', '.join(r['server_files'])}")
        if "verify" not in r:
            continue
        print(f"  verify {r['verify_s']:.1f} s, peak {r['verify_peak_gib']:.2f} GiB: {r['verify'].splitlines()[-1]}")
        print(f"  greedy equal: {r['greedy_equal']} ({len(r['stip'])} tokens); per token: plaintext "
              f"{r['plain_decode_ms']:.1f} ms, STIP {r['stip_token_ms']:.1f} ms (server step "
              f"{r['stip_server_decode_ms']:.1f} ms); generation peak {r['generation_peak_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
