"""Write a ModelProto one initializer at a time.

Why: `SerializeToString` of a 330 MiB server graph briefly holds two more full copies (upb's buffer and the
Python bytes), which made saving the peak of a BERT-base compile. Protobuf merges repeated occurrences of an
embedded message field (the spec's MergeFrom rule), so writing the graph field once for the nodes and once per
initializer yields the very same model when read by onnx, onnxruntime or any protobuf parser.
"""

from __future__ import annotations

from pathlib import Path

import onnx

_GRAPH_FIELD = 7  # ModelProto.graph
_INITIALIZER_FIELD = 5  # GraphProto.initializer


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Same bytes-on-disk semantics as onnx.save_model, with peak memory of one tensor instead of the model."""
    head = _copy_except(model, onnx.ModelProto(), "graph")
    skeleton = _copy_except(model.graph, onnx.GraphProto(), "initializer")
    g = model.graph
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        f.write(_field(_GRAPH_FIELD, skeleton.SerializeToString()))
        for t in g.initializer:
            f.write(_field(_GRAPH_FIELD, _field(_INITIALIZER_FIELD, t.SerializeToString())))


def _copy_except(src, dst, skip: str):
    """Copy every set field but one (the large one), without touching it."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)
    return dst
