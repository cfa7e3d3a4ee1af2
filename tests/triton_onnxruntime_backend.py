"""A stand-in for Triton's onnxruntime backend: a Python-based backend named `onnxruntime` (model.py).

Why: the nvidia-pytriton wheel's tritonserver has the Python backend only, and no Docker image can be pulled on the
test machines. Installed as BACKENDS/onnxruntime/model.py, it lets Triton load a repository whose config says
`platform: "onnxruntime_onnx"` (as `stip export-triton` writes it) unchanged; Triton's core still parses the
config, schedules and batches requests, and speaks HTTP and gRPC. Like the real backend it refuses a config whose
inputs and outputs do not match the graph, and runs a dynamic batch as one onnxruntime call (requests concatenated
along dim 0). It refuses `sequence_batching.state` (implicit state): Python-based backends never receive it, so a
silent stand-in would hide exactly the semantics a real deployment depends on.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

ONNX_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
              "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(int8)": "TYPE_INT8",
              "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL", "tensor(bfloat16)": "TYPE_BF16"}


def _dims(entry, batched):
    """The shape the graph sees: `reshape.shape` when given (the API shape is `dims`), batch dim first."""
    dims = entry["reshape"].get("shape", []) if "reshape" in entry else entry["dims"]
    return ([-1] if batched else []) + [int(d) for d in dims]


def _check(kind, entry, meta, batched):
    """Config tensor vs graph tensor: type, rank and static dims, as the onnxruntime backend validates them."""
    name = entry["name"]
    if meta is None:
        raise pb_utils.TritonModelException(f"unexpected {kind} '{name}' in the model config: not in the graph")
    if ONNX_TYPES.get(meta.type) != entry["data_type"]:
        raise pb_utils.TritonModelException(f"{kind} '{name}': config type {entry['data_type']} but the graph has "
                                            f"{meta.type}")
    want = _dims(entry, batched)
    if len(want) != len(meta.shape):
        raise pb_utils.TritonModelException(f"{kind} '{name}': config dims {want} but the graph's rank is "
                                            f"{len(meta.shape)} ({meta.shape})")
    for w, g in zip(want, meta.shape):
        if isinstance(g, int) and g >= 0 and w != -1 and w != g:
            raise pb_utils.TritonModelException(f"{kind} '{name}': config dims {want} but the graph has {meta.shape}")


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        if cfg.get("sequence_batching", {}).get("state"):
            raise pb_utils.TritonModelException(
                "implicit state (sequence_batching.state) is not supported by this Python-based stand-in")
        path = os.path.join(args["model_repository"], args["model_version"],
                            cfg.get("default_model_filename") or "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.batched = int(cfg.get("max_batch_size", 0)) > 0
        self.inputs = cfg["input"]
        self.outputs = cfg["output"]
        graph_in = {i.name: i for i in self.session.get_inputs()}
        graph_out = {o.name: o for o in self.session.get_outputs()}
        for e in self.inputs:
            _check("input", e, graph_in.get(e["name"]), self.batched)
        for e in self.outputs:
            _check("output", e, graph_out.get(e["name"]), self.batched)
        missing = sorted(set(graph_in) - {e["name"] for e in self.inputs})
        if missing:
            raise pb_utils.TritonModelException(f"graph input(s) {missing} are missing from the model config")

    def execute(self, requests):
        """One onnxruntime run per group of requests with equal non-batch shapes (the dynamic batcher only
        merges such requests), split back by each request's batch size."""
        responses = [None] * len(requests)
        groups = {}
        for n, request in enumerate(requests):
            feeds = {}
            for e in self.inputs:
                value = pb_utils.get_input_tensor_by_name(request, e["name"]).as_numpy()
                if "reshape" in e:
                    value = value.reshape(([value.shape[0]] if self.batched else []) +
                                          [int(d) for d in e["reshape"].get("shape", [])])
                feeds[e["name"]] = value
            key = tuple((k, v.shape[1:] if self.batched else v.shape) for k, v in feeds.items())
            groups.setdefault(key if self.batched else n, []).append((n, feeds))
        names = [e["name"] for e in self.outputs]
        for members in groups.values():
            sizes = [next(iter(f.values())).shape[0] if self.batched else 1 for _, f in members]
            feeds = {k: np.concatenate([f[k] for _, f in members]) if len(members) > 1 else members[0][1][k]
                     for k in members[0][1]}
            try:
                results = self.session.run(names, feeds)
            except Exception as e:  # noqa: BLE001 - reported to the client as the real backend does
                for n, _ in members:
                    responses[n] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            offsets = np.cumsum([0, *sizes])
            for (n, _), lo, hi in zip(members, offsets[:-1], offsets[1:]):
                outs = []
                for e, value in zip(self.outputs, results):
                    part = value[lo:hi] if self.batched and len(members) > 1 else value
                    if "reshape" in e:
                        part = part.reshape(([part.shape[0]] if self.batched else []) + [int(d) for d in e["dims"]])
                    outs.append(pb_utils.Tensor(e["name"], np.ascontiguousarray(part)))
                responses[n] = pb_utils.InferenceResponse(output_tensors=outs)
        return responses
