"""Server-held KV-cache sequences: who owns one, how its cache advances, and when it is freed.

Why owners: a sequence's cache is conditioned on its user's private prompt, and whoever can continue it reads
predictions conditioned on that prompt with their own post.onnx. So a sequence is keyed by (owner, sequence_id):
the owner is the authenticated token's name (--auth-tokens), and a stranger's request with the same id simply
finds nothing: a live id and a never-used id give the same answer, byte for byte. Without authentication every
client has the same owner, and ids must be unguessable instead (see `check_id`).

A step is computed first and committed only after the whole request succeeded (outputs encoded), so a failed
request never moves a cache.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from stip.runtime.cache import empty_past
from stip.runtime.serve_protocol import RequestError

MIN_OPEN_INT_ID = 1 << 32     # without auth: integer ids below this are refused (guessable)
MIN_OPEN_STR_ID = 16          # without auth: string ids shorter than this are refused


def check_id(sid: int | str, authenticated: bool) -> None:
    """Without authentication, the id is the only secret that separates users' sequences: refuse small ones."""
    if authenticated:
        return
    if isinstance(sid, int) and sid < MIN_OPEN_INT_ID:
        raise RequestError(400, f"sequence_id {sid} is guessable: this server has no authentication "
                           f"(--auth-tokens), so a sequence id is what keeps other clients out of it; use a random "
                           f"64-bit id (>= 2**32), as stip's RemoteServer does")
    if isinstance(sid, str) and len(sid) < MIN_OPEN_STR_ID:
        raise RequestError(400, f"a string sequence_id must be at least {MIN_OPEN_STR_ID} random characters on "
                           "a server without authentication (--auth-tokens), e.g. a UUID4")


