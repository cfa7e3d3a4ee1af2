"""Triton's model configuration for a server graph, as `stip export-triton` writes it and `stip serve` reports it.

Why in the runtime: `stip serve` answers GET /v2/models/NAME/config with the same config, and a server process
must not load the compiler; `stip.compiler.triton` writes it to a repository as config.pbtxt.
"""

from __future__ import annotations

import json

from stip.runtime.bundle_format import KEY_ID_PARAMETER
from stip.runtime.errors import StipError

PLATFORM = "onnxruntime_onnx"  # stateless graphs: Triton's onnxruntime backend
SEQUENCE_BACKEND = "python"    # graphs with a KV cache: stip's model.py in Triton's Python backend
CACHE_PARAMETER = "stip_cache"  # model.py's [past input, present output] pairs, as JSON
INT64_FIELDS = {"dims", "max_queue_delay_microseconds", "max_sequence_idle_microseconds"}


def model_config(name: str, inputs, outputs, pairs: list[tuple[str, str]], cache_inputs, key_id: str,
                 max_batch_size: int | None = None, sequence_timeout: float = 300.0,
                 max_sequences: int = 64) -> dict:
    """Triton's ModelConfig as a dict (field names as in model_config.proto). `inputs`/`outputs` exclude the
    cache; `cache_inputs` are the past_key_values.* tensors, in the order of `pairs`. Each tensor needs `name`,
    `datatype` (FP32 ...) and `dims` (-1 for a dynamic dim).

    Stateless graphs (encoders): Triton's onnxruntime backend with dynamic batching. Graphs with a KV cache:
    the Python backend running stip's model.py (stip.compiler.triton_model), which keeps each sequence's permuted
    cache itself, because Triton's implicit state would hand the first request a one-slot cache, not an empty one.
    """
    if pairs:
        return _sequence_config(name, inputs, outputs, pairs, cache_inputs, key_id, max_batch_size,
                                sequence_timeout, max_sequences)
    everything = [*inputs, *outputs]
    batchable = all(t.dims and t.dims[0] == -1 for t in everything)
    if max_batch_size is None:
        max_batch_size = 8 if batchable else 0
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
    if strip:
        cfg["dynamic_batching"] = {"max_queue_delay_microseconds": 100}
    cfg["parameters"] = {KEY_ID_PARAMETER: {"string_value": key_id}}
    return cfg


def _sequence_config(name, inputs, outputs, pairs, cache_inputs, key_id, max_batch_size, sequence_timeout,
                     max_sequences) -> dict:
    """A decoder: one sequence per request (max_batch_size 0, the graph's own shapes), the sequence batcher's
    "oldest" strategy so that many sequences interleave, and the cache pairs for model.py as a parameter."""
    if max_batch_size not in (None, 0):
        raise StipError(f"--max-batch-size {max_batch_size}: a graph with a KV cache is served one sequence per "
                        "request (Triton max_batch_size 0); leave --max-batch-size out")
    if sequence_timeout <= 0:
        raise StipError(f"--sequence-timeout {sequence_timeout}: must be > 0 seconds")
    if max_sequences < 1:
        raise StipError(f"--max-sequences {max_sequences}: must be >= 1")
    for (past, _), t in zip(pairs, cache_inputs):
        if len(t.dims) != 4 or -1 in (t.dims[1], t.dims[3]):
            raise StipError(f"cache input '{past}': expected [batch, heads, past, head_dim] with static heads and "
                            f"head size, got {t.dims}; export the decoder with static heads and head size")

    def entry(t) -> dict:
        return {"name": t.name, "data_type": "TYPE_" + t.datatype, "dims": list(t.dims) or [1]}

    return {"name": name, "backend": SEQUENCE_BACKEND, "max_batch_size": 0,
            "input": [entry(t) for t in inputs], "output": [entry(t) for t in outputs],
            "sequence_batching": {
                "max_sequence_idle_microseconds": int(sequence_timeout * 1_000_000),
                "oldest": {"max_candidate_sequences": max_sequences, "max_queue_delay_microseconds": 0}},
            "instance_group": [{"count": 1}],
            "parameters": {KEY_ID_PARAMETER: {"string_value": key_id},
                           CACHE_PARAMETER: {"string_value": json.dumps([list(p) for p in pairs])}}}


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
