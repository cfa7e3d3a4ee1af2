"""`stip export-triton`: a Triton Inference Server model repository for a bundle's server graph.

Why: `stip serve` speaks the same protocol as Triton (KServe v2 / Open Inference Protocol), so an operator who
outgrows one machine serves the same permuted server/model.onnx on Triton's onnxruntime backend, and clients
(`stip.runtime.remote`, `tritonclient`) do not change. The repository:

    REPO/<name>/config.pbtxt     platform onnxruntime_onnx; inputs and outputs without the KV cache; batching;
                                 parameters { key: "stip_key_id" ... } (the key id, for the client's check)
    REPO/<name>/1/model.onnx     the server graph, unchanged (+ model.onnx.data when its weights are external)

Stateless graphs (encoders) get `dynamic_batching`. Graphs with a KV cache get `sequence_batching` with implicit
state (Triton's "implicit state management"): each `past_key_values.*` input / `present.*` output pair is a
`state` whose initial value is an empty cache (zero-length past axis), so Triton keeps each sequence's permuted
cache, and clients send `sequence_id` / `sequence_start` / `sequence_end` exactly as they do to `stip serve`.
A model has one scheduler in Triton, so a cache graph has sequence_batching (the "oldest" strategy, which batches
through the dynamic batcher) and no separate dynamic_batching block.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stip.passes.errors import StipError
from stip.passes.state import pair_cache

PLATFORM = "onnxruntime_onnx"
KEY_PARAM = "stip_key_id"
INT64_FIELDS = {"dims", "max_queue_delay_microseconds", "max_sequence_idle_microseconds"}


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


def model_config(name: str, inputs, outputs, pairs: list[tuple[str, str]], cache_inputs, key_id: str,
                 max_batch_size: int | None = None, sequence_timeout: float = 300.0,
                 max_sequences: int = 64) -> dict:
    """Triton's ModelConfig as a dict (field names as in model_config.proto). `inputs`/`outputs` exclude the
    cache; `cache_inputs` are the past_key_values.* tensors, in the order of `pairs`. Each tensor needs `name`,
    `datatype` (FP32 ...) and `dims` (-1 for a dynamic dim)."""
    everything = [*inputs, *outputs, *cache_inputs]
    batchable = all(t.dims and t.dims[0] == -1 for t in everything)
    if max_batch_size is None:
        max_batch_size = (1 if pairs else 8) if batchable else 0
    if max_batch_size < 0:
        raise StipError("--max-batch-size must be >= 0")
    if max_batch_size > 0 and not batchable:
        odd = next(t.name for t in everything if not (t.dims and t.dims[0] == -1))
        raise StipError(f"--max-batch-size {max_batch_size}: tensor '{odd}' has no dynamic batch dim 0, so "
                        "Triton cannot batch this graph; use --max-batch-size 0")
    strip = max_batch_size > 0

    def entry(t) -> dict:
        dims = t.dims[1:] if strip else list(t.dims)
        e = {"name": t.name, "data_type": "TYPE_" + t.datatype, "dims": dims or [1]}
        if not dims:  # a [batch] tensor: Triton needs one dim, reshaped away
            e["reshape"] = {"shape": []}
        return e

    cfg: dict = {"name": name, "platform": PLATFORM, "max_batch_size": max_batch_size,
                 "input": [entry(t) for t in inputs], "output": [entry(t) for t in outputs]}
    if pairs:
        states = []
        for (past, present), t in zip(pairs, cache_inputs):
            full = t.dims
            if len(full) != 4:
                raise StipError(f"cache input '{past}': expected [batch, heads, past, head_dim], got {full}")
            initial = []
            for a, d in enumerate(full):
                if a == 0:
                    if not strip:
                        initial.append(1)  # one sequence per request
                elif a == 2:
                    initial.append(0)      # the empty cache: no past tokens
                elif d == -1:
                    raise StipError(f"cache input '{past}': dim {a} is dynamic, so Triton cannot build its "
                                    "initial (empty) state; export the decoder with static heads and head size")
                else:
                    initial.append(d)
            states.append({"input_name": past, "output_name": present, "data_type": "TYPE_" + t.datatype,
                           "dims": full[1:] if strip else list(full),
                           "initial_state": [{"data_type": "TYPE_" + t.datatype, "dims": initial,
                                              "zero_data": True, "name": "empty KV cache"}]})
        cfg["sequence_batching"] = {
            "max_sequence_idle_microseconds": int(sequence_timeout * 1_000_000),
            "oldest": {"max_candidate_sequences": max_sequences, "max_queue_delay_microseconds": 0},
            "state": states,
        }
    elif strip:
        cfg["dynamic_batching"] = {"max_queue_delay_microseconds": 100}
    cfg["parameters"] = {KEY_PARAM: {"string_value": key_id}}
    return cfg


def config_json(cfg: dict) -> dict:
    """The config as Triton's GET /v2/models/{name}/config returns it: protobuf JSON, int64 fields as strings."""

    def conv(v, key=None):
        if isinstance(v, dict):
            return {k: conv(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x, key) for x in v]
        if key in INT64_FIELDS and isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        return v

    return conv(cfg)


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
    from stip.runtime.bundle import model_key_id

    src = Path(bundle)
    if not (src / "model.onnx").is_file():
        src = src / "server"
    if not (src / "model.onnx").is_file():
        raise StipError(f"{bundle}: not a stip bundle (no server/model.onnx)")
    if not name or "/" in name or name.startswith("."):
        raise StipError(f"--model-name {name!r}: use a non-empty name without '/' that does not start with '.'")
    out = Path(repo)
    if out.exists() and not out.is_dir():
        raise StipError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise StipError(f"{out}: already exists and is not empty; pass --force to replace {out / name} in it")
    key_id = model_key_id(src / "model.onnx")
    ins, outs = graph_tensors(src / "model.onnx")
    pairs = pair_cache([t.name for t in ins], [t.name for t in outs], str(src / "model.onnx"))
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
