"""Attack 1, weight matching (after ArrowMatch, USENIX Security 2025): align each permuted axis of the server's
weights with the reference's by sorted-value features of its slices, and score against the key."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from stip.compiler.audit.match import assign, nearest, sorted_slices, sq_dist, verdict
from stip.compiler.audit.view import Reference, View
from stip.compiler.report import space_order
from stip.passes.solve import use_key

FULL_MATCH_LIMIT = 8192  # larger spaces (vocabularies) use nearest neighbours instead of a bijection


def collect(view: View, ref: Reference) -> dict[str, list[tuple[np.ndarray, np.ndarray, int]]]:
    """Space name -> [(server weight, reference weight, axis)] for every permuted weight axis of the server part."""
    g, sol = ref.graph, ref.sol
    srv_w = view.weights()
    nodes = g.model.graph.node
    out: dict[str, list] = {}
    for k, i in enumerate(ref.part.server_nodes):
        sn = view.server.graph.node[k]
        for j, x in enumerate(nodes[i].input):
            if x not in g.constants or sn.input[j] not in srv_w:
                continue
            w_ref, w_srv = g.constants[x], srv_w[sn.input[j]]
            if w_ref.dtype.kind != "f" or w_ref.size < 2:
                continue
            for a, c in enumerate(sol.classes(use_key(x, i, j), w_ref.ndim)):
                name = sol.name(c)
                truth = view.key.get(name) if name else None
                if truth is None or truth.ndim != 1 or w_ref.shape[a] != truth.size or w_ref.shape[a] < 2:
                    continue
                out.setdefault(name, []).append((w_srv, w_ref, a))
    return out


def features(uses: list[tuple[np.ndarray, np.ndarray, int]], bins: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Concatenated per-weight features in two variants: each weight scaled by the reference's spread so all weigh
    the same, and each slice scaled by its own norm, which undoes any per-channel scaling a defence folds in."""
    fs, fr, ns, nr = [], [], [], []
    for w_srv, w_ref, a in uses:
        scale = (float(w_ref.std()) or 1.0) * np.sqrt(min(bins, w_ref.size // w_ref.shape[a]))
        r = sorted_slices(w_ref, a, bins) / scale
        s = sorted_slices(w_srv, a, bins) / scale
        fr.append(r)
        fs.append(s)
        nr.append(r / (np.linalg.norm(r, axis=1, keepdims=True) + 1e-12))
        ns.append(s / (np.linalg.norm(s, axis=1, keepdims=True) + 1e-12))
    return [(np.concatenate(fs, 1), np.concatenate(fr, 1)), (np.concatenate(ns, 1), np.concatenate(nr, 1))]


def recover(uses, n: int, variants: tuple[int, ...] = (0, 1)) -> np.ndarray:
    """For each server position, the reference index it is matched to. Both feature variants are tried and the
    attacker keeps the one whose matched pairs stand out most from the rest (no ground truth involved)."""
    bins = 64 if n <= FULL_MATCH_LIMIT else 16
    feats = features(uses, bins)
    if n > FULL_MATCH_LIMIT:
        return nearest(*feats[0])
    best, best_score = None, np.inf
    for v in variants:
        cost = sq_dist(*feats[v])
        score = cost.min(1).mean() / (cost.mean() + 1e-12)
        if score < best_score:
            best, best_score = cost, score
    return assign(best)


def components(ref: Reference, name: str, guess: np.ndarray, truth: np.ndarray) -> list[dict]:
    """Scores of the parts of a flattened space (heads, per-head inner order), read off the flat match."""
    sol = ref.sol
    c = next((c for c, n in sol.permuted.items() if n == name), None)
    link = sol.link(c) if c is not None else None
    if not link or sol.spaces.kind_of(c) != "prod":
        return []
    sizes = [sol.spaces.info(x).size for x in link]
    if not all(isinstance(s, int) for s in sizes) or int(np.prod(sizes)) != truth.size:
        return []
    dg, dt = np.unravel_index(guess, sizes), np.unravel_index(truth, sizes)
    rows = []
    for x, size, a, b in zip(link, sizes, dg, dt):
        if x not in sol.permuted or size < 2:
            continue
        hits = int((a == b).sum())
        rows.append({"space": f"{sol.permuted[x]} (in {name})", "size": size, "recovered": hits / truth.size,
                     "chance": 1 / size, "verdict": verdict(hits, truth.size, truth.size / size)})
    return rows


def run(view: View, ref: Reference, tick: Callable[[], None] | None = None) -> dict:
    uses = collect(view, ref)
    rows, hits_all, total, expected = [], 0, 0, 0.0
    for name in sorted(uses, key=space_order):
        truth = view.key[name]
        n = truth.size
        guess = recover(uses[name], n)
        hits = int((guess == truth).sum())
        hits_all, total, expected = hits_all + hits, total + n, expected + 1.0
        rows.append({"space": name, "size": n, "weights": len(uses[name]), "recovered": hits / n, "chance": 1 / n,
                     "verdict": verdict(hits, n, 1.0)})
        rows.extend(components(ref, name, guess, truth))
        if tick:
            tick()
    hidden = next((r for r in rows if r["space"] == "hidden"), None)
    return {
        "attack": "weight matching",
        "precondition": "the attacker holds the reference weights (a public base, or the model itself); the server "
                        "graph's weights are compared axis by axis with the reference's by sorted-value features "
                        "(as they are, and scaled per slice)",
        "success": hits_all / total if total else 0.0,
        "chance": expected / total if total else 0.0,
        "hidden_recovered": hidden["recovered"] if hidden else None,
        "spaces": rows,
        "verdict": verdict(hits_all, total, expected),
    }
