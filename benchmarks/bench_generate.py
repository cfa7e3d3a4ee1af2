"""Per-token latency of STIP private generation vs plaintext onnxruntime generation of the same decoder.

Why this shape: generation is one round trip per token, so the per-token cost of the client's pre, post and
sampling is paid 1000 times per answer and must stay small next to the model itself. A GPT-2-small-sized decoder
(random weights, exported with its KV cache) is compiled twice, with the LM head on the server (the client's post
only un-permutes the 50257 logits) and on the client (post holds the LM head too). All sides run in lockstep in one
process: every generation advances one token at a time, the sides (plaintext, stip head=server, stip head=client
and an A/A control session of the plaintext model) taking turns in every possible order equally often, so
neighbour noise hits every side alike and no side always follows the same one; each token is timed individually.
All sessions come from `make_session` with the same thread count; the client and server run in-process, with the
exact `StipGenerator.generate` loop users run, timed through thin proxies that record each ORT run,
Client.prepare/finish and the sampler.

Goal: stip(head=server) / plaintext <= 1.05 per decoded token (paired median); greedy tokens identical.

    python benchmarks/bench_generate.py [--model gpt2-small] [--reps 20] [--new-tokens 32] [--prompt-len 32]
                                        [--threads 1] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

GOAL = 1.05
HEADS = ("server", "client")
clock = time.perf_counter





def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


class Probe:
    """Per-token time accumulators (seconds), filled by the proxies below and drained after each token."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = defaultdict(float)
        self.capture: list[np.ndarray] | None = None  # when a list, the sampler appends a copy of its logits

    def take(self) -> dict[str, float]:
        got, self.acc = dict(self.acc), defaultdict(float)
        return got


class TimedSession:
    """Stands in for an ORT InferenceSession: same interface, adds each run()'s wall time to probe.acc[key]."""

    def __init__(self, session, probe: Probe, key: str):
        self._session, self._probe, self._key = session, probe, key

    def run(self, *args, **kwargs):
        t0 = clock()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self._probe.acc[self._key] += clock() - t0

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def _timed(fn: Callable, probe: Probe, key: str) -> Callable:
    def wrapper(*args, **kwargs):
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            probe.acc[key] += clock() - t0

    return wrapper


class Side:
    """One generator under test: `start(prompt, n)` returns the token iterator; `probe` holds its breakdown."""

    def __init__(self, name: str, start: Callable[[list[int], int], Iterator[int]], probe: Probe):
        self.name, self.start, self.probe = name, start, probe


def plaintext_side(name: str, src: Path, threads: int) -> Side:
    """The original model through generate.py's own loop (`decode` over a CachedSession), as generate_plaintext
    runs it, but with our session options; the CachedSession is built inside the timed prefill, as in
    StipGenerator.generate."""
    from stip.runtime.generate import CachedSession, Sampler, decode
    from stip.runtime.sessions import make_session

    probe = Probe()
    session = TimedSession(make_session(src, "cpu", threads), probe, "server_ort")
    sampler = _timed_sampler(Sampler(), probe)

    def start(prompt: list[int], n: int) -> Iterator[int]:
        seq = CachedSession(session)
        yield from decode(seq.run, seq.inputs, prompt, n, sampler, cached=bool(seq.pairs))

    return Side(name, start, probe)


def stip_side(name: str, bundle: Path, threads: int) -> Side:
    """StipGenerator.generate, unchanged, over sessions built at `threads`, timed through proxies."""
    from stip.runtime.bundle import Server
    from stip.runtime.generate import Sampler, StipGenerator

    probe = Probe()
    server = Server(bundle / "server", "cpu", threads)
    gen = StipGenerator(bundle, device="cpu", server=server, threads=threads)
    c = gen.client
    for s in (server.session, c.pre, c.post):  # every session really runs at `threads`
        got = s.get_session_options().intra_op_num_threads
        if got != threads:
            raise SystemExit(f"{name}: session built with {got} threads, not {threads}")
    server.session = TimedSession(server.session, probe, "server_ort")
    c.pre = TimedSession(c.pre, probe, "pre_ort")
    c.post = TimedSession(c.post, probe, "post_ort")
    c.prepare = _timed(c.prepare, probe, "pre")  # instance attributes shadow the bound methods
    c.finish = _timed(c.finish, probe, "post")
    sampler = _timed_sampler(Sampler(), probe)

    def start(prompt: list[int], n: int) -> Iterator[int]:
        return gen.generate(prompt, n, sampler)

    return Side(name, start, probe)


