"""A STIP decoder's server graph with its KV cache kept per sequence: Triton Python-backend model.

`stip export-triton` copies this file, unchanged, to REPO/NAME/1/model.py for server graphs with a KV cache; it
runs inside Triton's Python backend (it is never imported by stip itself).

Why a Python model and not implicit state on the onnxruntime backend: Triton gives the first request of a sequence
its implicit state with every variable dim set to 1, not 0 (SequenceStates::Initialize), so an "empty" cache
arrives as one slot of zeros (or uninitialised memory) that the server graph would attend to; the graph would have
to be rewritten to mask that slot. This model keeps each sequence's permuted cache itself, exactly as `stip serve`
does: an empty cache (zero past positions) at the sequence's START, the graph's present.* outputs as the next
past_key_values.* inputs, freed at END or when the sequence has been idle longer than the sequence batcher's
max_sequence_idle_microseconds (Triton then refuses its continuation). The cache never leaves this process: the
client sends the new token's permuted embedding and receives permuted logits, as with `stip serve`.

Needs `onnxruntime` (or onnxruntime-gpu) in the Python backend's environment.
"""

import json
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
START = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.pairs = [tuple(p) for p in json.loads(params["stip_cache"])]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("stip_intra_op_threads", "0"))
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, opts, providers=providers)
        graph = {i.name: i for i in self.session.get_inputs()}
        self.past_info = {past: graph[past] for past, _ in self.pairs}
        self.inputs = [e["name"] for e in cfg["input"]]
        self.outputs = [e["name"] for e in cfg["output"]]
        self.fetch = self.outputs + [present for _, present in self.pairs]
        # the batch of a sequence: dim 0 of the first input whose dim 0 is the graph's batch axis
        self.batch_input = next((n for n in self.inputs if graph[n].shape and not isinstance(graph[n].shape[0], int)),
                                None)
        idle = int(cfg.get("sequence_batching", {}).get("max_sequence_idle_microseconds", 0))
        self.idle_s = idle / 1e6 if idle > 0 else None
        self.caches = {}  # correlation id -> (past_key_values.* arrays, last use)

    def _empty(self, batch):
        out = {}
        for past, info in self.past_info.items():
            shape = [d if isinstance(d, int) else (batch if a == 0 else 0) for a, d in enumerate(info.shape)]
            out[past] = np.zeros(shape, dtype=NP_TYPES.get(info.type, np.float32))
        return out

    def _sweep(self, now, busy):
        """Free the caches of sequences idle past the sequence batcher's timeout (Triton has released their
        slots and refuses their next step); `busy` are the sequences of the requests being run now."""
        if self.idle_s is None:
            return
        stale = [cid for cid, (_, used) in self.caches.items() if now - used > self.idle_s and cid not in busy]
        for cid in stale:
            del self.caches[cid]
        if stale:
            pb_utils.Logger.log_info(f"stip: freed the KV cache of {len(stale)} idle sequence(s); "
                                     f"{len(self.caches)} live")

    def _one(self, request, now):
        cid, flags = request.correlation_id(), request.flags()
        feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
        if flags & START:
            batch = int(feeds[self.batch_input].shape[0]) if self.batch_input else 1
            past = self._empty(batch)
        elif cid in self.caches:
            past = self.caches[cid][0]
        else:
            raise pb_utils.TritonModelException(f"sequence {cid}: no KV cache here (its START was never seen, or "
                                                "it was freed after END or the idle timeout); start a new sequence")
        values = self.session.run(self.fetch, {**feeds, **past})
        result = dict(zip(self.fetch, values))
        if flags & END:
            self.caches.pop(cid, None)
        else:
            self.caches[cid] = ({p: result[o] for p, o in self.pairs}, now)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, result[n]) for n in self.outputs])

    def execute(self, requests):
        now = time.monotonic()
        self._sweep(now, {r.correlation_id() for r in requests})
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request, now))
            except Exception as e:  # noqa: BLE001 - the client gets the error, the other sequences go on
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses

    def finalize(self):
        self.caches.clear()
