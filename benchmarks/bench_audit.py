"""Time `stip audit` on a BERT-base-size bundle (random weights), with the original as the reference: the worst
case, where every attack runs to the end (weight matching on every space, vocabulary matching on 30522 tokens).

    python benchmarks/bench_audit.py [--samples 8] [--seq 16] [--layers 1]

Compiling the bundle is not timed; the audit is, end to end, as the CLI runs it (load, reference analysis, attacks).
cpu_seconds (all threads) is printed too: on a shared machine the wall time depends on the load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import model_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--layers", type=int, default=1)
    a = ap.parse_args()
    from stip.compiler.audit import audit
    from stip.compiler.pipeline import compile_model

    model = model_path(a.model)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "bundle"
        compile_model(model, out)
        t0, c0 = time.perf_counter(), time.process_time()
        r = audit(out, model, samples=a.samples, seq=a.seq, layers=a.layers)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    figures = {a_["attack"]: round(a_["success"], 4) for a_ in r["attacks"]}
    print(json.dumps({"model": a.model, "samples": a.samples, "seq": a.seq, "layers": a.layers,
                      "audit_seconds": round(dt, 1), "cpu_seconds": round(cpu, 1),
                      "success": figures, "verdict": r["verdict"]}, indent=2))


if __name__ == "__main__":
    main()
