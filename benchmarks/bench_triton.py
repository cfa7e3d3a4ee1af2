"""Per token and per request: a real Triton vs `stip serve` (each over HTTP and gRPC) vs plaintext onnxruntime
in-process.

Why: gRPC should cost less per request than HTTP, and generation pays one request per token; the Triton numbers
say what an operator gains or loses by moving the server graph from `stip serve` to Triton. Triton is the
nvidia-pytriton 0.7.0 wheel's tritonserver (tests/triton_fixture.py): decoders run stip's model.py in its Python
backend, encoders a Python-based stand-in for its onnxruntime backend (onnxruntime in a Python stub), so encoder
figures include that stand-in's overhead. All servers run on this machine's CPUs, on loopback, and the sides take
turns round by round, in rotating order, so neighbour noise hits each alike.

    python benchmarks/bench_triton.py [--decoder gpt2-mini|gpt2-small] [--encoder minilm] [--rounds 5]
                                      [--new-tokens 32] [--requests 20] [--json]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
import models  # noqa: E402
import triton_fixture  # noqa: E402

clock = time.perf_counter


def _export(bundle: Path, repo: Path, name: str) -> None:
    from stip.compiler.triton import export_triton

    export_triton(bundle, repo, name=name, force=True)


def _per_token(gen, prompt: list[int], n: int) -> list[float]:
    """Seconds per decoded token (the prefill excluded): one round trip each."""
    it = gen.generate(prompt, n)
    next(it)
    times = []
    while True:
        t = clock()
        try:
            next(it)
        except StopIteration:
            return times
        times.append(clock() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder", default="gpt2-mini", choices=sorted(models.DECODERS))
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="encoder requests per side per round")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from stip.compiler.pipeline import compile_model
    from stip.runtime.bundle import LocalDeployment
    from stip.runtime.generate import StipGenerator
    from stip.runtime.launch import free_port, stip_server
    from stip.runtime.remote import RemoteClient, RemoteServer
    from stip.runtime.sessions import make_session

    work = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    dec, enc = work / "dec", work / "enc"
    compile_model(models.decoder_path(a.decoder), dec)
    compile_model(models.model_path(a.encoder), enc)
    repo = work / "repo"
    _export(dec, repo, "dec")
    _export(enc, repo, "enc")
    prompt = models.prompt_ids(16)
    feeds = models.feeds(batch=1)
    plain = make_session(models.model_path(a.encoder), "cpu")
    plain_in = {i.name for i in plain.get_inputs()}
    tok: dict[str, list[float]] = {}
    req: dict[str, list[float]] = {}
    t_start = clock()
    dec_grpc, enc_grpc = free_port(), free_port()
    with triton_fixture.triton(repo) as t, \
            stip_server(dec / "server", "--grpc-port", str(dec_grpc), model_name="dec") as dec_url, \
            stip_server(enc / "server", "--grpc-port", str(enc_grpc), model_name="enc") as enc_url:
        startup = clock() - t_start
        gens = {"triton-http": StipGenerator(dec / "client", server=RemoteServer(t.http_url, "dec")),
                "triton-grpc": StipGenerator(dec / "client", server=RemoteServer(t.grpc_url, "dec")),
                "stip-serve-http": StipGenerator(dec / "client", server=RemoteServer(dec_url, "dec")),
                "stip-serve-grpc": StipGenerator(dec / "client",
                                                 server=RemoteServer(f"grpc://127.0.0.1:{dec_grpc}", "dec"))}
        encs = {"triton-http": RemoteClient(enc / "client", t.http_url, "enc"),
                "triton-grpc": RemoteClient(enc / "client", t.grpc_url, "enc"),
                "stip-serve-http": RemoteClient(enc / "client", enc_url, "enc"),
                "stip-serve-grpc": RemoteClient(enc / "client", f"grpc://127.0.0.1:{enc_grpc}", "enc"),
                "stip-in-process": LocalDeployment(enc, device="cpu")}
        tokens = {k: list(g.generate(prompt, 8)) for k, g in gens.items()}  # warm-up, and the same tokens
        assert len({tuple(v) for v in tokens.values()}) == 1, tokens
        want = plain.run(None, {k: v for k, v in feeds.items() if k in plain_in})[0]
        for k, c in encs.items():
            got = c.run(feeds)
            np.testing.assert_allclose(next(iter(got.values())), want, atol=1e-4, err_msg=k)
        for r in range(a.rounds):
            order = list(gens)[r % len(gens):] + list(gens)[:r % len(gens)]
            for k in order:
                tok.setdefault(k, []).extend(_per_token(gens[k], prompt, a.new_tokens))
            sides = [*encs, "plaintext-in-process"]
            for k in sides[r % len(sides):] + sides[:r % len(sides)]:
                for _ in range(a.requests):
                    t0 = clock()
                    if k == "plaintext-in-process":
                        plain.run(None, {n: v for n, v in feeds.items() if n in plain_in})
                    else:
                        encs[k].run(feeds)
                    req.setdefault(k, []).append(clock() - t0)
    result = {"decoder": a.decoder, "encoder": a.encoder, "seq": models.SEQ, "servers_startup_s": round(startup, 2),
              "ms_per_token_median": {k: round(1e3 * statistics.median(v), 3) for k, v in tok.items()},
              "ms_per_request_median": {k: round(1e3 * statistics.median(v), 3) for k, v in req.items()}}
    # ratios of medians, all measured in this run: gRPC vs HTTP per token, each side vs plaintext per request
    med_tok, med_req = result["ms_per_token_median"], result["ms_per_request_median"]
    result["grpc_over_http_per_token"] = {
        srv: round(med_tok[f"{srv}-grpc"] / med_tok[f"{srv}-http"], 3) for srv in ("triton", "stip-serve")}
    result["over_plaintext_per_request"] = {
        k: round(v / med_req["plaintext-in-process"], 3) for k, v in med_req.items() if k != "plaintext-in-process"}
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{a.decoder}: ms per token (median of {a.rounds} x {a.new_tokens - 1})")
        for k, v in result["ms_per_token_median"].items():
            print(f"  {k:22} {v:9.3f}")
        print(f"{a.encoder} (seq {models.SEQ}): ms per request (median of {a.rounds} x {a.requests})")
        for k, v in result["ms_per_request_median"].items():
            print(f"  {k:22} {v:9.3f}")
        print("gRPC / HTTP per token:", result["grpc_over_http_per_token"])
        print("per request / plaintext in-process:", result["over_plaintext_per_request"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
