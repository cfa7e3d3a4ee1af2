"""The bundle format, in one place: the layout on disk, the client manifest, and the key-id conventions.

Why one module: the compiler writes bundles and the runtime, the server, `inspect` and `export-triton` read them.
When each of them spelled `client/stip.json` or the metadata names itself, a change in one place broke another
silently. This module imports nothing from stip but StipError, so a client process can read a bundle without
loading the compiler.

    server/model.onnx (+ model.onnx.data)  the permuted server graph; metadata stip.key_id, stip.role
    client/pre.onnx, client/post.onnx      the user's graphs; same key id
    client/stip.json                       the manifest (Manifest below)
    client/tokenizer/                      optional, for text prompts
    developer/key.npz                      the key (mode 0600, in a 0700 directory)
    developer/report.json                  the compile report
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from stip.runtime.errors import StipError

SERVER_DIR, CLIENT_DIR, DEVELOPER_DIR = "server", "client", "developer"
PARTS = (SERVER_DIR, CLIENT_DIR, DEVELOPER_DIR)
SERVER_MODEL = "model.onnx"                  # in server/
PRE_MODEL, POST_MODEL = "pre.onnx", "post.onnx"  # in client/
CLIENT_MANIFEST = "stip.json"                # in client/
TOKENIZER_DIR = "tokenizer"                  # in client/
KEY_FILE, REPORT_FILE = "key.npz", "report.json"  # in developer/

KEY_ID_PROP = "stip.key_id"    # ONNX metadata_props of all three graphs: which compile they come from
ROLE_PROP = "stip.role"        # ... and which part each one is
ROLES = {"pre": "client.pre", "server": "server", "post": "client.post"}
CHAIN_PROP = "stip.chain"      # multi-file bundles' server graphs: {"role", "roles", "links"} (names only)
KEY_ID_PARAMETER = "stip_key_id"  # the key id in OIP model metadata and Triton's config parameters
CACHE_SHAPE_SUFFIX = ".shape"     # pre.onnx input `<cache input>.shape`: the client fills in the cache's shape


@dataclass(frozen=True)
class Layout:
    """Where each file of the bundle rooted at `root` lives."""

    root: Path

    @property
    def server_dir(self) -> Path:
        return self.root / SERVER_DIR

    @property
    def client_dir(self) -> Path:
        return self.root / CLIENT_DIR

    @property
    def developer_dir(self) -> Path:
        return self.root / DEVELOPER_DIR

    @property
    def server_model(self) -> Path:
        return self.server_dir / SERVER_MODEL

    @property
    def pre(self) -> Path:
        return self.client_dir / PRE_MODEL

    @property
    def post(self) -> Path:
        return self.client_dir / POST_MODEL

    @property
    def manifest(self) -> Path:
        return self.client_dir / CLIENT_MANIFEST

    @property
    def key(self) -> Path:
        return self.developer_dir / KEY_FILE

    @property
    def report(self) -> Path:
        return self.developer_dir / REPORT_FILE


def find_client_dir(path: str | Path) -> Path:
    """A bundle root or its client/ directory -> the directory holding stip.json."""
    p = Path(path)
    for d in (p, p / CLIENT_DIR):
        if (d / CLIENT_MANIFEST).is_file():
            return d
    raise StipError(f"{p}: not a stip bundle nor its client/ directory (no {CLIENT_DIR}/{CLIENT_MANIFEST})")


def find_server_dir(path: str | Path) -> Path:
    """A bundle root or its server/ directory -> the directory holding model.onnx."""
    p = Path(path)
    for d in (p, p / SERVER_DIR):
        if (d / SERVER_MODEL).is_file():
            return d
    for d in (p, p / SERVER_DIR):  # a multi-file bundle: server/<role>/model.onnx (stip.compiler.multifile)
        roles = sorted(x.name for x in d.iterdir() if (x / SERVER_MODEL).is_file()) if d.is_dir() else []
        if roles:
            raise StipError(f"{p}: a bundle of several files ({', '.join(roles)}); this command takes one file's "
                            "server graph: multi-file bundles run with `stip serve`, `stip generate` and "
                            "`stip verify`")
    raise StipError(f"{p}: not a stip server bundle (no {SERVER_MODEL}, nor {SERVER_DIR}/{SERVER_MODEL})")


def not_a_bundle(path: Path) -> str | None:
    """Why `path` (an existing directory) is not a bundle written by `stip compile`, or None if it is one:
    only server/, client/ and developer/ at the top, and a readable manifest (or server graph with a key id)."""
    entries = sorted(x.name for x in path.iterdir())
    stray = [n for n in entries if n not in PARTS or (path / n).is_symlink() or not (path / n).is_dir()]
    if stray:
        more = f" and {len(stray) - 1} more" if len(stray) > 1 else ""
        return f"it holds '{stray[0]}'{more}, which stip compile does not write"
    lay = Layout(path)
    try:
        if lay.manifest.is_file():
            Manifest.read(lay.manifest)
        elif lay.server_model.is_file():
            model_key_id(lay.server_model)
        else:
            return f"it has neither {CLIENT_DIR}/{CLIENT_MANIFEST} nor {SERVER_DIR}/{SERVER_MODEL}"
    except StipError as e:
        return str(e)
    return None


def model_key_id(path: Path) -> str:
    """The key id in a bundle graph's metadata (read without its weights)."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user error
        raise StipError(f"{path}: not an ONNX model ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})")
    props = {p.key: p.value for p in m.metadata_props}
    if KEY_ID_PROP not in props:
        raise StipError(f"{path}: not a stip bundle graph (no {KEY_ID_PROP} metadata)")
    return props[KEY_ID_PROP]


