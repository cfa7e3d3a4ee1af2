"""Model formats stip does not compile, recognised by structure so the refusal names the real cause.

Why: without this a quantized model reaches the solver, every unknown op pins its axes, and the user
reads "no Transformer found", which sends them looking in the wrong place. These checks run before solving.
"""

from __future__ import annotations

from stip.passes.errors import StipError
from stip.passes.graph import Graph

# onnxruntime.quantization (dynamic and static/QDQ) and the contrib quantized kernels
QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv", "ConvInteger",
                 "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QGemm", "QuantizeLinear",
                 "QLinearAdd", "QLinearMul", "QOrderedMatMul", "DynamicQuantizeLSTM"}
INT8 = {2, 3}  # onnx.TensorProto.UINT8, INT8
# ops a dequantized weight passes through on its way to the MatMul that uses it
DEQUANT_PATH = {"Cast", "DequantizeLinear", "Mul", "Sub", "Add", "Reshape", "Transpose", "Unsqueeze", "Squeeze",
                "Identity", "CastLike"}
LINEAR = {"MatMul", "Gemm", "Conv", "Einsum"}

QUANT_ADVICE = ("compile the float model, then quantize the server graph (server/model.onnx) with "
                "onnxruntime.quantization if you need int8")


def refuse_unsupported_format(g: Graph) -> None:
    """Raise one StipError naming what the model is (quantized) and what to do. Merged decoders are specialised
    (or refused, naming their If) when loaded: passes/merged.py."""
    for problem in (_quantized_ops, _weight_only_int8):
        msg = problem(g)
        if msg:
            raise StipError(f"{g.path}: {msg}")


def _quantized_ops(g: Graph) -> str | None:
    found = sorted({n.op_type for n in g.model.graph.node if n.op_type in QUANTIZED_OPS})
    if not found:
        return None
    return f"quantized with onnxruntime.quantization ({', '.join(found)}): {QUANT_ADVICE}"


def _weight_only_int8(g: Graph) -> str | None:
    """An int8 weight dequantized (Cast / DequantizeLinear, Mul by a scale) into a MatMul/Gemm/Conv. An int8
    table that is only gathered (a quantized embedding) is supported and not reported here."""
    nodes = g.model.graph.node
    for name, value in g.constants.items():
        if value.ndim < 2 or g.dtypes.get(name) not in INT8:
            continue
        stack, seen = [name], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            for idx, j in g.consumers.get(t, []):
                n = nodes[idx]
                if n.op_type in LINEAR:
                    return (f"weight-only int8 quantization: int8 weight '{name}' is dequantized into "
                            f"{g.node_label(idx)}: {QUANT_ADVICE}")
                if n.op_type in DEQUANT_PATH:
                    stack.extend(o for o in n.output if o)
    return None
