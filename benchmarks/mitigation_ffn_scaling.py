"""Experiment (not shipped): per-channel positive scalings of the FFN spaces, folded into the up and down
projections of a bundle's server graph, and what `stip audit` measures before and after.

Exact only where the FFN activation is positively homogeneous (ReLU: relu(s x) = s relu(x) for s > 0), so the
model here is a tiny BERT with hidden_act="relu". The scaling costs the server nothing (same weights, same ops).
An adaptive attacker normalises each slice's sorted values by its norm, which undoes any per-slice scale.

    python benchmarks/mitigation_ffn_scaling.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import export_models  # noqa: E402


def scale_ffn(bundle: Path, original: Path, spread: float, seed: int = 0) -> None:
    """Multiply each ffn channel's up-projection column and bias by s_j, divide its down-projection row by s_j."""
    from stip.compiler.audit.view import load_reference, load_view
    from stip.passes.solve import use_key

    view = load_view(bundle)
    ref = load_reference(original, view)
    g, sol = ref.graph, ref.sol
    srv = view.server
    inits = {t.name: t for t in srv.graph.initializer}
    rng = np.random.default_rng(seed)
    scales = {n: np.exp(rng.uniform(-spread, spread, view.key[n].size)).astype(np.float32)
              for n in view.key if n.endswith(".ffn")}
    for k, i in enumerate(ref.part.server_nodes):
        node, sn = g.model.graph.node[i], srv.graph.node[k]
        for j, x in enumerate(node.input):
            if x not in g.constants:
                continue
            cls = sol.classes(use_key(x, i, j), g.constants[x].ndim)
            for a, c in enumerate(cls):
                name = sol.name(c)
                if name not in scales:
                    continue
                t = inits[sn.input[j]]
                w = numpy_helper.to_array(t)
                shape = [1] * w.ndim
                shape[a] = -1
                s = scales[name].reshape(shape)
                out_axis = node.op_type == "Add" or (node.op_type == "MatMul" and a == w.ndim - 1)
                t.CopyFrom(numpy_helper.from_array((w * s if out_axis else w / s).astype(w.dtype), t.name))
    onnx.save(srv, str(bundle / "server" / "model.onnx"))


def main() -> None:
    from stip.compiler.audit import audit
    from stip.compiler.audit import weight_matching as wm
    from stip.compiler.pipeline import compile_model
    from stip.runtime.verify import verify

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        cfg = export_models.tiny_bert_config(hidden_act="relu")
        model = export_models.export_bert(root / "relu-bert.onnx", dynamo=False, config=cfg)
        for spread in (0.0, 1.0, 3.0):
            out = root / f"b{spread}"
            compile_model(model, out)
            if spread:
                scale_ffn(out, model, spread)
            worst = max(c.max_abs for c in verify(out, model, device="cpu"))
            for attacker in ("naive", "adaptive"):
                # naive: sorted values as they are; adaptive (what stip audit runs): also per-slice normalised
                variants = (0,) if attacker == "naive" else (0, 1)
                wm.recover.__defaults__ = (variants,)
                r = audit(out, model, samples=4, seq=8, write_report=False)
                wm.recover.__defaults__ = ((0, 1),)
                w = r["attacks"][0]
                ffn = [s["recovered"] for s in w["spaces"] if s["space"].endswith(".ffn")]
                hidden = w["hidden_recovered"]
                vocab = r["attacks"][1]["success"]
                print(f"spread e^±{spread}: max abs diff {worst:.1e}  {attacker:8s}  ffn recovered "
                      f"{np.mean(ffn):.1%} (chance {1 / 64:.1%})  hidden {hidden:.1%}  tokens {vocab:.1%}")


if __name__ == "__main__":
    main()
