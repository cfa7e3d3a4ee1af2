"""Triton's model configuration for a server graph, as `stip export-triton` writes it and `stip serve` reports it.

Why in the runtime: `stip serve` answers GET /v2/models/NAME/config with the same config, and a server process
must not load the compiler; `stip.compiler.triton` writes it to a repository as config.pbtxt.
"""

from __future__ import annotations

from stip.runtime.bundle_format import KEY_ID_PARAMETER
from stip.runtime.errors import StipError

PLATFORM = "onnxruntime_onnx"
INT64_FIELDS = {"dims", "max_queue_delay_microseconds", "max_sequence_idle_microseconds"}


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
    cfg["parameters"] = {KEY_ID_PARAMETER: {"string_value": key_id}}
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
