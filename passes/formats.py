"""Model formats stip does not compile, recognised by structure so the refusal names the real cause.

Why: without this a quantized model reaches the solver, every unknown op pins its axes, and the user
reads "no Transformer found", which sends them looking in the wrong place. These checks run before solving.
"""

from __future__ import annotations

from stip.passes.errors import StipError
from stip.passes.graph import Graph

# Quantized ops with no permutation rule (onnxruntime's QOperator format beyond MatMul/Gemm/Add/Mul/Softmax, and
# fused forms). The supported forms (DynamicQuantizeLinear + MatMulInteger/ConvInteger, QDQ, QOperator's
# QLinearMatMul/QGemm/QLinearAdd/QLinearMul/QLinearSoftmax/QLinearConcat, weight-only int8, MatMulNBits) have
# rules in rules.py.
QUANTIZED_OPS = {"QLinearConv", "QAttention", "QOrderedMatMul", "DynamicQuantizeLSTM",
                 "QLinearAveragePool", "QLinearGlobalAveragePool", "QEmbedLayerNormalization", "QLinearReduceMean",
                 "QLinearWhere", "QLinearGather"}
QUANT_ADVICE = ("quantize with onnxruntime.quantization.quantize_dynamic, or quantize_static with "
                "quant_format=QuantFormat.QDQ (both compile), or compile the float model")


def refuse_unsupported_format(g: Graph) -> None:
    """Raise one StipError naming what the model is (quantized) and what to do. Merged decoders are specialised
    (or refused, naming their If) when loaded: passes/merged.py."""
    for problem in (_quantized_ops,):
        msg = problem(g)
        if msg:
            raise StipError(f"{g.path}: {msg}")


def _quantized_ops(g: Graph) -> str | None:
    found = sorted({n.op_type for n in g.model.graph.node if n.op_type in QUANTIZED_OPS})
    if not found:
        return None
    return f"quantized with ops that have no permutation rule ({', '.join(found)}): {QUANT_ADVICE}"
