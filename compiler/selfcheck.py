"""compile's post-condition: the bundle it is about to publish computes what the original computes.

Why: a wrong bundle written without an error is the worst failure (the BiasGelu bug shipped five of them). Rules
can be wrong in ways no static check sees, so before the final rename compile runs pre -> server -> post and the
original side by side in onnxruntime on a few small random inputs (decoders through their KV cache, after a
prefill), and refuses to write anything if an output differs. Large models run in segments of bounded memory
(runtime/segmented.py), every node still checked; bf16 graphs run widened to fp32 on a CPU (runtime/widen.py).
`--no-check` skips the check.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from stip.passes.errors import StipError

BATCH, SEQ, PAST = 2, 5, 3  # small shapes: the check costs about two forward passes of 2 x 8 tokens

# Tolerance on max |original - bundle| per output, relative to max(1, max |original output|): the permuted
# model sums in another order, so fp32 differs by ~1e-6 of the output's scale, fp16 by ~1e-3; integer and
# bool outputs (argmax, echoed ids, masks) must match exactly.
TOLERANCE = {
    onnx.TensorProto.DOUBLE: 1e-7,
    onnx.TensorProto.FLOAT: 1e-4,
    onnx.TensorProto.FLOAT16: 1e-2,
    onnx.TensorProto.BFLOAT16: 5e-2,
}


# Activations quantized at run time (DynamicQuantizeLinear, QDQ's QuantizeLinear on a computed tensor): a last-bit
# difference from the permuted summation order can move a value across a rounding boundary, or change a scale
# computed from a tensor's min and max, so an output may differ by a few quantization steps (an 8-bit step is 1/255
# of a tensor's range). Measured on a 4-layer, 256-wide dynamic int8 BERT over 4 x 64 tokens: up to 3e-3 of the
# output's scale, against 1.3e-2 between that model and its fp32 original; a per-channel zero point left unpermuted
# differed by 3e-2. Weight-only quantization is unaffected.
QUANTIZED_ACTIVATIONS = 1e-2


def _nodes(g: onnx.GraphProto):
    """Every node, inside If/Loop bodies too (a merged decoder's layers live in its If branches)."""
    for n in g.node:
        yield n
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _nodes(sub)


def _initializers(g: onnx.GraphProto):
    yield from g.initializer
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _initializers(sub)


def quantized_activation(m: onnx.ModelProto) -> str | None:
    """The first node that quantizes a computed tensor (not a weight), as 'op node', or None."""
    consts = {t.name for t in _initializers(m.graph)} | {o for n in _nodes(m.graph) if n.op_type == "Constant"
                                                         for o in n.output}
    for n in _nodes(m.graph):
        if n.op_type in ("DynamicQuantizeLinear", "DynamicQuantizeMatMul") or (
                n.op_type == "QuantizeLinear" and n.input[0] not in consts):
            return f"{n.op_type} node '{n.name or n.output[0]}'"
    return None


def output_tolerances(original: str | Path) -> dict[str, float]:
    """Per output: its own dtype's tolerance, loosened to the least precise float the graph computes in (an fp16
    model converted with keep_io_types has fp32 outputs but fp16 arithmetic inside), and to a few quantization
    steps when activations are quantized at run time."""
    from stip.passes.tensors import load_structure

    m = load_structure(original)  # the graph only: a large model's weights are never read here
    inner = {t.data_type for t in _initializers(m.graph)} | {
        a.i for n in _nodes(m.graph) if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    floor = max((TOLERANCE[t] for t in inner if t in TOLERANCE), default=0.0)
    if quantized_activation(m):
        floor = max(floor, QUANTIZED_ACTIVATIONS)
    out = {}
    for o in m.graph.output:
        own = TOLERANCE.get(o.type.tensor_type.elem_type)
        out[o.name] = 0.0 if own is None else max(own, floor)
    return out


def self_check(bundle_dir: str | Path, original: str | Path) -> dict:
    """Raises StipError naming the first output that differs; returns a summary for the compile report."""
    from stip.runtime.verify import verify

    tol = output_tolerances(original)
    first_token = _first_token(bundle_dir, original, tol)
    try:
        checks = verify(bundle_dir, original, batch=BATCH, seq=SEQ, past=PAST, seed=0, device="cpu")
    except StipError as e:
        raise StipError(f"self-check could not run: {e} (pass --no-check to write the bundle unchecked)") from None
    except Exception as e:  # onnxruntime raises its own exception types for graphs it cannot load or run
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise StipError(f"{original}: self-check could not run the original and the bundle in onnxruntime "
                        f"({type(e).__name__}: {first}); pass --no-check to write the bundle unchecked") from None
    rows = []
    for c in checks:
        limit = tol.get(c.name, 1e-4) * max(1.0, c.scale)
        if not c.max_abs <= limit:
            shape = " (shapes differ)" if c.max_abs == float("inf") else ""
            raise StipError(f"{original}: self-check failed: output '{c.name}' of the compiled bundle differs from "
                            f"the original by max abs {c.max_abs:.3g}{shape} (tolerance {limit:.2g}); nothing was "
                            "written. This is a stip bug: please report it with `stip inspect` of the model")
        rows.append({"output": c.name, "max_abs": c.max_abs, "tolerance": limit})
    summary = {"batch": BATCH, "seq": SEQ, "past": PAST, "outputs": rows}
    if first_token is not None:
        summary["merged_first_token_max_abs"] = first_token
    return summary


def _first_token(bundle_dir: str | Path, original: str | Path, tol: dict[str, float]) -> float | None:
    """A merged decoder (manifest fixed_inputs): both branches of the original agree on the first token, so the
    compiled with-past branch may serve it (passes/merged.py); None for other models."""
    from stip.passes.merged import first_token_check
    from stip.runtime.bundle_format import CLIENT_MANIFEST, Manifest, find_client_dir
    from stip.runtime.sessions import make_session
    from stip.runtime.verify import random_feeds

    manifest = Manifest.read(find_client_dir(bundle_dir) / CLIENT_MANIFEST)
    if not manifest.fixed_inputs:
        return None
    sess = make_session(original, "cpu")
    feeds = random_feeds(original, BATCH, SEQ, seed=1, past=0, axes=manifest.axes, session=sess)
    feeds = {k: v for k, v in feeds.items() if k not in manifest.fixed_inputs}
    return first_token_check(original, manifest.fixed_inputs, feeds, sess, tol)


def self_check_files(bundle_dir: str | Path, files: dict) -> dict:
    """The multi-file self-check: encode, prefill and decode with both caches on the server, against the
    original files (stip.runtime.multifile.verify_files); raises StipError naming the first call that differs."""
    from stip.runtime.multifile import verify_files

    try:
        checks = verify_files(bundle_dir, files, batch=BATCH, seq=SEQ, steps=PAST, seed=0, device="cpu")
    except StipError as e:
        raise StipError(f"self-check could not run: {e} (pass --no-check to write the bundle unchecked)") from None
    except Exception as e:  # onnxruntime's own exception types
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise StipError(f"self-check could not run the original files and the bundle in onnxruntime "
                        f"({type(e).__name__}: {first}); pass --no-check to write the bundle unchecked") from None
    rows = []
    for c in checks:
        limit = TOLERANCE[onnx.TensorProto.FLOAT] * max(1.0, c.scale)
        if not c.max_abs <= limit:
            raise StipError(f"self-check failed: {c.name} of the compiled bundle differs from the original files by "
                            f"max abs {c.max_abs:.3g} (tolerance {limit:.2g}); nothing was written. This is a stip "
                            "bug: please report it with `stip inspect` of each file")
        rows.append({"output": c.name, "max_abs": c.max_abs, "tolerance": limit})
    return {"batch": BATCH, "seq": SEQ, "steps": PAST, "outputs": rows}