# ---- the client manifest ----

def _strs(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _dims(v) -> bool:
    return isinstance(v, list) and all(x is None or (isinstance(x, int) and not isinstance(x, bool)) for x in v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


AXIS_ROLES = ("batch", "new", "past", "total")  # what an input axis is, read from the graph (stip.passes.axes)
REQUIRED = ("key_id", "inputs", "private", "public", "crossing", "outputs")
_CHECKS = {  # field -> (valid?, what it must be)
    "key_id": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "inputs": (_strs, "a list of input names"),
    "private": (_strs, "a list of input names"),
    "public": (_strs, "a list of input names"),
    "crossing": (_strs, "a list of tensor names"),
    "outputs": (_strs, "a list of output names"),
    "cache": (lambda v: isinstance(v, list) and all(_strs(p) and len(p) == 2 for p in v),
              "a list of [cache input, cache output] pairs"),
    "cache_dims": (lambda v: isinstance(v, dict) and all(_dims(d) for d in v.values()),
                   "a map from cache input to dims (integers or null)"),
    "head": (lambda v: v in ("server", "client"), "'server' or 'client'"),
    "vocab_size": (lambda v: isinstance(v, dict) and all(_int(x) and x > 0 for x in v.values()),
                   "a map from input name to a positive integer"),
    "max_context": (lambda v: v is None or (_int(v) and v > 0), "a positive integer or null"),
    "axes": (lambda v: isinstance(v, dict) and all(
        isinstance(r, list) and all(x in AXIS_ROLES or (_int(x) and x > 0) for x in r) for r in v.values()),
        "a map from input name to axis roles ('batch', 'new', 'past', 'total' or a size)"),
    "fixed_inputs": (lambda v: isinstance(v, dict) and all(isinstance(x, bool) for x in v.values()),
                     "a map from input name to true or false"),
    "tokenizer": (lambda v: v is None or (isinstance(v, str) and bool(re.fullmatch(r"[\w.-]+", v)) and v != ".."),
                  "null or the name of a directory inside client/"),
}


@dataclass
class Manifest:
    """client/stip.json: what the user's side needs to run pre and post and talk to the server.

    Fields a newer stip adds are kept in `extra` and written back. Item access (`m["cache"]`, `m.get(...)`)
    reads fields and extras alike, as code written against the JSON does."""

    key_id: str
    inputs: list[str]            # the model inputs the user feeds (no cache inputs)
    private: list[str]           # inputs that pre permutes or embeds; never sent
    public: list[str]            # inputs sent to the server as they are (masks, positions)
    crossing: list[str]          # pre outputs sent to the server
    outputs: list[str]           # what post returns to the user
    cache: list[list[str]] = field(default_factory=list)   # server-held [past input, present output] pairs
    cache_dims: dict[str, list[int | None]] = field(default_factory=dict)
    head: str = "server"         # where the LM head runs
    vocab_size: dict[str, int] = field(default_factory=dict)  # valid id range per integer private input
    max_context: int | None = None
    tokenizer: str | None = None  # directory inside client/
    axes: dict[str, list[str | int]] = field(default_factory=dict)  # input -> each axis's role or required size
    # inputs of the original the compiler fixed (a merged decoder's use_cache_branch -> the with-past branch's
    # value): not model inputs of the bundle; a caller that still feeds them has them ignored
    fixed_inputs: dict[str, bool] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, where: str = CLIENT_MANIFEST) -> Manifest:
        """Validated: a missing or mistyped field is one StipError naming the file and the field."""
        if not isinstance(d, dict):
            raise StipError(f"{where}: expected a JSON object, got {type(d).__name__}")
        names = [f.name for f in fields(cls) if f.name != "extra"]
        for name in REQUIRED:
            if name not in d:
                raise StipError(f"{where}: field '{name}' is missing; this file was not written by stip compile "
                                "(or is damaged): recompile the bundle")
        for name in names:
            if name in d:
                ok, what = _CHECKS[name]
                if not ok(d[name]):
                    raise StipError(f"{where}: field '{name}' must be {what}, got {json.dumps(d[name])[:80]}")
        return cls(**{n: d[n] for n in names if n in d}, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        if self.tokenizer is None:
            del d["tokenizer"]
        if not self.fixed_inputs:
            del d["fixed_inputs"]
        return {**d, **self.extra}

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise StipError(f"{path}: cannot read the bundle manifest ({e.strerror})")
        try:
            d = json.loads(text)
        except ValueError as e:
            raise StipError(f"{path}: not valid JSON ({e}); recompile the bundle")
        return cls.from_dict(d, str(path))

    def write(self, path: str | Path) -> None:
        Manifest.from_dict(self.to_dict(), str(path))  # never write what the reader would refuse
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def __getitem__(self, key: str):
        if key in _CHECKS:
            return getattr(self, key)
        return self.extra[key]

    def get(self, key: str, default=None):
        return getattr(self, key) if key in _CHECKS else self.extra.get(key, default)


# ---- KV-cache naming: the server graph's state inputs and outputs ----
# Decoders exported by torch.onnx and optimum name the cache `past_key_values.{i}.key/value` in and
# `present.{i}.key/value` out. The compiler must not pin those inputs (they carry permuted heads and head dims),
# the client must never see them, and a cache input without its output is a broken graph worth one clear error.

_PAST = re.compile(r"^(past_key_values|past_key_value|past)([._].*)$")


def is_cache_input(name: str) -> bool:
    return bool(_PAST.match(name))


def is_cache_output(name: str) -> bool:
    return name.startswith("present")


def expected_output(name: str) -> str:
    m = _PAST.match(name)
    return "present" + m.group(2) if m else name


def pair_cache(inputs: list[str], outputs: list[str], where: str = "graph") -> list[tuple[str, str]]:
    """(cache input, cache output) pairs; raises StipError naming the first one that has no partner."""
    pairs = []
    for name in inputs:
        if not is_cache_input(name):
            continue
        want = expected_output(name)
        if want not in outputs:
            raise StipError(f"{where}: cache input '{name}' has no matching output '{want}' "
                            "(a decoder's cache inputs must pair with its present outputs; if this file is one of "
                            "several that optimum wrote, compile them together: stip compile DIR -o OUT)")
        pairs.append((name, want))
    paired = {o for _, o in pairs}
    for o in outputs:
        if is_cache_output(o) and o not in paired:
            raise StipError(f"{where}: cache output '{o}' has no matching input "
                            f"'{o.replace('present', 'past_key_values', 1)}' (if this file is one of several that "
                            "optimum wrote, compile them together: stip compile DIR -o OUT)")
    return pairs
