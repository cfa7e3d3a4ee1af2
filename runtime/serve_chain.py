"""Serving a bundle of several files (stip.compiler.multifile): each file is a model `NAME.ROLE` on the KServe v2
endpoint, and one sequence id names one generation across all of them.

Why one sequence store for all files: the encoder's output, the prefill's presents and the cross-attention cache
are written by one file and read by the next, on the server, in their permuted bases; they never go back to the
client. So the state of a sequence is a set of named tensors (keyed by the input that reads them), shared by the
models of one bundle, and each request runs its file with the client's inputs plus that state. A sequence starts
with the first file (the encoder, or the prefill decoder) and ends with sequence_end on any of them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from stip.runtime.bundle_format import CHAIN_PROP, SERVER_DIR, SERVER_MODEL, expected_output, is_cache_input
from stip.runtime.errors import StipError
from stip.runtime.serve_model import Model
from stip.runtime.serve_protocol import RequestError, encode_response, parse_request, sequence_params
from stip.runtime.serve_sequences import check_id, ort_errors


def chain_roles(path: str | Path) -> list[Path] | None:
    """The role directories of a multi-file bundle's server part (bundle root or server/), in run order, or None."""
    p = Path(path)
    for d in (p, p / SERVER_DIR):
        if (d / SERVER_MODEL).is_file():  # a one-file bundle
            return None
        dirs = sorted(x for x in d.iterdir() if (x / SERVER_MODEL).is_file()) if d.is_dir() else []
        info = _chain_info(dirs[0] / SERVER_MODEL) if dirs else None
        if info is not None:
            missing = [r for r in info["roles"] if not (d / r / SERVER_MODEL).is_file()]
            if missing:
                raise StipError(f"{d}: the server part of a multi-file bundle without its file '{missing[0]}' "
                                f"({d / missing[0] / SERVER_MODEL})")
            return [d / r for r in info["roles"]]
    return None


def _chain_info(path: Path) -> dict | None:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[CHAIN_PROP]) if CHAIN_PROP in props else None


class ChainState:
    """One sequence's server-held tensors, by the input name that reads them."""

    def __init__(self) -> None:
        self.values: dict[str, np.ndarray] = {}

    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.values.values())


class ChainModel(Model):
    """One file of a multi-file bundle. Its sequences live in the store all files of the bundle share."""

    def __init__(self, name: str, role_dir: Path, **kw):
        info = _chain_info(role_dir / SERVER_MODEL)
        if info is None:
            raise StipError(f"{role_dir / SERVER_MODEL}: not a server graph of a multi-file bundle (no {CHAIN_PROP} "
                            "metadata)")
        self.role, self.roles, self.links = info["role"], info["roles"], info["links"]
        super().__init__(name, role_dir, **kw)
        self.io_binding = False  # host state: shared between sessions of several files
        outs = {o.name for o in self.session.get_outputs()}
        self.feeds_to: dict[str, set[str]] = {}
        for src, out, _dst, inp in self.links:
            if src == self.role:
                self.feeds_to.setdefault(out, set()).add(inp)
        for p, o in self.pairs:
            if o in outs:
                self.feeds_to.setdefault(o, set()).add(p)
        self.state_inputs = [i.name for i in self.session.get_inputs() if i.name not in self.input_by_name]

    def _cache_pairs(self, ins: list[str], outs: list[str]) -> list[tuple[str, str]]:
        return [(i, expected_output(i)) for i in ins if is_cache_input(i) and expected_output(i) in outs]

    def _held(self) -> tuple[set[str], set[str]]:
        return ({i for _s, _o, d, i in self.links if d == self.role},
                {o for s, o, _d, _i in self.links if s == self.role})

    @property
    def stateful(self) -> bool:
        return True

    def handle(self, body: bytes, header_length: str | None, owner: str, authenticated: bool,
               parsed=None, encode=encode_response):
        p, params = parsed or parse_request(self.sig, body, header_length)
        sequence_params(params, p)
        first = f"{self.name.rsplit('.', 1)[0]}.{self.roles[0]}"
        if p.sequence_id is None:
            raise RequestError(400, f"model '{self.name}' is one file of a multi-file model: each request belongs to "
                               f"a sequence (sequence_id), started by model '{first}' with sequence_start=true")
        check_id(p.sequence_id, authenticated)
        key = (owner, p.sequence_id)
        if not p.feeds:
            if not p.end:
                raise RequestError(400, "a request without inputs must end a sequence (sequence_id, sequence_end)")
            self.sequences.discard(key)
            return encode(self.sig, p, {})
        if self.batch_source is not None:
            p.batch = int(p.feeds[self.batch_source].shape[0])
        else:
            p.batch = next((int(v.shape[0]) for v in p.feeds.values() if np.ndim(v) >= 2), 1)  # not a shape vector
        if p.start and self.role != self.roles[0]:
            raise RequestError(400, f"a sequence of this model starts with model '{first}', not '{self.name}'")
        seq = self.sequences.open(key, self.name, p.start, p.batch, ChainState)
        with seq.lock:
            seq.check(p.batch)
            missing = [n for n in self.state_inputs if n not in seq.state.values]
            if missing:
                raise RequestError(400, f"this sequence holds no '{missing[0]}' yet: run the model's files in order "
                                   f"({', '.join(self.roles)})")
            n = self.budget.reserve(self.estimate(p, self._past(seq.state)), seq.held if not p.start else 0)
            try:
                full = {**{k: p.feeds[k] for k in self.input_by_name},
                        **{k: seq.state.values[k] for k in self.state_inputs}}
                values = ort_errors(self.session.run, None, full)
                result, new = {}, {}
                for o, v in zip([o.name for o in self.session.get_outputs()], values):
                    if o in self.feeds_to:
                        new.update(dict.fromkeys(self.feeds_to[o], v))
                    else:
                        result[o] = v
                encoded = encode(self.sig, p, result)
                if p.end:
                    self.sequences.drop(key, seq)
                    return encoded
                seq.state.values.update(new)
                seq.last_used = time.monotonic()
                if p.start:
                    self.sequences.register(key, seq)
                self.budget.hold(seq, seq.state.nbytes())
            finally:
                self.budget.release(n)
        return encoded

    def _past(self, state: ChainState) -> int:
        if self.past_axis is None or not self.pairs:
            return 0
        v = state.values.get(self.pairs[0][0])
        return 0 if v is None else int(v.shape[self.past_axis])


def chain_models(name: str, path: str | Path, **kw) -> list[ChainModel] | None:
    """Models `name.role` for a multi-file bundle's server part (sharing one sequence store), or None."""
    dirs = chain_roles(path)
    if dirs is None:
        return None
    models = [ChainModel(f"{name}.{d.name}", d, **kw) for d in dirs]
    store = models[0].sequences
    for m in models[1:]:
        m.sequences = store
    return models
