"""Merged decoders: optimum's decoder_model_merged.onnx, specialised on its with-past branch.

Why: optimum --legacy (and many published LLM files) put the first-token decoder and the with-past decoder inside
one top-level If on a bool input `use_cache_branch`, sharing the top-level weights. The with-past branch also
serves the first token when it is given an empty past (Concat of a zero-length cache), so the If is replaced by
that branch, inlined, and the condition input is dropped: the bundle is one ordinary KV-cache decoder, and callers
who still feed the condition have it ignored (the manifest lists it under `fixed_inputs`). The branch is
recognised by graph shape, not by the input's name: a top-level If whose condition is a graph bool input read by
nothing else, whose outputs are the graph's outputs, and exactly one of whose branches reads the cache inputs (the
bundle format's past_key_values.* inputs). Any other If on a graph input is refused, naming it and why; so is a
with-past branch that never computes some cache (seq2seq: the cross-attention cache), which branch_model splits
into the two decoders for compiling with one key. That the with-past branch computes the first token like the
other branch is checked in onnxruntime by the compile self-check (first_token_check below) and by `stip verify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from stip.passes.errors import StipError
from stip.passes.state import is_cache_input

ADVICE = ("compile decoder_with_past_model.onnx of the same export instead, or export without --legacy "
          "(optimum-cli export onnx --task text-generation-with-past writes one model.onnx with a KV cache)")
ADVICE_PAIR = ("compile the export's decoder_model.onnx and decoder_with_past_model.onnx together, with one key "
               "(stip compile DIR), instead")


@dataclass(frozen=True)
class MergedIf:
    """What the specialisation did: the If's label, its condition input and the value that selects the
    with-past branch (the manifest's fixed_inputs)."""

    node: str
    cond: str
    value: bool


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _defined(g: onnx.GraphProto) -> set[str]:
    return ({i.name for i in g.input} | {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
            | {o for n in g.node for o in n.output if o})


def free_names(g: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from its enclosing scopes, nested subgraphs included."""
    local = _defined(g)
    used = {x for n in g.node for x in n.input if x} | {o.name for o in g.output}
    for n in g.node:
        for sub in subgraphs(n):
            used |= free_names(sub)
    return used - local


def _all_names(g: onnx.GraphProto) -> set[str]:
    names = _defined(g) | {o.name for o in g.output} | {x for n in g.node for x in n.input if x}
    for n in g.node:
        for sub in subgraphs(n):
            names |= _all_names(sub)
    return names


def _rename_refs(g: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename references in a nested subgraph to names of an enclosing scope (its own names shadow them)."""
    scope = {k: v for k, v in mapping.items() if k not in _defined(g)}
    if not scope:
        return
    for n in g.node:
        n.input[:] = [scope.get(x, x) for x in n.input]
        for sub in subgraphs(n):
            _rename_refs(sub, scope)
    for o in g.output:
        o.name = scope.get(o.name, o.name)


def _never_computed(branch: onnx.GraphProto, outer: set[str]) -> dict[str, str]:
    """Branch outputs the branch does not compute: an enclosing scope's tensor passed through unchanged, or a
    constant (optimum's seq2seq with-past branch returns Constant dummies for the cross-attention presents)."""
    producer = {o: n for n in branch.node for o in n.output if o}
    consts = {t.name for t in branch.initializer}
    out = {}
    for o in branch.output:
        name = o.name
        while name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        if name in producer and producer[name].op_type == "Constant" or name in consts:
            out[o.name] = "a constant"
        elif name not in producer and name in outer:
            out[o.name] = f"'{name}' passed through unchanged"
    return out


@dataclass
class _Found:
    idx: int
    node: onnx.NodeProto
    label: str
    with_past: str  # "then_branch" or "else_branch"
    first: str
    problem: str | None  # why the with-past branch cannot serve the first token, if it cannot


def _recognise(model: onnx.ModelProto, path: str | Path) -> _Found | None:
    """The merged decoder's If, or None when there is no top-level If on a graph input; refuses any such If
    whose shape is not a choice between a first-token and a with-past decoder."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = {i.name: i for i in g.input if i.name not in inits}
    found = [(k, n) for k, n in enumerate(g.node) if n.op_type == "If" and n.input[0] in inputs]
    if not found:
        return None
    idx, node = found[0]
    label = f"If node '{node.name or node.output[0]}' on input '{node.input[0]}'"

    def refuse(why: str) -> StipError:
        return StipError(f"{path}: merged decoder: {label}: {why}; {ADVICE}")

    if len(found) > 1:
        raise refuse(f"the graph has {len(found)} Ifs on graph inputs (also on '{found[1][1].input[0]}'); stip "
                     "specialises one If on use_cache_branch only")
    tt = inputs[node.input[0]].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    if tt.elem_type != onnx.TensorProto.BOOL or dims not in ([], [1]):
        raise refuse(f"the condition is {onnx.TensorProto.DataType.Name(tt.elem_type).lower()}{dims}, not a bool "
                     "scalar or bool[1]")
    readers = [n.name or n.output[0] for k, n in enumerate(g.node) if k != idx and
               (node.input[0] in n.input or any(node.input[0] in free_names(s) for s in subgraphs(n)))]
    if readers:
        raise refuse(f"the condition is also read by node '{readers[0]}', so the If is not the only thing it selects")
    branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    if set(branches) != {"then_branch", "else_branch"}:
        raise refuse("it lacks a then or else branch")
    outs, graph_outs = list(node.output), [o.name for o in g.output]
    if set(outs) != set(graph_outs) or len(outs) != len(graph_outs):
        raise refuse(f"its outputs ({', '.join(outs)}) are not exactly the graph's outputs ({', '.join(graph_outs)}), "
                     "so it does not select between two whole decoders")
    reads = {name: free_names(b) & set(inputs) for name, b in branches.items()}
    with_past = [name for name, r in reads.items() if any(is_cache_input(x) for x in r)]
    if len(with_past) != 1:
        raise refuse(f"{'both' if with_past else 'neither'} of its branches read the cache inputs "
                     "(past_key_values.*), so neither is the with-past decoder")
    taken = with_past[0]
    first = "else_branch" if taken == "then_branch" else "then_branch"
    problem = None
    never = _never_computed(branches[taken], _defined(g))
    missing = sorted(reads[first] - reads[taken])
    if never:
        out, what = next(iter(never.items()))
        problem = (f"its with-past branch ({taken}) returns {what} as '{out}' (a cache it never computes, such as a "
                   f"cross-attention cache), so it cannot start from an empty past; the first token needs the {first}")
    elif missing:
        problem = (f"its with-past branch ({taken}) does not read '{missing[0]}', which the first-token branch "
                   f"({first}) reads, so it cannot compute the first token")
    return _Found(idx, node, label, taken, first, problem)


def specialise_merged(model: onnx.ModelProto, path: str | Path) -> tuple[onnx.ModelProto, MergedIf | None]:
    """Inline the with-past branch of a merged decoder's If (in place); returns the model and what was fixed,
    or (model, None) when the graph has no top-level If on a graph input. Refuses every other such If, and a
    with-past branch that cannot serve the first token (ADVICE_PAIR: the two branches need one key, two graphs)."""
    f = _recognise(model, path)
    if f is None:
        return model, None
    if f.problem:
        raise StipError(f"{path}: merged decoder: {f.label}: {f.problem}; {ADVICE_PAIR}")
    cond = f.node.input[0]
    _take(model.graph, f, f.with_past)
    _declare_totals(model.graph)
    return model, MergedIf(f.label, cond, f.with_past == "then_branch")


def branch_model(model: onnx.ModelProto, path: str | Path, which: str) -> onnx.ModelProto | None:
    """A merged decoder as one of its two decoders: `which` is "first_token" (the no-past decoder, like optimum's
    decoder_model.onnx) or "with_past" (like decoder_with_past_model.onnx), a new model with that branch inlined
    and the condition and the inputs it does not read dropped, as are outputs the branch never computes (a seq2seq
    with-past branch's constant cross-attention presents; optimum's decoder_with_past_model.onnx lacks them too).
    None for a model without a top-level If on a graph input; refuses Ifs of other shapes. For compiling both as
    one bundle with one key (seq2seq merged decoders, whose with-past branch cannot start from an empty past)."""
    if which not in ("first_token", "with_past"):
        raise ValueError(which)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    f = _recognise(copy, path)
    if f is None:
        return None
    branch = f.with_past if which == "with_past" else f.first
    never = _never_computed(next(a.g for a in f.node.attribute if a.name == branch), _defined(copy.graph))
    _take(copy.graph, f, branch)
    if never:  # optimum's seq2seq dummies (constant cross-attention presents): gone, as in decoder_with_past_model
        keep_out = [o for o in copy.graph.output if o.name not in never]
        del copy.graph.output[:]
        copy.graph.output.extend(keep_out)
        _drop_dead(copy.graph)
    needed = {x for n in copy.graph.node for x in n.input} | {o.name for o in copy.graph.output}
    for n in copy.graph.node:
        for sub in subgraphs(n):
            needed |= free_names(sub)
    keep = [i for i in copy.graph.input if i.name in needed]
    del copy.graph.input[:]
    copy.graph.input.extend(keep)
    if which == "with_past":
        _declare_totals(copy.graph)
    return copy


def _take(g: onnx.GraphProto, f: _Found, branch: str) -> None:
    """Replace the If by one branch and drop the condition input and what only the other branch used."""
    cond = next(i for i in g.input if i.name == f.node.input[0])
    _inline(g, f.idx, f.node, next(a.g for a in f.node.attribute if a.name == branch))
    g.input.remove(cond)
    _drop_dead(g)


def _symbols(vi: onnx.ValueInfoProto) -> list[str | None]:
    return [d.dim_param if not d.HasField("dim_value") and d.dim_param else None for d in vi.type.tensor_type.shape.dim]


def _declare_totals(g: onnx.GraphProto) -> None:
    """Declare the with-past branch's total-length axes as `past + new`.

    Why: merging gives each input axis whose size differed between the two decoders a symbol of its own (optimum:
    `attention_mask_sequence_length`: new tokens in the first-token decoder, past + new in the with-past one), and
    nothing in the shapes relates it to the others (Llama's mask is only indexed by positions), so the axis roles
    (passes/axes.py) would call it new. In the with-past decoder an input axis of its own symbol, neither batch,
    new nor past, can only be the total; a wrong role fails the self-check's cached steps, never silently."""
    inputs = list(g.input)
    past = {_symbols(vi)[2] for vi in inputs if is_cache_input(vi.name) and len(_symbols(vi)) > 2} - {None}
    others = [vi for vi in inputs if not is_cache_input(vi.name)]
    new = {x for vi in others for x in _symbols(vi)[1:] if x} - past
    count: dict[str, int] = {}
    for vi in list(inputs) + list(g.output):
        for x in set(_symbols(vi)):
            if x:
                count[x] = count.get(x, 0) + 1
    own = {x for x in new if count[x] == 1}
    if len(past) != 1 or len(new - own) != 1 or not own:
        return
    total = f"{next(iter(past))} + {next(iter(new - own))}"
    for vi in others:
        for a, d in enumerate(vi.type.tensor_type.shape.dim):
            if a and d.dim_param in own:
                d.dim_param = total


def _inline(g: onnx.GraphProto, idx: int, node: onnx.NodeProto, branch: onnx.GraphProto) -> None:
    """Replace g.node[idx] (the If) by the branch's nodes: branch-local names that clash with the enclosing graph's
    get a fresh suffix, branch outputs take the If's output names, outer-scope references stay as they are."""
    taken = _defined(g) | {o.name for o in g.output} | {x for n in g.node for x in n.input if x}
    for n in g.node:
        if n is not node:
            for sub in subgraphs(n):
                taken |= _all_names(sub)
    producers = {o for n in branch.node for o in n.output if o}
    mapping: dict[str, str] = {}
    identities: list[onnx.NodeProto] = []
    for bo, io in zip(branch.output, node.output):
        if bo.name in producers and bo.name not in mapping:
            mapping[bo.name] = io
        else:  # an initializer, an outer tensor, or an output listed twice: copy it out
            identities.append(helper.make_node("Identity", [bo.name], [io]))
    used = taken | set(mapping.values())
    for name in sorted(_defined(branch)):
        if name in mapping:
            continue
        new, k = name, 0
        while new in used:
            k += 1
            new = f"{name}__merged{k}"
        used.add(new)
        if new != name:
            mapping[name] = new
    node_names = {n.name for n in g.node if n.name}
    new_nodes = []
    for n in list(branch.node) + identities:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.input[:] = [mapping.get(x, x) for x in c.input]
        c.output[:] = [mapping.get(x, x) for x in c.output]
        for sub in subgraphs(c):
            _rename_refs(sub, mapping)
        if c.name and c.name in node_names:
            c.name = f"{c.name}__merged"
        node_names.add(c.name)
        new_nodes.append(c)
    for t in branch.initializer:
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = mapping.get(t.name, t.name)
        g.initializer.append(c)
    outputs = set(node.output)
    for vi in branch.value_info:
        if mapping.get(vi.name, vi.name) not in outputs:
            c = onnx.ValueInfoProto()
            c.CopyFrom(vi)
            c.name = mapping.get(vi.name, vi.name)
            g.value_info.append(c)
    rest = list(g.node)
    del g.node[:]
    g.node.extend(rest[:idx] + new_nodes + rest[idx + 1:])


def _drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes and initializers only the discarded branch used (the shared weights stay)."""
    while True:
        needed = {o.name for o in g.output}
        for n in g.node:
            needed |= {x for x in n.input if x}
            for sub in subgraphs(n):
                needed |= free_names(sub)
        dead = [n for n in g.node if not any(o in needed for o in n.output if o)]
        if not dead:
            break
        keep = [n for n in g.node if any(o in needed for o in n.output if o)]
        del g.node[:]
        g.node.extend(keep)
    keep_init = [t for t in g.initializer if t.name in needed]
    if len(keep_init) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep_init)
    vis = [v for v in g.value_info if v.name in needed or v.name in {o for n in g.node for o in n.output}]
    del g.value_info[:]
    g.value_info.extend(vis)


def first_token_check(original: str | Path, fixed: dict[str, bool], feeds: dict[str, np.ndarray],
                      session, tolerance: dict[str, float]) -> float:
    """The with-past branch on an empty past must compute what the first-token branch computes (both branches of
    the original, in onnxruntime, on the same inputs); raises StipError naming the If otherwise. Returns the
    largest difference seen. `feeds`: the original's other inputs, with a zero-length past."""
    from stip.runtime.sessions import run

    m = onnx.load(str(original), load_external_data=False)
    names = [o.name for o in session.get_outputs()]
    results = {}
    for cond, value in fixed.items():
        node = next((n for n in m.graph.node if n.op_type == "If" and n.input[0] == cond), None)
        label = f"If node '{(node.name or node.output[0]) if node else '?'}' on input '{cond}'"
        shape = next(i.shape for i in session.get_inputs() if i.name == cond)
        for v in (value, not value):
            try:
                results[v] = dict(zip(names, run(session, None, {**feeds, cond: np.full(shape, v, dtype=bool)},
                                                 str(original))))
            except StipError as e:
                raise StipError(f"{original}: merged decoder: {label}: with {cond}={v} and an empty past the "
                                f"model does not run ({e}); {ADVICE_PAIR}") from None
            except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise StipError(f"{original}: merged decoder: {label}: with {cond}={v} and an empty past "
                                f"onnxruntime fails ({type(e).__name__}: {first}), so the with-past branch cannot "
                                f"compute the first token; {ADVICE_PAIR}") from None
        worst = 0.0
        for name in names:
            a, b = results[value][name], results[not value][name]
            diff = np.inf if a.shape != b.shape else float(np.abs(a.astype(np.float64) - b).max(initial=0.0))
            limit = tolerance.get(name, 1e-4) * max(1.0, float(np.abs(b).max(initial=0.0)))
            if not diff <= limit:
                raise StipError(f"{original}: merged decoder: {label}: the with-past branch ({cond}={value}) on an "
                                f"empty past gives output '{name}' {'of another shape' if diff == np.inf else ''}"
                                f"{'' if diff == np.inf else f'differing by max abs {diff:.3g}'} from the "
                                f"first-token branch ({cond}={not value}), so specialising on it would change the "
                                f"first token; {ADVICE_PAIR}")
            worst = max(worst, diff)
    return worst
