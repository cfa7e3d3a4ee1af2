"""Run a bundle of several files (seq2seq encoder + decoders, or a prefill + with-past decoder pair).

Why one runner for both sides: the plaintext original files and the bundle's server graphs pass the same tensors
between files (encoder output -> encoder_hidden_states, presents -> past_key_values), so `Chain` does that for
both, and the only difference between a reference run and a private run is the client's pre/post around each call.
The server-held state (encoder output, both caches) lives in the Chain; the client never receives it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stip.runtime.bundle import Client
from stip.runtime.bundle_format import (
    SERVER_DIR,
    SERVER_MODEL,
    Manifest,
    expected_output,
    find_client_dir,
    is_cache_input,
    model_key_id,
)
from stip.runtime.errors import StipError
from stip.runtime.generate import Sampler, TokenText, _load_tokenizer
from stip.runtime.sessions import make_session, run


def is_multifile_bundle(bundle_dir: str | Path) -> bool:
    try:
        d = find_client_dir(bundle_dir)
    except StipError:
        return False
    return bool(Manifest.read(d / "stip.json").get("files"))


class Chain:
    """Sessions of one model's files and the state they pass each other on the server (keyed by input name)."""

    def __init__(self, sessions: dict, links: list[list[str]], where: dict[str, str] | None = None):
        self.sessions = sessions
        self.where = where or {}  # role -> how errors name it (the original file)
        self.feeds: dict[tuple[str, str], set[str]] = {}
        for src, out, _dst, inp in links:
            self.feeds.setdefault((src, out), set()).add(inp)
        for role, s in sessions.items():  # within a file: present.X -> past_key_values.X
            outs = {o.name for o in s.get_outputs()}
            for i in s.get_inputs():
                if is_cache_input(i.name) and expected_output(i.name) in outs:
                    self.feeds.setdefault((role, expected_output(i.name)), set()).add(i.name)
        self.state: dict[str, np.ndarray] = {}

    def run(self, role: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of one file: inputs from `feeds`, else from the state; state outputs are kept, not returned."""
        s = self.sessions[role]
        full = {}
        for i in s.get_inputs():
            if i.name in feeds:
                full[i.name] = feeds[i.name]
            elif i.name in self.state:
                full[i.name] = self.state[i.name]
            else:
                raise StipError(f"{role}: input '{i.name}' is neither given nor held by the server (run the files "
                                "in order: encoder, decoder, then decoder_with_past)")
        out: dict[str, np.ndarray] = {}
        new_state: dict[str, np.ndarray] = {}
        for o, v in zip([o.name for o in s.get_outputs()], run(s, None, full, self.where.get(role, role))):
            targets = self.feeds.get((role, o))
            if targets:
                new_state.update(dict.fromkeys(targets, v))
            else:
                out[o] = v
        self.state.update(new_state)
        return out

    def close(self) -> None:
        self.state.clear()


def original_chain(files: dict[str, Path], links: list[list[str]], device: str = "cpu") -> Chain:
    """The original files (a merged decoder as its two branches), for the reference side of verify and tests."""
    from stip.passes.multifile import original_model

    return Chain({r: make_session(original_model(r, p), device) for r, p in files.items()}, links,
                 {r: f"original {p} ({r})" for r, p in files.items()})


class MultiDeployment:
    """Client and server of a multi-file bundle in one process (verify, generate, tests)."""

    def __init__(self, bundle_dir: str | Path, device: str = "auto", threads: int = 0, server=None):
        """`server`: a RemoteChain (stip serve of the bundle's server part); default: the server graphs here."""
        client_dir = find_client_dir(bundle_dir)
        self.manifest = Manifest.read(client_dir / "stip.json")
        files = self.manifest.get("files")
        if not files:
            raise StipError(f"{bundle_dir}: a one-file bundle; this runner is for bundles of several files")
        self.roles = list(files)
        self.clients = {r: Client(client_dir / r, "cpu", threads) for r in self.roles}
        self.remote = server
        self.links = self.manifest["links"]
        self.client_dir = client_dir
        self.sessions = {}
        if server is not None:
            for r in self.roles:
                self.clients[r].check_server(server.servers[r].key_id, server.servers[r].where)
            return
        sessions = {}
        for r in self.roles:
            path = client_dir.parent / SERVER_DIR / r / SERVER_MODEL
            if not path.is_file():
                raise StipError(f"{path}: missing (the bundle's server part for file '{r}')")
            self.clients[r].check_server(model_key_id(path), str(path))
            sessions[r] = make_session(path, device, threads)
        self.sessions = sessions

    def sequence(self) -> BundleSequence:
        return BundleSequence(self)


class BundleSequence:
    """One generation: the client's pre/post around each server call; the server's Chain holds the state."""

    def __init__(self, dep: MultiDeployment):
        self.dep = dep
        self.server = dep.remote.sequence() if dep.remote is not None else Chain(dep.sessions, dep.links)

    def run(self, role: str, feeds: dict[str, np.ndarray], past_length: int = 0) -> dict[str, np.ndarray]:
        c = self.dep.clients[role]
        to_server, kept = c.prepare({k: v for k, v in feeds.items() if k in c.input_names}, past_length)
        return c.finish(self.server.run(role, to_server), kept)

    def close(self) -> None:
        self.server.close()


def _plain_step(chain: Chain):
    """run_file for the original files: the feeds a file takes, no client around it."""
    def run_file(role: str, feeds: dict[str, np.ndarray], past_length: int = 0) -> dict[str, np.ndarray]:
        names = {i.name for i in chain.sessions[role].get_inputs()}
        return chain.run(role, {k: v for k, v in feeds.items() if k in names})

    return run_file


def seq2seq_steps(run_file, encoder_feeds: dict[str, np.ndarray]):
    """Encode once, then yield a function that feeds decoder tokens: the first call runs `decoder` (no past), later
    calls `decoder_with_past`; each returns the logits of the tokens fed."""
    run_file("encoder", encoder_feeds)
    mask = encoder_feeds["attention_mask"]
    fed = [0]

    def step(ids: np.ndarray) -> np.ndarray:
        role = "decoder" if fed[0] == 0 else "decoder_with_past"
        feeds = {"input_ids": ids, "encoder_attention_mask": mask}
        n = ids.shape[1]
        feeds["attention_mask"] = np.ones((ids.shape[0], fed[0] + n), dtype=np.int64)
        out = run_file(role, feeds, fed[0])
        fed[0] += n
        return out["logits"]

    return step


def decoder_pair_step(run_file, batch: int = 1):
    """A legacy decoder pair: the first call runs `decoder` (prefill), later ones `decoder_with_past`."""
    fed = [0]

    def step(ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        role = "decoder" if fed[0] == 0 else "decoder_with_past"
        n = ids.shape[1]
        feeds = {"input_ids": ids,
                 "attention_mask": mask if mask is not None else np.ones((ids.shape[0], fed[0] + n), np.int64),
                 "position_ids": np.broadcast_to(np.arange(fed[0], fed[0] + n, dtype=np.int64), ids.shape).copy()}
        out = run_file(role, feeds, fed[0])
        fed[0] += n
        return out["logits"]

    return step


def generate_tokens(run_file, kind: str, prompt: list[int], max_new_tokens: int, sampler,
                    start_id: int | None = None, eos_id: int | None = None) -> Iterator[int]:
    """Greedy or sampled decoding through `run_file(role, feeds, past_length)` (a bundle or the originals)."""
    if kind == "seq2seq":
        if start_id is None:
            raise StipError("this seq2seq bundle has no decoder_start_token_id (no config.json beside the files at "
                            "compile time); pass --decoder-start-id")
        ids = np.array([prompt], dtype=np.int64)
        step = seq2seq_steps(run_file, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        logits = step(np.array([[start_id]], dtype=np.int64))
    else:
        step = decoder_pair_step(run_file)
        logits = step(np.array([prompt], dtype=np.int64))
    for k in range(max_new_tokens):
        token = sampler(logits[0, -1])
        yield token
        if (eos_id is not None and token == eos_id) or k == max_new_tokens - 1:
            return
        logits = step(np.array([[token]], dtype=np.int64))


def generate_original(files: dict[str, Path], links: list[list[str]], kind: str, prompt: list[int],
                      max_new_tokens: int, sampler, start_id: int | None = None,
                      eos_id: int | None = None) -> list[int]:
    """The reference: the same loop on the original files."""
    chain = original_chain(files, links)
    return list(generate_tokens(_plain_step(chain), kind, prompt, max_new_tokens, sampler, start_id, eos_id))


def verify_files(bundle_dir: str | Path, files: dict[str, Path], *, batch: int = 2, seq: int = 5, steps: int = 3,
                 seed: int = 0, atol: float = 1e-4, rtol: float = 1e-4, device: str = "auto") -> list:
    """The originals vs the bundle on the same random tokens: encode `seq` tokens (seq2seq), prefill `seq` decoder
    tokens, then `steps` single tokens through the with-past graph; every decoder call's logits are compared
    (checks named `role#call:output`). The encoder's output and both caches stay inside each Chain."""
    from stip.runtime.verify import compare

    dep = MultiDeployment(bundle_dir, device)
    man = dep.manifest
    missing = [r for r in dep.roles if r not in files]
    if missing:
        raise StipError(f"--original: no file for role '{missing[0]}' (the bundle holds {', '.join(dep.roles)}); "
                        "pass the directory or files given to `stip compile`")
    vocab = min(v for c in dep.clients.values() for v in [c.manifest.vocab_size.get("input_ids", 1 << 30)])
    rng = np.random.default_rng(seed)
    enc_ids = rng.integers(0, vocab, size=(batch, seq + 2)).astype(np.int64)
    enc_mask = np.ones_like(enc_ids)
    enc_mask[0, -2:] = 0  # padding in the first row
    calls = [rng.integers(0, vocab, size=(batch, seq)).astype(np.int64)] + [
        rng.integers(0, vocab, size=(batch, 1)).astype(np.int64) for _ in range(steps)]
    seqs = {"original": original_chain(files, dep.links, "cpu"), "bundle": dep.sequence()}
    results: dict[str, dict[str, np.ndarray]] = {"original": {}, "bundle": {}}
    for side, obj in seqs.items():
        run_file = _plain_step(obj) if isinstance(obj, Chain) else obj.run
        if man.get("kind") == "seq2seq":
            step = seq2seq_steps(run_file, {"input_ids": enc_ids, "attention_mask": enc_mask})
        else:
            step = decoder_pair_step(run_file, batch)
        for k, ids in enumerate(calls):
            role = "decoder" if k == 0 else "decoder_with_past"
            results[side][f"{role}#{k}:logits"] = step(ids)
        obj.close()
    return compare(results["original"], results["bundle"], atol, rtol)


class MultiGenerator(TokenText):
    """`stip generate` for bundles of several files: encode on the server, then decode with the self-attention
    and cross-attention caches held by the server; the user's side sees only its own ids and the logits."""

    def __init__(self, bundle_dir: str | Path, device: str = "auto", threads: int = 0, start_id: int | None = None,
                 server=None):
        self.dep = MultiDeployment(bundle_dir, device, threads, server)
        man = self.dep.manifest
        gen = man.get("generation") or {}
        self.kind = man.get("kind", "decoder")
        self.start_id = start_id if start_id is not None else gen.get("decoder_start_token_id")
        self.eos_id = gen.get("eos_token_id")
        first = self.dep.clients[self.dep.roles[0]].manifest
        self.vocab = first.vocab_size.get("input_ids")
        self.tokenizer = _load_tokenizer(self.dep.client_dir / man.tokenizer) if man.tokenizer else None

    def generate(self, prompt: list[int], max_new_tokens: int, sampler=None) -> Iterator[int]:
        if not prompt:
            raise StipError("empty prompt")
        bad = [t for t in prompt if self.vocab is not None and not 0 <= t < self.vocab]
        if bad:
            raise StipError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})")
        limits = {r: c.manifest.max_context for r, c in self.dep.clients.items() if c.manifest.max_context}
        if self.kind == "seq2seq":  # the encoder reads the prompt; the decoder its start token and the new ones
            need = {"encoder": len(prompt), "decoder": max_new_tokens, "decoder_with_past": max_new_tokens}
        else:
            need = dict.fromkeys(self.dep.roles, len(prompt) + max_new_tokens)
        over = [(r, n, limits[r]) for r, n in need.items() if r in limits and n > limits[r]]
        if over:
            r, n, limit = over[0]
            raise StipError(f"{n} tokens exceed the {limit}-token context of the model's {r} (prompt of "
                            f"{len(prompt)}, {max_new_tokens} new tokens); use a shorter prompt or fewer new tokens")
        seq = self.dep.sequence()
        try:
            yield from generate_tokens(seq.run, self.kind, prompt, max_new_tokens, sampler or Sampler(),
                                       self.start_id, self.eos_id)
        finally:
            seq.close()


class RemoteChain:
    """The server part of a multi-file bundle behind `stip serve`: one model `NAME.ROLE` per file, one sequence id
    for a whole generation (the server keeps the encoder output and caches under it)."""

    def __init__(self, url: str, name: str, roles: list[str], token: str | None = None, ca_cert=None):
        from stip.runtime.remote import RemoteServer

        self.roles = roles
        self.servers = {r: RemoteServer(url, f"{name}.{r}", token=token, ca_cert=ca_cert) for r in roles}

    def sequence(self) -> RemoteChainSequence:
        return RemoteChainSequence(self)


class RemoteChainSequence:
    def __init__(self, chain: RemoteChain):
        import secrets

        self.chain = chain
        self.id = secrets.randbits(62) | (1 << 62)  # as RemoteSequence: never guessable, within int64
        self.started = False

    def run(self, role: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        params = {"sequence_id": self.id, "sequence_start": not self.started, "sequence_end": False}
        out = self.chain.servers[role].run(feeds, params)
        self.started = True
        return out

    def close(self) -> None:
        if self.started:
            self.started = False
            try:
                self.chain.servers[self.chain.roles[0]].end_sequence(self.id)
            except Exception:  # noqa: BLE001 - best effort; the server frees it at its idle timeout
                pass
