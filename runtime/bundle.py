"""Run a compiled bundle: pre on the user's side, the server graph, post back on the user's side.

Why one class for all three: verify, the examples and the benchmarks need the same composition, and the
key id check (a client bundle from another compile must fail loudly) belongs in exactly one place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stip.runtime.axes import check_feeds, shape
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
from stip.runtime.cache import NP_TYPES, CachedSession
from stip.runtime.errors import StipError
from stip.runtime.sessions import make_session, run

__all__ = ["CLIENT_MANIFEST", "Client", "LocalDeployment", "Server", "model_key_id"]


def _typed(value, info) -> np.ndarray:
    """A user's array as the graph's input type: integer ids of another width are converted, anything else is
    refused (a float where ids are expected is a mistake, not something to round)."""
    want = NP_TYPES.get(info.type)
    arr = np.asarray(value)
    if want is None or arr.dtype == want:
        return arr
    if np.issubdtype(arr.dtype, np.integer) and np.issubdtype(want, np.integer):
        return arr.astype(want)
    raise StipError(f"input '{info.name}' has dtype {arr.dtype}, the model expects {np.dtype(want).name}")


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
        if self.manifest.get("files"):
            raise StipError(f"{d}: a bundle of several files ({', '.join(self.manifest['files'])}); run it with "
                            "`stip generate` or `stip verify`, or load one file's client directory inside it")
        # a file whose outputs all stay on the server (a seq2seq encoder) has no post graph
        names = (PRE_MODEL, POST_MODEL) if self.manifest.outputs or (d / POST_MODEL).exists() else (PRE_MODEL,)
        for name in names:
            got = model_key_id(d / name)
            if got != self.key_id:
                raise StipError(f"{d / name}: key id {got} does not match the client bundle's {self.key_id}")
        self.pre = make_session(d / PRE_MODEL, device, threads)
        self.post = make_session(d / POST_MODEL, device, threads) if POST_MODEL in names else None
        self.input_names = self.manifest.inputs
        self.output_names = self.manifest.outputs

    def check_server(self, server_key_id: str, where: str) -> None:
        if server_key_id != self.key_id:
            raise StipError(f"{where}: server graph key id {server_key_id} does not match client key id "
                            f"{self.key_id}; the two bundles come from different compiles")

    def prepare(self, feeds: dict[str, np.ndarray],
                past_length: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Returns (what the server receives, pre outputs kept locally for post). `past_length` is how many
        tokens the server's KV cache holds (the client knows it without ever seeing the cache). Inputs the compiler
        fixed (manifest `fixed_inputs`, a merged decoder's use_cache_branch) are accepted and ignored."""
        feeds = {k: v for k, v in feeds.items() if k not in self.manifest.fixed_inputs}
        missing = [n for n in self.input_names if n not in feeds]
        unknown = [n for n in feeds if n not in self.input_names]
        if missing or unknown:
            parts = ([f"unknown model input(s): {', '.join(unknown)}"] if unknown else []) + \
                ([f"missing model input(s): {', '.join(missing)}"] if missing else [])
            raise StipError(f"{'; '.join(parts)} (the model takes {', '.join(self.input_names)})")
        axes = self.manifest.axes
        check_feeds(feeds, axes, past_length)
        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        pre_in = {}
        for i in self.pre.get_inputs():
            if i.name.endswith(CACHE_SHAPE_SUFFIX) and i.name not in feeds:
                cache = i.name[: -len(CACHE_SHAPE_SUFFIX)]
                roles = axes.get(cache) or [d if d is not None else ("batch" if a == 0 else "past")
                                            for a, d in enumerate(self.manifest.cache_dims[cache])]
                pre_in[i.name] = np.array(shape(roles, batch, 0, past_length), dtype=np.int64)
            else:
                pre_in[i.name] = _typed(feeds[i.name], i)
        pre_out = dict(zip([o.name for o in self.pre.get_outputs()], run(self.pre, None, pre_in, PRE_MODEL)))
        to_server = {n: pre_out[n] for n in self.manifest.crossing}
        for n in self.manifest.public:
            to_server[n] = feeds[n]
        return to_server, pre_out

    def finish(self, server_out: dict[str, np.ndarray], pre_out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.post is None:
            return {}
        avail = {**pre_out, **server_out}
        post_in = {i.name: avail[i.name] for i in self.post.get_inputs()}
        return dict(zip(self.output_names, run(self.post, self.output_names, post_in, POST_MODEL)))


class Server:
    """The cloud's half: the permuted server graph and nothing else."""

    def __init__(self, server_dir: str | Path, device: str = "auto", threads: int = 0, session=None):
        """`session`: a caller's session over the server graph (verify's SegmentedSession on large models)."""
        d = Path(server_dir)
        path = d / SERVER_MODEL
        if not path.exists():
            raise StipError(f"{d}: not a stip server bundle (missing {SERVER_MODEL})")
        self.key_id = model_key_id(path)
        self.session = session(path) if session is not None else make_session(path, device, threads)
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

    def __init__(self, bundle_dir: str | Path, device: str = "auto", threads: int = 0, server_session=None):
        lay = Layout(Path(bundle_dir))
        self.client = Client(lay.client_dir, device="cpu", threads=threads)
        self.server = Server(lay.server_dir, device, threads, server_session)
        self.client.check_server(self.server.key_id, str(lay.server_model))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        to_server, pre_out = self.client.prepare(feeds)
        return self.client.finish(self.server.run(to_server), pre_out)
