"""Tiny hand-built graphs for unit tests of single rules (real exports are covered end to end)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "t", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def save(m: onnx.ModelProto, path: Path) -> Path:
    onnx.save(m, str(path))
    return path


def embed_then(nodes_after, out_shape, extra_inits=(), vocab: int = 16, d: int = 8, out_name: str = "y"):
    """ids -> Gather(table) -> h [B, S, d] -> nodes_after -> y; the standard harness for a rule test."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])
    y = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed")] + list(nodes_after)
    return model(nodes, [ids], [y], [weight("table", vocab, d), *extra_inits])