def ort_errors(fn, *args):
    """ONNX Runtime's complaints about inputs (shapes that disagree inside the graph, indices out of range) are the
    request's fault: a 400 naming the first line. With IO binding ORT raises a plain RuntimeError, caught here
    only around the ORT call itself, so a bug elsewhere still shows as a bug."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    try:
        return fn(*args)
    except (st.InvalidArgument, st.Fail, st.RuntimeException, st.InvalidGraph, RuntimeError, ValueError) as e:
        line = " ".join(str(e).split())
        raise RequestError(400, f"the model rejected these inputs: {line[:300]}")


class HostCache:
    """The KV cache in host memory as numpy arrays (CachedSession's contract, split into step and commit)."""

    def __init__(self, session, pairs: list[tuple[str, str]], batch: int, past_axis: int | None = 2):
        ins = {i.name: i for i in session.get_inputs()}
        self.session = session
        self.past_axis = past_axis  # the axis the cache grows along, read from the graph (Model.past_axis)
        self.pairs = pairs
        self.outputs = [o.name for o in session.get_outputs()]
        self.cache_outputs = {o: p for p, o in pairs}
        self.past = {p: empty_past(ins[p], batch) for p, _ in pairs}
        self.inputs = [n for n in ins if n not in self.past]

    @property
    def past_length(self) -> int:
        if self.past_axis is None:
            return 0
        return next((int(np.shape(v)[self.past_axis]) for v in self.past.values()), 0)

    def step(self, feeds: dict[str, np.ndarray]) -> tuple[dict, dict]:
        values = ort_errors(self.session.run, None, {**{n: feeds[n] for n in self.inputs}, **self.past})
        result, past = {}, {}
        for o, v in zip(self.outputs, values):
            if o in self.cache_outputs:
                past[self.cache_outputs[o]] = v
            else:
                result[o] = v
        return result, past

    def commit(self, past: dict) -> None:
        self.past = past


class BoundCache(HostCache):
    """The same with IO binding: the permuted KV cache stays on the device between steps as OrtValues (CUDA memory
    on a GPU) instead of a round trip through host memory per token."""

    def __init__(self, session, pairs: list[tuple[str, str]], batch: int, device: str, past_axis: int | None = 2):
        import onnxruntime as ort

        super().__init__(session, pairs, batch, past_axis)
        self.device = device
        self.past = {p: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for p, v in self.past.items()}

    @property
    def past_length(self) -> int:
        if self.past_axis is None:
            return 0
        return next((int(v.shape()[self.past_axis]) for v in self.past.values()), 0)

    def step(self, feeds: dict[str, np.ndarray]) -> tuple[dict, dict]:
        b = self.session.io_binding()
        for n in self.inputs:
            b.bind_cpu_input(n, np.ascontiguousarray(feeds[n]))
        for n, v in self.past.items():
            b.bind_ortvalue_input(n, v)
        for o in self.outputs:
            b.bind_output(o, self.device if o in self.cache_outputs else "cpu")
        ort_errors(self.session.run_with_iobinding, b)
        result, past = {}, {}
        for o, v in zip(self.outputs, b.get_outputs()):
            if o in self.cache_outputs:
                past[self.cache_outputs[o]] = v
            else:
                result[o] = v.numpy()
        return result, past


class Sequence:
    """One generation sequence: its cache, a lock so that its requests run one at a time, when it was last used
    (for the idle reaper), and the bytes its cache holds in the memory budget."""

    def __init__(self, state: HostCache, batch: int):
        self.state = state
        self.batch = batch
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self.alive = True
        self.held = 0

    def check(self, batch: int) -> None:
        """Under its lock, before a step: still live (not ended or reaped while the request waited), same batch."""
        if not self.alive:
            raise RequestError(400, "unknown sequence id: it ended or idled out while this request waited")
        if self.batch != batch:
            raise RequestError(400, f"this sequence has batch {self.batch}, this request has {batch}")


Key = tuple[str, int | str]   # (owner, sequence_id)


class SequenceStore:
    """Live sequences of one model by (owner, id). `on_free(seq)` is called for every sequence that leaves."""

    def __init__(self, max_sequences: int, timeout: float, on_free=None, per_owner: int = 0):
        self.max_sequences = max_sequences
        self.per_owner = per_owner or max_sequences
        self.timeout = timeout
        self.items: dict[Key, Sequence] = {}
        self.lock = threading.Lock()
        self.on_free = on_free or (lambda seq: None)

    def __len__(self) -> int:
        return len(self.items)

    def _full(self) -> RequestError:
        return RequestError(429, f"too many live sequences ({len(self.items)}, the server's limit "
                            "--max-sequences); end finished sequences or retry later")

    def _room(self, key: Key) -> None:
        """Under the lock: a new key must fit under both caps (one client cannot take every slot)."""
        if key in self.items:
            return
        if len(self.items) >= self.max_sequences:
            raise self._full()
        if sum(1 for owner, _ in self.items if owner == key[0]) >= self.per_owner:
            raise RequestError(429, f"this client has {self.per_owner} live sequences, the server's limit per "
                               "client (--max-sequences-per-client); end finished sequences or retry later")

    def check_room(self, key: Key) -> None:
        with self.lock:
            self._room(key)

    def open(self, key: Key, model: str, start: bool, batch: int, new_state) -> Sequence:
        """The request's sequence: on a start, a new one if there is room (registered only after its first step
        succeeds); otherwise the owner's live one."""
        if start:
            self.check_room(key)
            return Sequence(new_state(), batch)
        return self.get(key, model)

    def get(self, key: Key, model: str) -> Sequence:
        """The owner's live sequence; the same error whether the id was never used or is someone else's."""
        with self.lock:
            seq = self.items.get(key)
            if seq is not None:
                seq.last_used = time.monotonic()  # a queued request keeps its sequence from idling out
        if seq is None:
            raise RequestError(400, f"unknown sequence id for model '{model}': start a sequence with "
                               "sequence_start=true (it may have ended or idled out)")
        return seq

    def register(self, key: Key, seq: Sequence) -> None:
        """After a successful start: replaces the owner's live sequence of the same id (as Triton does)."""
        with self.lock:
            old = self.items.get(key)
            self._room(key)
            self.items[key] = seq
        if old is not None:
            self._free(old)

    def _free(self, seq: Sequence) -> None:
        seq.alive = False
        self.on_free(seq)

    def drop(self, key: Key, seq: Sequence) -> None:
        with self.lock:
            if self.items.get(key) is seq:
                del self.items[key]
        self._free(seq)

    def discard(self, key: Key) -> None:
        with self.lock:
            seq = self.items.pop(key, None)
        if seq is not None:
            with seq.lock:
                self._free(seq)

    def reap(self, now: float) -> int:
        """Free sequences idle for longer than the timeout; one busy with a request is never freed."""
        freed = []
        with self.lock:
            for key, seq in list(self.items.items()):
                if now - seq.last_used > self.timeout and seq.lock.acquire(blocking=False):
                    try:
                        del self.items[key]
                        seq.alive = False
                        freed.append(seq)
                    finally:
                        seq.lock.release()
        for seq in freed:
            self.on_free(seq)
        return len(freed)
