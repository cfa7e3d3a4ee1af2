"""Streaming model writer: the file reads back as the identical model in onnx and onnxruntime."""

from __future__ import annotations

import onnx

from stip.compiler.serialize import write_model
from stip.runtime.sessions import make_session


def test_streamed_file_is_the_same_model(zoo, tmp_path):
    src = onnx.load(str(zoo.get("bert", dynamo=True)))
    write_model(src, tmp_path / "m.onnx")
    back = onnx.load(str(tmp_path / "m.onnx"))
    assert back.SerializeToString() == src.SerializeToString()
    assert len(back.graph.initializer) == len(src.graph.initializer) > 10
    make_session(tmp_path / "m.onnx", "cpu")
