"""Attack 3, what the server learns with no reference weights at all: the deterministic token encoding, the
attention maps, the logits' fixed vocabulary order (head on the server), and the plaintext inputs."""

from __future__ import annotations

import json

import numpy as np

from stip.compiler.audit.traffic import server_inputs, user_feeds
from stip.compiler.audit.view import Layout, Probe, View
from stip.runtime.bundle import Client


def _hidden_crossing(view: View, sent: dict) -> str | None:
    floats = [n for n in view.manifest.crossing if sent[n].dtype.kind == "f" and sent[n].ndim == 3]
    return floats[0] if floats else None


def linkability(view: View, ids: np.ndarray) -> dict:
    """Send the same prompts twice, half their tokens changed the second time, and a prompt of one repeated
    token: equal (token, position) must never give equal server inputs under a randomised encoding."""
    rng = np.random.default_rng(1)
    again = ids.copy()
    changed = rng.random(ids.shape) < 0.5
    again[changed] = (ids[changed] + 1 + rng.integers(0, max(view.vocab - 1, 1), changed.sum())) % view.vocab
    a = server_inputs(view, view.pre, user_feeds(view, ids), view.manifest.crossing)
    b = server_inputs(view, view.pre, user_feeds(view, again), view.manifest.crossing)
    t = _hidden_crossing(view, a)
    base = {"attack": "deterministic token encoding",
            "precondition": "none: the server only compares the inputs it receives",
            "chance": 0.0}
    if t is None:
        return {**base, "success": 0.0, "verdict": "n/a", "note": "no feature tensor crosses to the server"}
    same = np.all(a[t] == b[t], axis=-1)
    linked = float(same[~changed].mean()) if (~changed).any() else 0.0
    false_links = float(same[changed].mean()) if changed.any() else 0.0
    rep = np.full((1, ids.shape[1]), int(ids[0, 0]))
    r = server_inputs(view, view.pre, user_feeds(view, rep), view.manifest.crossing)[t][0]
    position_free = bool(np.all(r == r[:1]))
    flat = a[t].reshape(-1, a[t].shape[-1])
    clusters = len({row.tobytes() for row in flat})
    keys = {(int(x), s if not position_free else 0) for (_, s), x in np.ndenumerate(ids)}
    return {**base, "success": linked, "false_links": false_links, "position_independent": position_free,
            "distinct_inputs": clusters, "distinct_tokens": len(keys),
            "detail": "the same token " + ("anywhere in any request" if position_free else "at the same position")
                      + " gives a bit-identical server input: requests can be linked and token frequencies counted "
                        "(a substitution cipher)",
            "verdict": "exposed" if linked >= 0.99 and false_links == 0 else ("leaks" if linked > 0 else "chance")}


def attention_maps(view: View, ids: np.ndarray) -> dict:
    """The Softmax outputs of the server graph: exact attention probabilities, only the head order secret."""
    soft = [n.output[0] for n in view.server.graph.node if n.op_type == "Softmax"]
    base = {"attack": "attention maps in plaintext", "precondition": "none: the server computes them",
            "chance": 0.0, "maps": len(soft)}
    if not soft:
        return {**base, "success": 0.0, "verdict": "n/a", "note": "no Softmax on the server (fused attention?)"}
    sent = server_inputs(view, view.pre, user_feeds(view, ids[:2]), view.manifest.crossing)
    out = Probe(view.server, soft[:1], Layout(view.path).server_dir).run(sent)[soft[0]]
    rows_sum = np.abs(out.sum(-1) - 1).max()
    return {**base, "success": 1.0, "shape": list(out.shape),
            "detail": f"{len(soft)} attention maps, e.g. {list(out.shape)}: rows sum to 1 (max error "
                      f"{rows_sum:.1e}) over the plaintext sequence axis; who attends to whom is visible, heads "
                      "are only reordered",
            "verdict": "exposed"}


def logit_order(view: View, ids: np.ndarray) -> dict:
    """With the head on the server, each output token is one fixed index of a permuted vocabulary."""
    base = {"attack": "logit vocabulary order", "chance": 0.0}
    if view.manifest.head != "server" or "out" not in view.key or view.key["out"].size != view.vocab:
        return {**base, "precondition": "the LM head runs on the server", "success": 0.0, "verdict": "n/a",
                "note": "the server returns no permuted vocabulary (head on the client, or no vocabulary output)"}
    client = Client(Layout(view.path).client_dir, "cpu")
    from stip.runtime.bundle import Server

    server = Server(Layout(view.path).server_dir, "cpu")
    to_server, kept = client.prepare(user_feeds(view, ids))
    got = server.run(to_server)
    plain = client.finish(got, kept)
    name = view.manifest.outputs[0]
    srv = next(v for k, v in got.items() if k.startswith(name))
    true_tok, srv_idx = plain[name].argmax(-1).ravel(), srv.argmax(-1).ravel()
    pairs = set(zip(true_tok.tolist(), srv_idx.tolist()))
    consistent = len(pairs) == len(set(true_tok.tolist()))
    return {**base, "precondition": "none: the server reads the argmax of the logits it returns",
            "success": 1.0 if consistent else 0.0, "vocabulary": int(view.key["out"].size),
            "detail": f"{len(pairs)} distinct output tokens in {true_tok.size} positions, each always shown as "
                      "the same permuted index: a fixed substitution cipher open to frequency analysis",
            "verdict": "exposed" if consistent else "chance"}


def plaintext_inputs(view: View) -> dict:
    """What the compile report lists as crossing in plaintext (masks, positions, shapes)."""
    rep = Layout(view.path).report
    rows = []
    if rep.is_file():
        rows = [{"tensor": r["tensor"], "reveals": r["reveals"]}
                for r in json.loads(rep.read_text()).get("crosses_to_server", []) if r.get("kind") == "plaintext"]
    if not rows:
        rows = [{"tensor": n, "reveals": "its values, in plaintext"} for n in view.manifest.public]
    return {"attack": "plaintext inputs", "precondition": "none: the protocol sends them as they are",
            "success": 1.0 if rows else 0.0, "chance": 0.0, "inputs": rows,
            "detail": "batch size and sequence length of every request are visible, plus: "
                      + ("; ".join(f"{r['tensor']}: {r['reveals']}" for r in rows) or "nothing else"),
            "verdict": "exposed" if rows else "n/a"}
