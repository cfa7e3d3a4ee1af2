"""Private text generation: one round trip per token, the KV cache kept by the server in permuted bases.

Per token: the server graph runs with its cache; post un-permutes the logits on the user's machine; the user
samples; pre embeds the next token. The same loop drives the plaintext model (for equivalence tests and the
benchmark), so the only difference between the two is the bundle.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stip.runtime.axes import shape
from stip.runtime.bundle import Client, Server
from stip.runtime.bundle_format import SERVER_DIR, find_client_dir
from stip.runtime.cache import CachedSession
from stip.runtime.errors import StipError
from stip.runtime.sessions import make_session

Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Sampler:
    """Greedy at temperature 0; otherwise temperature, top-k and top-p (nucleus) sampling from a seeded rng."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise StipError("sampling: need temperature >= 0, top-k >= 0 and 0 < top-p <= 1")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        if self.top_k:
            kth = np.sort(z)[-min(self.top_k, z.size)]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < self.top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0)
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))


def decode(step: Step, input_names: list[str], prompt: list[int], max_new_tokens: int, sampler: Sampler,
           cached: bool, logits_name: str = "logits", axes: dict[str, list] | None = None) -> Iterator[int]:
    """Prefill, then one step per token. Without a cache, each step re-runs the whole sequence.

    Inputs by their Hugging Face names (input_ids, attention_mask, position_ids, in any order); each one's length
    follows its axis role (`axes`, from the manifest): the mask spans past + new tokens when its axis is the total."""
    unknown = [n for n in input_names if n not in ("input_ids", "attention_mask", "position_ids")]
    if unknown or "input_ids" not in input_names:
        raise StipError(f"generation feeds input_ids, attention_mask and position_ids; this model takes "
                        f"{', '.join(input_names)}")
    ids = list(prompt)
    fed = 0  # tokens the model has already seen (cached runs feed only the new ones)
    for _ in range(max_new_tokens):
        new = ids[fed:] if cached else ids
        start = fed if cached else 0
        mask_roles = (axes or {}).get("attention_mask", ["batch", "total"])
        feeds = {"input_ids": np.array([new], dtype=np.int64),
                 "attention_mask": np.ones(shape(mask_roles, 1, len(new), start), dtype=np.int64),
                 "position_ids": np.arange(start, start + len(new), dtype=np.int64)[None]}
        out = step({k: v for k, v in feeds.items() if k in input_names})
        if cached:
            fed = len(ids)
        token = sampler(out[logits_name][0, -1])
        ids.append(token)
        yield token


class TokenText:
    """Text in and out through the tokenizer a bundle ships (`self.tokenizer`, or None: ids only); shared by the
    one-file and the multi-file generators."""

    tokenizer = None

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise StipError("this bundle has no tokenizer (compile with --tokenizer DIR); use --prompt-ids")
        return list(self.tokenizer.encode(text).ids)

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else " ".join(map(str, ids))


class StipGenerator(TokenText):
    """The user's side of private generation against a server (in-process here; over HTTP in serving)."""

    def __init__(self, bundle_dir: str | Path, device: str = "auto", server=None, threads: int = 0):
        """`bundle_dir`: a bundle root or its client/ dir. `server`: a local Server (default: bundle/server) or
        a stip.runtime.remote.RemoteServer; anything with `key_id` and `sequence()`."""
        client_dir = find_client_dir(bundle_dir)
        self.client = Client(client_dir, device="cpu", threads=threads)
        self.server = server or Server(client_dir.parent / SERVER_DIR, device, threads)
        self.client.check_server(self.server.key_id, str(getattr(self.server, "where", "server")))
        man = self.client.manifest
        self.cached = bool(man.get("cache"))
        self.vocab = man.get("vocab_size", {}).get("input_ids")
        self.max_context = man.get("max_context")
        self.tokenizer = None
        if man.get("tokenizer"):
            self.tokenizer = _load_tokenizer(client_dir / man["tokenizer"])

    def check(self, prompt: list[int], max_new_tokens: int) -> None:
        if not prompt:
            raise StipError("empty prompt")
        if self.vocab is not None:
            bad = [t for t in prompt if not 0 <= t < self.vocab]
            if bad:
                raise StipError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})")
        if self.max_context is not None and len(prompt) + max_new_tokens > self.max_context:
            raise StipError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the model's "
                            f"context of {self.max_context} tokens")

    def generate(self, prompt: list[int], max_new_tokens: int, sampler: Sampler | None = None) -> Iterator[int]:
        self.check(prompt, max_new_tokens)
        if "logits" not in self.client.output_names:
            raise StipError(f"{self.client.dir}: not a text-generation bundle (no 'logits' output; outputs: "
                            f"{', '.join(self.client.output_names)}); use `stip run` for other models")
        if not self.cached and max_new_tokens > 1:
            warnings.warn("bundle compiled without a KV cache: re-running the whole prompt for every new token",
                          stacklevel=2)
        seq = self.server.sequence(steps=max_new_tokens)

        fed = [0]  # tokens the server's cache holds; the client counts them, it never sees the cache

        def step(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            to_server, kept = self.client.prepare(feeds, fed[0] if self.cached else 0)
            # only the last position's logits are sampled: post (position-wise) un-permutes just that one
            returned = {k: v[:, -1:] if v.ndim == 3 else v for k, v in seq.run(to_server).items()}
            out = self.client.finish(returned, kept)
            fed[0] += int(feeds["input_ids"].shape[1])
            return out

        try:
            yield from decode(step, self.client.input_names, prompt, max_new_tokens, sampler or Sampler(),
                              self.cached, axes=self.client.manifest.axes)
        finally:
            seq.close()


def generate_plaintext(model: str | Path, prompt: list[int], max_new_tokens: int,
                       sampler: Sampler | None = None, device: str = "cpu") -> list[int]:
    """The same loop on the original model: the reference for greedy equivalence."""
    seq = CachedSession(make_session(model, device))
    return list(decode(seq.run, seq.inputs, prompt, max_new_tokens, sampler or Sampler(), bool(seq.pairs)))


def _load_tokenizer(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - tokenizers is a runtime dependency
        raise StipError("text prompts need the `tokenizers` package") from e
    f = path / "tokenizer.json"
    if not f.exists():
        raise StipError(f"{path}: no tokenizer.json (a Hugging Face fast tokenizer directory is expected)")
    return Tokenizer.from_file(str(f))


def stream(gen: StipGenerator, prompt: list[int], max_new_tokens: int, sampler: Sampler, out=sys.stdout) -> list[int]:
    """Print tokens as they arrive (text when the bundle has a tokenizer, ids otherwise)."""
    ids: list[int] = []
    shown = ""
    for token in gen.generate(prompt, max_new_tokens, sampler):
        ids.append(token)
        if gen.tokenizer is not None:
            text = gen.decode_text(ids)
            out.write(text[len(shown):])
            shown = text
        else:
            out.write(("" if len(ids) == 1 else " ") + str(token))
        out.flush()
    out.write("\n")
    return ids
