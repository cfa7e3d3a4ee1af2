"""The traffic users would send: prompts (random token ids, or texts through the shipped tokenizer) run through
the client's pre, exactly as a client does before each request."""

from __future__ import annotations

import numpy as np

from stip.compiler.audit.view import View, run_pre
from stip.passes.errors import StipError

INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


def prompt_ids(view: View, samples: int, seq: int, prompts: list[str] | None, seed: int = 0) -> np.ndarray:
    """[samples, seq] token ids: random over the vocabulary, or the given texts (cut/padded to one length)."""
    if prompts:
        from stip.runtime.generate import _load_tokenizer

        tok_dir = view.manifest.tokenizer
        if not tok_dir:
            raise StipError(f"{view.path}: --prompt needs a bundle compiled with --tokenizer DIR")
        tok = _load_tokenizer(view.path / "client" / tok_dir)
        rows = [list(tok.encode(t).ids) for t in prompts]
        if any(not r for r in rows):
            raise StipError("--prompt: a prompt encodes to no tokens")
        n = min(len(r) for r in rows)
        return np.array([r[:n] for r in rows], dtype=np.int64)
    rng = np.random.default_rng(seed)
    return rng.integers(0, view.vocab, size=(samples, seq)).astype(np.int64)


def user_feeds(view: View, ids: np.ndarray) -> dict[str, np.ndarray]:
    """All model inputs for these prompts: other private ids (token types) zero, full masks, positions 0..n-1."""
    b, s = ids.shape
    types = {i.name: i.type for i in view.pre.get_inputs()}
    feeds = {}
    for name in view.manifest.inputs:
        dt = INT.get(types.get(name, "tensor(int64)"), np.int64)
        low = name.lower()
        if name == view.token_input:
            feeds[name] = ids.astype(dt)
        elif "position" in low:
            feeds[name] = np.broadcast_to(np.arange(s), (b, s)).astype(dt)
        elif "mask" in low:
            feeds[name] = np.ones((b, s), dtype=dt)
        else:
            feeds[name] = np.zeros((b, s), dtype=dt)
    return feeds


def server_inputs(view: View, pre_session, feeds: dict[str, np.ndarray], crossing: list[str]) -> dict:
    """What the server receives: pre's crossing tensors (named as the bundle names them) and the public inputs."""
    out = run_pre(pre_session, view.manifest, feeds)
    sent = {n: out[n] for n in crossing}
    sent.update({n: feeds[n] for n in view.manifest.public})
    return sent
