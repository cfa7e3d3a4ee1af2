"""`stip export-triton`: a Triton Inference Server model repository for a bundle's server graph.

Why: `stip serve` speaks the same protocol as Triton (KServe v2 / Open Inference Protocol), so an operator who
outgrows one machine serves the same permuted server/model.onnx on Triton, and clients (`stip.runtime.remote`,
`tritonclient`, over HTTP or gRPC) do not change. The repository holds the server graph and its config only:

    REPO/<name>/config.pbtxt     inputs and outputs without the KV cache; batching; parameters { key:
                                 "stip_key_id" ... } (the key id, for the client's check)
    REPO/<name>/1/model.onnx     the server graph, unchanged (+ model.onnx.data when its weights are external)
    REPO/<name>/1/model.py       graphs with a KV cache only: stip.compiler.triton_model, unchanged

Which backend, and why:
- Stateless graphs (encoders): platform onnxruntime_onnx (Triton's onnxruntime backend) with `dynamic_batching`.
- Graphs with a KV cache (decoders): backend "python" running model.py, which keeps each sequence's permuted cache
  per correlation id (as `stip serve` does) under the sequence batcher (the "oldest" strategy: sequences
  interleave; an idle sequence is freed after --sequence-timeout). Triton's implicit state is not used: its core
  gives a sequence's first request a cache with every variable dim set to 1, not 0, so the "empty" first cache
  would be a slot of zeros (or uninitialised memory) that the unmodified server graph attends to. The Python
  backend needs onnxruntime (or onnxruntime-gpu) installed in its Python environment.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stip.runtime.bundle_format import SERVER_MODEL, find_server_dir, model_key_id, pair_cache
from stip.runtime.errors import StipError
from stip.runtime.triton_config import config_json, model_config

__all__ = ["config_json", "export_triton", "graph_tensors", "model_config", "to_pbtxt"]

SEQUENCE_MODEL = Path(__file__).with_name("triton_model.py")  # REPO/<name>/1/model.py for KV-cache graphs


def _onnx_types() -> dict[int, str]:
    from onnx import TensorProto as T

    return {T.FLOAT: "FP32", T.FLOAT16: "FP16", T.DOUBLE: "FP64", T.BFLOAT16: "BF16", T.INT64: "INT64",
            T.INT32: "INT32", T.INT16: "INT16", T.INT8: "INT8", T.UINT8: "UINT8", T.UINT16: "UINT16",
            T.UINT32: "UINT32", T.UINT64: "UINT64", T.BOOL: "BOOL", T.STRING: "BYTES"}


@dataclass
class Tensor:
    name: str
    datatype: str            # OIP spelling (FP32); the config spells it TYPE_FP32
    shape: list              # int for a static dim, str or None for a dynamic one

    @property
    def dims(self) -> list[int]:
        return [d if isinstance(d, int) and d >= 0 else -1 for d in self.shape]


def graph_tensors(path: Path) -> tuple[list[Tensor], list[Tensor]]:
    """All graph inputs (initializers excluded) and outputs, read without loading the weights."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    types = _onnx_types()
    inits = {t.name for t in m.graph.initializer}

    def spec(vi) -> Tensor:
        t = vi.type.tensor_type
        if t.elem_type not in types:
            raise StipError(f"{path}: tensor '{vi.name}' has ONNX element type {t.elem_type}, which Triton's "
                            "onnxruntime backend does not take")
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        return Tensor(vi.name, types[t.elem_type], shape)

    return [spec(i) for i in m.graph.input if i.name not in inits], [spec(o) for o in m.graph.output]


_ENUM = re.compile(r"^(TYPE|KIND)_[A-Z0-9_]+$")


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if _ENUM.match(v):
        return v
    out = []
    for ch in v:
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127:
            out.append(ch)
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode())
    return '"' + "".join(out) + '"'


def to_pbtxt(cfg: dict) -> str:
    """protobuf text format, as Triton reads config.pbtxt."""

    def msg(d: dict, ind: str) -> list[str]:
        lines = []
        for k, v in d.items():
            if k == "parameters" and all(isinstance(x, dict) for x in v.values()):
                for pk, pv in v.items():
                    lines.append(f"{ind}parameters {{ key: {_scalar(pk)} value: {{ string_value: "
                                 f"{_scalar(pv['string_value'])} }} }}")
            elif isinstance(v, dict):
                lines += [f"{ind}{k} {{", *msg(v, ind + "  "), f"{ind}}}"]
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                lines.append(f"{ind}{k} [")
                for n, x in enumerate(v):
                    lines += [f"{ind}  {{", *msg(x, ind + "    "), f"{ind}  }}" + ("," if n < len(v) - 1 else "")]
                lines.append(f"{ind}]")
            elif isinstance(v, list):
                lines.append(f"{ind}{k}: [ {', '.join(_scalar(x) for x in v)} ]")
            else:
                lines.append(f"{ind}{k}: {_scalar(v)}")
        return lines

    return "\n".join(msg(cfg, "")) + "\n"


def export_triton(bundle: str | Path, repo: str | Path, name: str = "stip", max_batch_size: int | None = None,
                  force: bool = False, sequence_timeout: float = 300.0, max_sequences: int = 64) -> Path:
    """Write REPO/<name>/{config.pbtxt,1/model.onnx}; returns REPO/<name>. Nothing is left behind on failure."""
    src = find_server_dir(bundle)
    if not name or "/" in name or name.startswith("."):
        raise StipError(f"--model-name {name!r}: use a non-empty name without '/' that does not start with '.'")
    out = Path(repo)
    if out.exists() and not out.is_dir():
        raise StipError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise StipError(f"{out}: already exists and is not empty; pass --force to replace {out / name} in it")
    key_id = model_key_id(src / SERVER_MODEL)
    ins, outs = graph_tensors(src / SERVER_MODEL)
    pairs = pair_cache([t.name for t in ins], [t.name for t in outs], str(src / SERVER_MODEL))
    cache_in = {p: None for p, _ in pairs}
    cache_out = {o for _, o in pairs}
    by_name = {t.name: t for t in ins}
    cfg = model_config(name, [t for t in ins if t.name not in cache_in], [t for t in outs if t.name not in cache_out],
                       pairs, [by_name[p] for p, _ in pairs], key_id, max_batch_size, sequence_timeout,
                       max_sequences)
    text = to_pbtxt(cfg)

    fresh = not out.exists()
    parent = out.parent if fresh else out
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".stip-tmp", dir=parent))
    try:
        model_dir = tmp / name if fresh else tmp
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(text)
        for f in sorted(src.iterdir()):  # the graph and its external data file, if any
            if f.is_file():
                shutil.copy2(f, model_dir / "1" / f.name)
        if pairs:
            shutil.copyfile(SEQUENCE_MODEL, model_dir / "1" / "model.py")
        for d in (tmp, model_dir, model_dir / "1"):
            d.chmod(0o755)
        if fresh:
            tmp.rename(out)
        else:
            dest = out / name
            old = out / f".{name}.stip-old"
            shutil.rmtree(old, ignore_errors=True)
            if dest.exists():
                dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / name
