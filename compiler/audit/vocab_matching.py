"""Attack 2, vocabulary matching (arXiv 2505.18332): every candidate token is run through the reference, and the
one whose activation has the nearest sorted values (L1) to what the server saw is taken; the hidden permutation
leaves sorted values unchanged. Norm matching (the nearest vector norm) is the weaker variant.

Layer 0's input is matched position by position against the whole vocabulary (ranked by L2 of sorted values, the
best few decided by L1). For the first layers' outputs the
attack goes left to right as the paper does: the candidate at one position, the tokens chosen so far before it, and
the layer-0 guess after it (decoders never look ahead). Large vocabularies shortlist candidates by layer 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from stip.compiler.audit.match import sq_dist, verdict
from stip.compiler.audit.traffic import server_inputs, user_feeds
from stip.compiler.audit.view import Layout, Probe, Reference, View, run_pre

FULL_VOCAB_LIMIT = 512  # deeper layers try every token below this vocabulary size, else a shortlist
SHORTLIST = 8
CHUNK = 1024


def stages(view: View, ref: Reference, layers: int) -> list[dict]:
    """Server-visible activations to attack, matched by position: layer 0's input, then each layer's output."""
    g, sol, hidden = ref.graph, ref.sol, ref.hidden()
    if hidden is None:
        return []
    out = []
    for mine, theirs in zip(ref.part.crossing, view.manifest.crossing):
        if g.dtypes.get(mine) == onnx.TensorProto.FLOAT and sol.classes(mine, 3)[-1:] == [hidden] \
                and len(g.shapes.get(mine, [])) == 3:
            out.append({"stage": "layer 0 input (sent by the client)", "ref": mine, "server": theirs, "crossing": True})
            break
    nodes = g.model.graph.node
    residual = []
    for k, i in enumerate(ref.part.server_nodes):
        n = nodes[i]
        if n.op_type == "Add" and len(n.input) == 2 and not any(x in g.constants for x in n.input) \
                and len(g.shapes.get(n.output[0], [])) == 3 and sol.classes(n.output[0], 3)[-1] == hidden \
                and all(sol.classes(x, len(g.shapes.get(x, [])))[-1:] == [hidden] for x in n.input):
            residual.append(k)
    n_layers = sum(1 for n in sol.permuted.values() if n.endswith(".heads"))
    ends = residual[1::2] if n_layers and len(residual) == 2 * n_layers else residual
    for layer, k in enumerate(ends[:layers]):
        out.append({"stage": f"layer {layer} output (residual stream)", "ref": ref.server.graph.node[k].output[0],
                    "server": view.server.graph.node[k].output[0], "crossing": False})
    return out


def _l1_sorted(obs: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """[n, c] L1 distances between sorted observed vectors and sorted candidates."""
    return np.abs(np.sort(obs, -1)[:, None, :] - np.sort(cand, -1)[None, :, :]).sum(-1)


def _norm_gap(obs: np.ndarray, cand: np.ndarray) -> np.ndarray:
    return np.abs(np.linalg.norm(obs, axis=-1)[:, None] - np.linalg.norm(cand, axis=-1)[None, :])


def run(view: View, ref: Reference, ids: np.ndarray, layers: int = 2,
                   tick: Callable[[], None] | None = None) -> dict:
    st = stages(view, ref, layers)
    base = {"attack": "vocabulary matching",
            "precondition": "the attacker holds the reference weights and sees the server's inputs and activations; "
                            "it runs candidate tokens through the reference and compares sorted values / norms",
            "chance": 1 / view.vocab if view.vocab else 0.0}
    if not st or not st[0]["crossing"] or not view.token_input:
        return {**base, "success": 0.0, "stages": [], "verdict": "n/a",
                "note": "no token input or no hidden-space tensor crossing to the server"}
    feeds = user_feeds(view, ids)
    sent = server_inputs(view, view.pre, feeds, view.manifest.crossing)
    deeper = [s for s in st if not s["crossing"]]
    observed = {st[0]["server"]: sent[st[0]["server"]]}
    if deeper:
        probe = Probe(view.server, [s["server"] for s in deeper], Layout(view.path).server_dir)
        observed.update(probe.run(sent))
    n, seq = ids.shape
    rows = []
    best0, norm0, short = _layer0(view, ref, st[0], observed[st[0]["server"]], seq)
    rows.append(_row(st[0], best0, norm0, ids, view.vocab, "whole vocabulary"))
    if tick:
        tick()
    for s in deeper:
        guess, norm = _deeper(view, ref, s, observed[s["server"]], best0, short)
        scope = "whole vocabulary" if view.vocab <= FULL_VOCAB_LIMIT else f"top {SHORTLIST} by layer 0"
        rows.append(_row(s, guess, norm, ids, view.vocab, scope))
        if tick:
            tick()
    top = max(rows, key=lambda r: max(r["sorted_l1"], r["norm"]))
    hits = round(max(top["sorted_l1"], top["norm"]) * ids.size)
    return {**base, "success": max(top["sorted_l1"], top["norm"]), "tokens": int(ids.size), "stages": rows,
            "verdict": verdict(hits, ids.size, ids.size / view.vocab)}


def _row(s: dict, guess: np.ndarray, norm: np.ndarray, ids: np.ndarray, vocab: int, scope: str) -> dict:
    return {"stage": s["stage"], "tensor": s["server"], "candidates": scope,
            "sorted_l1": float((guess == ids).mean()), "norm": float((norm == ids).mean()), "chance": 1 / vocab}


def _candidate_feeds(view: View, ids: np.ndarray) -> dict:
    return user_feeds(view, ids)


def _layer0(view: View, ref: Reference, stage: dict, obs: np.ndarray, seq: int):
    """Every token at every position through the reference's pre, in chunks of the vocabulary. Candidates are
    ranked by L2 distance of sorted values (one matrix product), and the best few decided by L1."""
    n = obs.shape[0]
    k = min(SHORTLIST, view.vocab)
    short_d = np.full((n, seq, k), np.inf, np.float32)
    short = np.zeros((n, seq, k), np.int64)
    norm_d = np.full((n, seq), np.inf)
    norm = np.zeros((n, seq), np.int64)
    obs_sorted = np.sort(obs, -1)
    for lo in range(0, view.vocab, CHUNK):
        cands = np.arange(lo, min(lo + CHUNK, view.vocab))
        out = run_pre(ref.pre, view.manifest, _candidate_feeds(view, np.repeat(cands[:, None], seq, 1)))
        act = np.sort(out[stage["ref"]], -1)  # [c, seq, d]
        for s in range(seq):
            d = sq_dist(obs_sorted[:, s], act[:, s])
            alld = np.concatenate([short_d[:, s], d], 1)
            allc = np.concatenate([short[:, s], np.broadcast_to(cands, (n, cands.size))], 1)
            keep = np.argsort(alld, 1)[:, :k]
            short_d[:, s], short[:, s] = np.take_along_axis(alld, keep, 1), np.take_along_axis(allc, keep, 1)
            nd = _norm_gap(obs[:, s], act[:, s])
            j = nd.argmin(1)
            better = nd[np.arange(n), j] < norm_d[:, s]
            norm[better, s], norm_d[better, s] = cands[j[better]], nd[np.arange(n), j][better]
    best = np.zeros((n, seq), np.int64)
    for i in range(n):  # L1 on the shortlist, as the paper measures it
        cand = short[i]  # [seq, k]
        out = run_pre(ref.pre, view.manifest, _candidate_feeds(view, cand.T.copy()))[stage["ref"]]  # [k, seq, d]
        l1 = np.abs(np.sort(out, -1).transpose(1, 0, 2) - obs_sorted[i][:, None, :]).sum(-1)  # [seq, k]
        best[i] = cand[np.arange(seq), l1.argmin(1)]
    return best, norm, short


def _deeper(view: View, ref: Reference, stage: dict, obs: np.ndarray, start: np.ndarray, short: np.ndarray):
    """Left to right: candidate at position s, the chosen tokens before it, the layer-0 guess after it (all
    samples' candidates for one position in one batch)."""
    probe = Probe(ref.server, [stage["ref"]])
    crossing = list(ref.part.crossing)
    n, seq = start.shape
    guess, norm = start.copy(), start.copy()
    for s in range(seq):
        cands = [np.arange(view.vocab) if view.vocab <= FULL_VOCAB_LIMIT else short[i, s] for i in range(n)]
        rows = np.concatenate([np.repeat(guess[i][None], c.size, 0) for i, c in enumerate(cands)])
        rows[:, s] = np.concatenate(cands)
        sent = server_inputs(view, ref.pre, _candidate_feeds(view, rows), crossing)
        act = probe.run(sent)[stage["ref"]][:, s]
        lo = 0
        for i, c in enumerate(cands):
            a = act[lo:lo + c.size]
            lo += c.size
            guess[i, s] = c[_l1_sorted(obs[i, s][None], a)[0].argmin()]
            norm[i, s] = c[_norm_gap(obs[i, s][None], a)[0].argmin()]
    return guess, norm
