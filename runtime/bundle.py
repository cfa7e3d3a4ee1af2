"""Run a compiled bundle: pre on the user's side, the server graph, post back on the user's side.

Why one class for all three: verify, the examples and the benchmarks need the same composition, and the
key id check (a client bundle from another compile must fail loudly) belongs in exactly one place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stip.runtime.bundle_format import (
    CACHE_SHAPE_SUFFIX,
    CLIENT_MANIFEST,
    POST_MODEL,
    PRE_MODEL,
    SERVER_MODEL,
    Layout,
    Manifest,
    model_key_id,
)
from stip.runtime.cache import CachedSession
from stip.runtime.errors import StipError
from stip.runtime.sessions import make_session

__all__ = ["CLIENT_MANIFEST", "Client", "LocalDeployment", "Server", "model_key_id"]


class Client:
    """The user's half: runs pre (permuted embedding) and post (un-permute outputs) locally."""

    def __init__(self, client_dir: str | Path, device: str = "cpu", threads: int = 0):
        d = Path(client_dir)
        man = d / CLIENT_MANIFEST
        if not man.exists():
            raise StipError(f"{d}: not a stip client bundle (missing {CLIENT_MANIFEST})")
        self.dir = d
        self.manifest = Manifest.read(man)
        self.key_id = self.manifest.key_id
        for name in (PRE_MODEL, POST_MODEL):
            got = model_key_id(d / name)
            if got != self.key_id:
                raise StipError(f"{d / name}: key id {got} does not match the client bundle's {self.key_id}")
        self.pre = make_session(d / PRE_MODEL, device, threads)
        self.post = make_session(d / POST_MODEL, device, threads)
        self.input_names = self.manifest.inputs
        self.output_names = self.manifest.outputs

    def check_server(self, server_key_id: str, where: str) -> None:
        if server_key_id != self.key_id:
            raise StipError(f"{where}: server graph key id {server_key_id} does not match client key id "
                            f"{self.key_id}; the two bundles come from different compiles")

    def prepare(self, feeds: dict[str, np.ndarray],
                past_length: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Returns (what the server receives, pre outputs kept locally for post). `past_length` is how many
        tokens the server's KV cache holds (the client knows it without ever seeing the cache)."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise StipError(f"missing model input(s): {', '.join(missing)}")
        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        pre_in = {}
        for i in self.pre.get_inputs():
            if i.name.endswith(CACHE_SHAPE_SUFFIX) and i.name not in feeds:
                dims = self.manifest.cache_dims[i.name[: -len(CACHE_SHAPE_SUFFIX)]]
                pre_in[i.name] = np.array([batch if a == 0 else (past_length if d is None else d)
                                           for a, d in enumerate(dims)], dtype=np.int64)
            else:
                pre_in[i.name] = feeds[i.name]
        pre_out = dict(zip([o.name for o in self.pre.get_outputs()], self.pre.run(None, pre_in)))
        to_server = {n: pre_out[n] for n in self.manifest.crossing}
        for n in self.manifest.public:
            to_server[n] = feeds[n]
        return to_server, pre_out

    def finish(self, server_out: dict[str, np.ndarray], pre_out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        avail = {**pre_out, **server_out}
        post_in = {i.name: avail[i.name] for i in self.post.get_inputs()}
        return dict(zip(self.output_names, self.post.run(self.output_names, post_in)))


class Server:
    """The cloud's half: the permuted server graph and nothing else."""

    def __init__(self, server_dir: str | Path, device: str = "auto", threads: int = 0):
        d = Path(server_dir)
        path = d / SERVER_MODEL
        if not path.exists():
            raise StipError(f"{d}: not a stip server bundle (missing {SERVER_MODEL})")
        self.key_id = model_key_id(path)
        self.session = make_session(path, device, threads)
        self.path = self.where = path
        probe = CachedSession(self.session)
        self.input_names, self.output_names = probe.inputs, [o for o in probe.outputs
                                                             if o not in probe.cache_outputs]
        self.has_cache = bool(probe.pairs)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def sequence(self, steps: int | None = None, batch: int = 1) -> CachedSession:
        """A generation whose KV cache this server keeps (in process: the object itself)."""
        return CachedSession(self.session, batch)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One stateless request (a cache model starts from an empty cache and keeps nothing)."""
        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        return CachedSession(self.session, batch).run(feeds)


class LocalDeployment:
    """All three parts in one process: for verify, examples and benchmarks."""

    def __init__(self, bundle_dir: str | Path, device: str = "auto", threads: int = 0):
        lay = Layout(Path(bundle_dir))
        self.client = Client(lay.client_dir, device="cpu", threads=threads)
        self.server = Server(lay.server_dir, device, threads)
        self.client.check_server(self.server.key_id, str(lay.server_model))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        to_server, pre_out = self.client.prepare(feeds)
        return self.client.finish(self.server.run(to_server), pre_out)
