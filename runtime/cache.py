"""Server-held KV cache: past in, present kept, only the user-facing outputs returned.

Why its own module: the in-process runtime, the network server and the plaintext reference all drive ONNX graphs
with `past_key_values.*` inputs the same way; on the server this object is the whole point of the design, since
the client never receives the cache, only permuted logits.
"""

from __future__ import annotations

import numpy as np

from stip.runtime.axes import cache_past_axis
from stip.runtime.bundle_format import pair_cache
from stip.runtime.errors import StipError
from stip.runtime.sessions import run

NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def empty_past(info, batch: int) -> np.ndarray:
    """An empty cache for one `past_key_values.*` input: batch on axis 0, zero past positions."""
    shape = [d if isinstance(d, int) else (batch if a == 0 else 0) for a, d in enumerate(info.shape)]
    return np.zeros(shape, dtype=NP_TYPES.get(info.type, np.float32))


class CachedSession:
    """An ORT session whose KV cache stays inside this object (empty at start; batch is fixed per sequence)."""

    def __init__(self, session, batch: int = 1):
        self.session = session
        ins = {i.name: i for i in session.get_inputs()}
        out_info = {o.name: o for o in session.get_outputs()}
        outs = list(out_info)
        self.pairs = pair_cache(list(ins), outs, "server graph")
        # the axis the cache grows along, from the graph (HF: axis 2), not from a dim's name
        self.past_axis = next((cache_past_axis(list(ins[p].shape), list(out_info[o].shape))
                               for p, o in self.pairs), None)
        self.past: dict[str, np.ndarray] = {}
        for past, _ in self.pairs:
            self.past[past] = empty_past(ins[past], batch)
        self.inputs = [n for n in ins if n not in self.past]
        self.outputs = outs
        self.cache_outputs = {o for _, o in self.pairs}

    @property
    def past_length(self) -> int:
        if self.past_axis is None:
            return 0
        return next((int(v.shape[self.past_axis]) for v in self.past.values()), 0)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise StipError(f"server graph: missing input(s) {', '.join(missing)}")
        values = run(self.session, None, {**{n: feeds[n] for n in self.inputs}, **self.past}, "model")
        result = dict(zip(self.outputs, values))
        for past, present in self.pairs:
            self.past[past] = result.pop(present)
        return result

    def close(self) -> None:
        self.past.clear()
