"""One served server graph: its ONNX Runtime session, its OIP metadata, its live sequences, and one inference
request from parsed body to encoded response (run in a worker thread, never on the event loop)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from stip.runtime.axes import cache_past_axis
from stip.runtime.bundle_format import find_server_dir, model_key_id, pair_cache
from stip.runtime.errors import StipError
from stip.runtime.serve_limits import JSON_HEAP_PER_VALUE, Limits, MemoryBudget, MemoryModel
from stip.runtime.serve_protocol import (
    JSON_BYTES_PER_VALUE,
    MODEL_VERSION,
    Parsed,
    RequestError,
    Signature,
    encode_response,
    parse_request,
    sequence_params,
    tensor_spec,
)
from stip.runtime.serve_sequences import BoundCache, HostCache, SequenceStore, check_id, ort_errors
from stip.runtime.sessions import make_session

log = logging.getLogger("stip.serve")


resolve_server_dir = find_server_dir  # a bundle root or its server/ directory


class Model:
    """One served server graph."""

    def __init__(self, name: str, server_dir: str | Path, device: str = "auto", threads: int = 0,
                 io_binding: str = "auto", limits: Limits | None = None, budget: MemoryBudget | None = None):
        self.name = name
        self.dir = resolve_server_dir(server_dir)
        self.path = self.dir / "model.onnx"
        self.key_id = model_key_id(self.path)
        self.session = make_session(self.path, device, threads, arena=False)
        self.providers = self.session.get_providers()
        self.limits = limits or Limits()
        self.budget = budget or MemoryBudget(self.limits.max_memory)
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        self.pairs = self._cache_pairs([i.name for i in ins], [o.name for o in outs])
        held_in, held_out = self._held()
        cache_in = {p for p, _ in self.pairs} | held_in
        cache_out = {o for _, o in self.pairs} | held_out
        where = str(self.path)
        self.inputs = [tensor_spec(i, where) for i in ins if i.name not in cache_in]
        self.outputs = [tensor_spec(o, where) for o in outs if o.name not in cache_out]
        self.cache_specs = [tensor_spec(i, where) for i in ins if i.name in cache_in]
        self.input_by_name = {t.name: t for t in self.inputs}
        # the axis the cache grows along, from how the graph's past and present dims differ (the compiler's
        # "past" role, stip.runtime.axes), never assumed to be HF's axis 2
        out_dims = {o.name: list(o.shape) for o in outs}
        in_dims = {i.name: list(i.shape) for i in ins}
        self.past_axis = next((cache_past_axis(in_dims[p], out_dims[o]) for p, o in self.pairs), None)
        self.output_by_name = {t.name: t for t in self.outputs}
        self.sig = Signature(name, self.inputs, self.outputs, self.limits.max_batch, self.limits.max_seq,
                             max(1, self.limits.max_json_response_bytes // JSON_BYTES_PER_VALUE))
        self.sequences = SequenceStore(self.limits.max_sequences, self.limits.sequence_timeout, self.budget.free,
                                       self.limits.max_sequences_per_client)
        on_gpu = self.providers[0] == "CUDAExecutionProvider"
        if io_binding not in ("auto", "on", "off"):
            raise StipError(f"--io-binding {io_binding}: expected auto, on or off")
        self.io_binding = io_binding == "on" or (io_binding == "auto" and on_gpu)
        self.binding_device = "cuda" if on_gpu else "cpu"
        self.batch_source = self._batch_source()
        self.mask_input, self.new_tokens_input = self._mask_inputs()
        if self.stateful and (self.mask_input is None or self.new_tokens_input is None):
            log.warning("model '%s': no input found whose dim is the cache's total length; a step's mask length is "
                        "not checked against the cached tokens", name)
        try:
            self.memory = MemoryModel(self.path)
        except Exception as e:  # noqa: BLE001 - shape inference can fail on exotic graphs: a coarse fallback
            log.warning("model '%s': symbolic shape inference failed (%s); memory is estimated as 64x the request's "
                        "input bytes", name, str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
            self.memory = None

    def _cache_pairs(self, ins: list[str], outs: list[str]) -> list[tuple[str, str]]:
        return pair_cache(ins, outs, str(self.path))

    def _held(self) -> tuple[set[str], set[str]]:
        """Inputs and outputs that other files of a multi-file model share on the server (serve_chain.py)."""
        return set(), set()

    @property
    def stateful(self) -> bool:
        return bool(self.pairs)

    def _batch_source(self) -> str | None:
        """The input whose dim 0 is the cache's batch dim: the batch of a new sequence is read from it."""
        if not self.cache_specs:
            return None
        sym = self.cache_specs[0].shape[0]
        for t in self.inputs:
            if t.shape and not isinstance(sym, int) and t.shape[0] == sym:
                return t.name
        return next((t.name for t in self.inputs if len(t.shape) >= 2 and t.static(0) is None), None)

    def _mask_inputs(self) -> tuple[tuple[str, int] | None, str | None]:
        """(input, axis) whose dim is the total length (the present cache's past-axis symbol), and the input whose
        dim 1 is the number of new tokens: a step's mask must cover exactly the cached plus the new tokens."""
        if not self.pairs:
            return None, None
        outs = {o.name: o for o in self.session.get_outputs()}
        present, a = outs[self.pairs[0][1]].shape, self.past_axis
        if a is None:
            return None, None
        total = present[a] if len(present) > a and isinstance(present[a], str) else None
        past = self.cache_specs[0].shape[a] if len(self.cache_specs[0].shape) > a else None
        mask = next(((t.name, a) for t in self.inputs for a, d in enumerate(t.shape) if total and d == total), None)
        src = self.input_by_name.get(self.batch_source) if self.batch_source else None
        new = src.name if src is not None and len(src.shape) >= 2 and isinstance(src.shape[1], str) and \
            src.shape[1] not in (total, past) else None
        return mask, new

    def new_state(self, batch: int) -> HostCache:
        if self.io_binding:
            return BoundCache(self.session, self.pairs, batch, self.binding_device, self.past_axis)
        return HostCache(self.session, self.pairs, batch, self.past_axis)

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [MODEL_VERSION], "platform": "onnxruntime_onnx",
                "inputs": [t.metadata() for t in self.inputs], "outputs": [t.metadata() for t in self.outputs],
                "parameters": {"stip_key_id": self.key_id}}

    def config(self) -> dict:
        """Triton's model configuration (GET /v2/models/{name}/config), as `stip export-triton` writes it."""
        from stip.runtime.triton_config import config_json, model_config

        return config_json(model_config(self.name, self.inputs, self.outputs, self.pairs, self.cache_specs,
                                        self.key_id, sequence_timeout=self.limits.sequence_timeout,
                                        max_sequences=self.limits.max_sequences))

    # ---- memory ----

    def cache_bytes(self, batch: int, length: int) -> int:
        return sum(batch * length * t.dtype.itemsize * math.prod(d for a, d in enumerate(t.dims)
                                                                   if a not in (0, self.past_axis))
                   for t in self.cache_specs)

    def estimate(self, p: Parsed, past: int) -> int:
        """Bytes this request needs beyond what is already held: inputs, peak activations (with the new cache as
        the graph's present outputs), and the encoded response."""
        feeds_bytes = sum(a.nbytes for a in p.feeds.values())
        values: dict[str, int] = {}
        for spec in self.inputs:
            for a, sym in enumerate(spec.shape):
                if isinstance(sym, str):
                    values[sym] = int(p.feeds[spec.name].shape[a])
        for spec in self.cache_specs:
            for a, sym in enumerate(spec.shape):
                if isinstance(sym, str) and sym not in values:
                    values[sym] = p.batch if a == 0 else past
        if self.memory is not None:
            activations, out_bytes = self.memory.sizes(values)
        else:
            activations, out_bytes = 64 * feeds_bytes + self.cache_bytes(p.batch, past + 1) * 2, {}
        default = max(values.values(), default=1)
        response = json_values = 0
        for n, binary in p.outputs:
            spec = self.output_by_name[n]
            size = out_bytes.get(n) or spec.dtype.itemsize * math.prod(
                d if isinstance(d, int) and d >= 0 else values.get(d, default) for d in spec.shape)
            response += size
            json_values += 0 if binary else size // spec.dtype.itemsize
        if json_values > self.sig.max_json_values:  # refused before running, not after
            raise RequestError(413, f"the JSON response would hold about {json_values} values, over the server's "
                               f"limit of {self.sig.max_json_values} (--max-json-response-bytes); ask for binary "
                               "outputs (parameters.binary_data_output: true, the binary tensor extension)")
        return feeds_bytes + activations + response + json_values * JSON_HEAP_PER_VALUE

    # ---- one request, in a worker thread ----

    def handle(self, body: bytes, header_length: str | None, owner: str, authenticated: bool,
               parsed: tuple[Parsed, dict] | None = None, encode=encode_response):
        """Run one request; `encode(sig, parsed, outputs)` makes the response (HTTP body, or a gRPC message)."""
        p, params = parsed or parse_request(self.sig, body, header_length)
        sequence_params(params, p)
        if not p.feeds:  # end a sequence without a step; the same answer whether or not it was live
            if p.sequence_id is None:
                raise RequestError(400, "a request without inputs must end a sequence (sequence_id, sequence_end)")
            check_id(p.sequence_id, authenticated)
            self.sequences.discard((owner, p.sequence_id))
            return encode(self.sig, p, {})
        if self.batch_source is not None:
            p.batch = int(p.feeds[self.batch_source].shape[0])
        if not self.stateful:  # stateless graphs ignore sequence parameters, as a model without a cache has none
            return self._run_once(p, lambda: self._stateless(p), encode)
        if p.sequence_id is None:
            return self._run_once(p, lambda: self.new_state(p.batch).step(p.feeds)[0], encode)
        check_id(p.sequence_id, authenticated)
        key = (owner, p.sequence_id)
        if p.start and p.end:  # a one-request sequence: nothing to keep (and a live one of that id is ended)
            out = self._run_once(p, lambda: self.new_state(p.batch).step(p.feeds)[0], encode)
            self.sequences.discard(key)
            return out
        seq = self.sequences.open(key, self.name, p.start, p.batch, lambda: self.new_state(p.batch))
        with seq.lock:
            seq.check(p.batch)
            past = seq.state.past_length
            self._check_step(p, past)
            held = seq.held if not p.start else 0
            n = self.budget.reserve(self.estimate(p, past), held)
            try:
                result, present = seq.state.step(p.feeds)
                encoded = encode(self.sig, p, result)
                if p.end:
                    self.sequences.drop(key, seq)
                    return encoded
                seq.state.commit(present)
                seq.last_used = time.monotonic()
                if p.start:
                    self.sequences.register(key, seq)
                self.budget.hold(seq, self.cache_bytes(seq.batch, seq.state.past_length))
            finally:
                self.budget.release(n)
        return encoded

    def _stateless(self, p: Parsed) -> dict[str, np.ndarray]:
        names = [n for n, _ in p.outputs]
        return dict(zip(names, ort_errors(self.session.run, names, p.feeds)))

    def _run_once(self, p: Parsed, run, encode=encode_response):
        if self.stateful:
            self._check_step(p, 0)
        n = self.budget.reserve(self.estimate(p, 0))
        try:
            return encode(self.sig, p, run())
        finally:
            self.budget.release(n)

    def _check_step(self, p: Parsed, past: int) -> None:
        if past >= self.limits.max_seq:
            raise RequestError(400, f"this sequence already holds {past} tokens, the server's limit (--max-seq)")
        if self.mask_input is None or self.new_tokens_input is None:
            return
        name, axis = self.mask_input
        got = int(p.feeds[name].shape[axis])
        new = int(p.feeds[self.new_tokens_input].shape[1])
        if got != past + new:
            raise RequestError(400, f"input '{name}' dim {axis} is {got}, but this sequence holds {past} cached "
                               f"token(s) and the request adds {new}: it must be exactly {past + new}")
