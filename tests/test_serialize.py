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


def test_inline_writer_places_weights_in_the_onnx_and_reads_back_as_one_graph(zoo, tmp_path):
    """Weights placed first (as records written into the .onnx by the fold threads), the rest of the model
    appended last: onnx and onnxruntime read one graph with every initializer, bytes unchanged."""
    import numpy as np
    from onnx import numpy_helper

    from stip.compiler.external import InlineWriter

    src = onnx.load(str(zoo.get("bert")))
    rng = np.random.default_rng(0)
    m = onnx.ModelProto()
    m.CopyFrom(src)
    del m.graph.initializer[:]
    w = InlineWriter(tmp_path / "m.onnx")
    order = list(src.graph.initializer)
    rng.shuffle(order)
    placed = 0
    for t in order:
        arr = numpy_helper.to_array(t)
        write = w.reserve(m.graph, t.name, arr.shape, arr.dtype, t.data_type)
        if write is None:
            w(m.graph, arr, t.name, t.data_type)
            continue
        placed += 1
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        half = (flat.nbytes // 2)
        write(flat[half:], half)  # blocks in any order, as two fold threads write them
        write(flat[:half], 0)
    w.finish_model(m)
    back = onnx.load(str(tmp_path / "m.onnx"))
    assert placed > 10
    want = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k].view(np.uint8), got[k].view(np.uint8)) for k in want)
    assert back.graph.node == src.graph.node and back.opset_import == src.opset_import
    make_session(tmp_path / "m.onnx", "cpu")


def test_inline_writer_refuses_past_protobufs_limit(tmp_path, monkeypatch):
    import numpy as np
    import pytest

    from stip.compiler.external import InlineWriter
    from stip.passes.errors import StipError

    monkeypatch.setattr(InlineWriter, "LIMIT", 10_000)
    w = InlineWriter(tmp_path / "m.onnx")
    g = onnx.GraphProto()
    assert w.reserve(g, "a", (1000,), np.float32) is not None
    with pytest.raises(StipError, match=r"m.onnx: .*2 GiB limit.*--external-data auto"):
        w.reserve(g, "b", (2000,), np.float32)
    w.close()