def _timed_sampler(sampler, probe: Probe):
    call = type(sampler).__call__

    class TimedSampler(type(sampler)):
        def __call__(self, logits: np.ndarray) -> int:
            if probe.capture is not None:
                probe.capture.append(np.array(logits, copy=True))
            t0 = clock()
            try:
                return call(self, logits)
            finally:
                probe.acc["sample"] += clock() - t0

    sampler.__class__ = TimedSampler
    return sampler


def prefill_logits(side: Side, prompt: list[int]) -> np.ndarray:
    """Last-position logits of the prompt as the sampler receives them (the real generation path)."""
    side.probe.capture = []
    gen = side.start(prompt, 1)
    try:
        next(gen)
        return side.probe.capture[0]
    finally:
        gen.close()
        side.probe.capture = None
        side.probe.take()


THP_TUNABLE = "glibc.malloc.hugetlb=1"


def _huge_pages(enable: bool) -> None:
    """Re-exec once with glibc's malloc asking for transparent huge pages (Linux, glibc >= 2.35).

    Why: with 4 KiB pages, a decoder step streams ~500 MB of weights and its speed depends on where each session's
    weights landed: sessions of the *same* model created one after another ran 2-10% apart, the first-created
    slowest, in every fresh process (page-walk cost, not the graph). With THP-backed weights the A/A spread
    drops to noise. THP is left to the kernel's `madvise` policy, which this tunable opts into; the run reports
    how much memory actually got huge pages (0 means the tunable was ignored)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not enable or not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables:
        return
    env = {**os.environ, "GLIBC_TUNABLES": f"{tunables}:{THP_TUNABLE}" if tunables else THP_TUNABLE}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _anon_huge_mib() -> float | None:
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def bench(model: str, reps: int, warmup: int, new_tokens: int, prompt_len: int, threads: int, settle_ms: float,
          control: bool) -> dict:
    from stip.compiler.pipeline import compile_model

    src = models.decoder_path(model)
    prompt = models.prompt_ids(prompt_len)
    with tempfile.TemporaryDirectory(prefix=f"{model}.", suffix=".stip", dir=models.CACHE) as tmp:
        sizes, compile_s = {}, {}
        for head in HEADS:
            print(f"[{model}] compiling {src.name} with head={head}", file=sys.stderr, flush=True)
            t0 = clock()
            compile_model(src, Path(tmp) / head, head=head)
            compile_s[head] = clock() - t0
            sizes[head] = {"client_bytes": _dir_bytes(Path(tmp) / head / "client"),
                           "server_bytes": _dir_bytes(Path(tmp) / head / "server")}
        # Creation order matters without huge pages (see _huge_pages): the control is made last, so the A/A
        # pair brackets the stip sessions and shows the size of that effect in this run.
        sides = [plaintext_side("plaintext", src, threads)]
        sides += [stip_side(f"stip head={h}", Path(tmp) / h, threads) for h in HEADS]
        if control:
            sides.append(plaintext_side("control", src, threads))
        anon_huge_mib = _anon_huge_mib()
        names = [s.name for s in sides]

        # Correctness first, so a broken bundle cannot look fast: prefill logits and greedy tokens.
        ref = prefill_logits(sides[0], prompt)
        max_abs = {s.name: float(np.max(np.abs(prefill_logits(s, prompt) - ref))) for s in sides[1:]}

        print(f"[{model}] warm-up {warmup}, then {reps} repetitions of prompt {prompt_len} + {new_tokens} tokens, "
              f"{len(sides)} sides in lockstep, threads {threads or 'ort default'}", file=sys.stderr, flush=True)
        for _ in range(warmup):
            for s in sides:
                list(s.start(prompt, min(new_tokens, 4)))
                s.probe.take()

        # rec[side][rep] = list of per-token dicts (token 0 is the prefill), seconds
        # Every order of the sides equally often: none always goes first, and none always follows the same one
        # (a cyclic rotation would fix each side's predecessor, whose cache and TLB footprint it inherits).
        orders = list(itertools.permutations(sides))
        rec: dict[str, list[list[dict[str, float]]]] = {n: [] for n in names}
        tokens: dict[str, list[list[int]]] = {n: [] for n in names}
        for r in range(reps):
            gens = {s.name: s.start(prompt, new_tokens) for s in sides}
            for n in names:
                rec[n].append([])
                tokens[n].append([])
            gc.collect()
            gc.disable()
            try:
                for k in range(new_tokens):
                    # prefills cycle through the orders by repetition, decode steps by their running count
                    i = r if k == 0 else r * (new_tokens - 1) + k - 1
                    for s in orders[i % len(orders)]:
                        if settle_ms:
                            time.sleep(settle_ms / 1e3)
                        s.probe.take()
                        t0 = clock()
                        tok = next(gens[s.name])
                        total = clock() - t0
                        parts = s.probe.take()
                        parts["total"] = total
                        rec[s.name][-1].append(parts)
                        tokens[s.name][-1].append(tok)
            finally:
                gc.enable()
            for g in gens.values():
                g.close()
        print(f"[{model}] done", file=sys.stderr, flush=True)

    res = summarise(model, src, rec, tokens, names, sizes, compile_s, max_abs, reps, new_tokens, prompt_len,
                    threads, settle_ms)
    res["anon_huge_pages_mib"] = anon_huge_mib
    return res


def summarise(model, src, rec, tokens, names, sizes, compile_s, max_abs, reps, new_tokens, prompt_len, threads,
              settle_ms) -> dict:
    ms = 1e3

    def decode_steps(n: str) -> list[dict[str, float]]:
        return [t for rep in rec[n] for t in rep[1:]]

    def part(t: dict[str, float], key: str) -> float:
        if key == "client":  # everything but the server graph's own ORT run: what the user's machine adds
            return t["total"] - t.get("server_ort", 0.0)
        if key == "other":  # decode loop feeds, CachedSession bookkeeping, generator plumbing
            return t["total"] - sum(t.get(k, 0.0) for k in ("pre", "server_ort", "post", "sample"))
        if key == "pre_py":
            return t.get("pre", 0.0) - t.get("pre_ort", 0.0)
        if key == "post_py":
            return t.get("post", 0.0) - t.get("post_ort", 0.0)
        return t.get(key, 0.0)

    keys = ["total", "server_ort", "client", "pre", "pre_ort", "pre_py", "post", "post_ort", "post_py", "sample",
            "other"]
    sides = {}
    base_rep = [statistics.median(t["total"] for t in rep[1:]) for rep in rec[names[0]]]
    base_prefill = [rep[0]["total"] for rep in rec[names[0]]]
    for n in names:
        steps = decode_steps(n)
        per_rep = [statistics.median(t["total"] for t in rep[1:]) for rep in rec[n]]
        prefill = [rep[0]["total"] for rep in rec[n]]
        med = {k: statistics.median(part(t, k) for t in steps) * ms for k in keys}
        sides[n] = {
            "decode_ms": med,
            "decode_ms_min": min(t["total"] for t in steps) * ms,
            "prefill_ms": {k: statistics.median(part(rep[0], k) for rep in rec[n]) * ms for k in keys},
            # client share from the per-token sums (a ratio of medians of parts would not add up)
            "client_share": sum(part(t, "client") for t in steps) / sum(t["total"] for t in steps),
            "decode_over_plaintext": models.ratios(per_rep, base_rep),
            "prefill_over_plaintext": models.ratios(prefill, base_prefill),
            "tokens_match": tokens[n] == tokens[names[0]],
            "first_mismatch": _first_mismatch(tokens[n], tokens[names[0]]),
        }
    stip_server = sides["stip head=server"]["decode_over_plaintext"]
    return {
        "model": model,
        "file_mib": src.stat().st_size / 2**20,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "reps": reps,
        "threads": threads or "ort default",
        "settle_ms": settle_ms,
        "compile_s": compile_s,
        "bundle_sizes": sizes,
        "prefill_logits_max_abs_diff": max_abs,
        "greedy_tokens": tokens[names[0]][0],
        "tokens_identical": all(s["tokens_match"] for s in sides.values()),
        "sides": sides,
        "goal": GOAL,
        "goal_met": stip_server["paired"] <= GOAL,
    }


def _first_mismatch(a: list[list[int]], b: list[list[int]]) -> list[int] | None:
    for r, (x, y) in enumerate(zip(a, b)):
        for k, (p, q) in enumerate(zip(x, y)):
            if p != q:
                return [r, k]
    return None


def _mib(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.0f} MiB"


def render(res: dict) -> str:
    def ratio(x: dict) -> str:
        lo, hi = x["paired_iqr"]
        return f"{x['paired']:6.3f} ({lo:.3f}-{hi:.3f}) {x['min_min']:6.3f}"

    lines = [
        f"{res['model']} ({res['file_mib']:.0f} MiB), prompt {res['prompt_len']} + {res['new_tokens']} new tokens, "
        f"{res['reps']} reps, threads {res['threads']}, huge pages {_mib(res['anon_huge_pages_mib'])}",
        "",
        f"{'side':17} {'prefill':>8} {'/plain':>6}  {'ms/token':>8} {'min':>6}  {'stip/plain (IQR)':>22} "
        f"{'min/min':>6}  {'server':>7} {'client':>6} {'share':>6}  {'pre':>5} {'(py)':>5} {'post':>5} {'(py)':>5} "
        f"{'sample':>6} {'other':>5}",
    ]
    lines.append("-" * len(lines[-1]))
    for n, s in res["sides"].items():
        d, p = s["decode_ms"], s["prefill_ms"]
        lines.append(
            f"{n:17} {p['total']:8.2f} {s['prefill_over_plaintext']['paired']:6.3f}  {d['total']:8.2f} "
            f"{s['decode_ms_min']:6.2f}  {ratio(s['decode_over_plaintext'])}  {d['server_ort']:7.2f} "
            f"{d['client']:6.2f} {s['client_share']:6.1%}  {d['pre']:5.2f} {d['pre_py']:5.2f} {d['post']:5.2f} "
            f"{d['post_py']:5.2f} {d['sample']:6.3f} {d['other']:5.2f}")
    lines += ["", f"{'prefill (ms)':17} {'total':>8} {'server':>8} {'pre':>6} {'post':>6} {'sample':>6} {'other':>6}"]
    for n, s in res["sides"].items():
        p = s["prefill_ms"]
        lines.append(f"{n:17} {p['total']:8.2f} {p['server_ort']:8.2f} {p['pre']:6.2f} {p['post']:6.2f} "
                     f"{p['sample']:6.3f} {p['other']:6.2f}")
    lines += [
        "",
        "ms, medians. prefill: prompt -> first token. ms/token: each later token timed alone (min: the fastest).",
        "stip/plain: median over reps of (this side's median ms/token / plaintext's), its IQR, and min/min.",
        "server: the model's ORT run (plaintext: the whole model). client: ms/token minus server, i.e. pre + post +",
        "sampling + loop; share: its fraction of all decode time. (py): Client.prepare/finish time outside ORT run.",
        "other: decode()'s feeds, CachedSession bookkeeping, generator plumbing. control: a 2nd plaintext session.",
        "",
        "bundle sizes: " + ", ".join(f"head={h}: client {b['client_bytes'] / 2**20:.1f} MiB, server "
                                     f"{b['server_bytes'] / 2**20:.1f} MiB" for h, b in res["bundle_sizes"].items()),
        "compile: " + ", ".join(f"head={h} {t:.1f} s" for h, t in res["compile_s"].items()),
        "prefill logits max|diff| vs plaintext: " + ", ".join(f"{n} {v:.1e}"
                                                              for n, v in res["prefill_logits_max_abs_diff"].items()),
        f"greedy tokens identical on every side and rep: {res['tokens_identical']}"
        + ("" if res["tokens_identical"] else "  first mismatch [rep, token]: " + ", ".join(
            f"{n} {s['first_mismatch']}" for n, s in res["sides"].items() if s["first_mismatch"])),
        f"goal: stip head=server / plaintext <= {res['goal']} per token (paired median): "
        + ("ok" if res["goal_met"] else "MISSED"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-small", choices=list(models.DECODERS),
                    help="gpt2-small (default; 124M parameters) or gpt2-mini (4 x 256, same vocab: smoke tests)")
    ap.add_argument("--reps", type=int, default=20, help="timed generations of each side (default 20)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed short generations of each side (default 1)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per repetition (default 32)")
    ap.add_argument("--prompt-len", type=int, default=32, help="random prompt length in tokens (default 32)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for every session (default 1: stable on a shared box; 0: ORT default)")
    ap.add_argument("--settle-ms", type=float, default=None,
                    help="idle gap before each timed token so thread pools stop spinning (default: 0 with one "
                    "thread, 20 otherwise)")
    ap.add_argument("--no-huge-pages", action="store_true",
                    help=f"do not re-exec with GLIBC_TUNABLES={THP_TUNABLE} (weights on 4 KiB pages: session "
                    "creation order then moves per-token time by several percent)")
    ap.add_argument("--no-control", action="store_true", help="skip the A/A control session (faster)")
    ap.add_argument("--quick", action="store_true", help="3 reps of 8 tokens after an 8-token prompt: a smoke test")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = ap.parse_args(argv)
    reps, new_tokens, prompt_len = (3, 8, 8) if a.quick else (a.reps, a.new_tokens, a.prompt_len)
    if new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (the first token is the prefill)")
    settle_ms = a.settle_ms if a.settle_ms is not None else (0.0 if a.threads == 1 else 20.0)
    _huge_pages(not a.no_huge_pages)
    res = bench(a.model, reps, a.warmup, new_tokens, prompt_len, a.threads, settle_ms, not a.no_control)
    print(json.dumps(res, indent=2) if a.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
