"""What the compiler tells the developer: spaces, what crosses in plaintext, sizes, blockers, honest limits."""

from __future__ import annotations

import math
from collections import Counter

import onnx

from stip.passes.graph import Graph
from stip.passes.partition import Partition
from stip.passes.solve import Solution, use_key
from stip.passes.solve import _weight_feature_axes as weight_feature_axes

SECURITY_NOTES = [
    "Protects PRIVATE weights only: if the weights are public or fine-tuned from a public base, matching sorted "
    "values or weight directions recovers the permutations and the user's tokens (arXiv 2505.18332, ArrowMatch).",
    "The server sees exact attention scores (Q K^T) and every order-invariant statistic (norms, sorted values) "
    "of each activation.",
    "Known plaintext: one pair (x, x.pi) reveals pi. Rotate keys (recompile) and use separate keys per user group.",
    "A fixed output permutation observed through many argmax results is a substitution cipher (frequency analysis).",
    "Semi-honest parties assumed; the model developer and the server must not collude, nor the server and users.",
]

DTYPE = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()}


def log10_factorial(n: int) -> float:
    return math.lgamma(n + 1) / math.log(10)


def describe_spaces(g: Graph, sol: Solution) -> list[dict]:
    uses: Counter[int] = Counter()
    for axis in sol.spaces.axes():
        if "@" in axis[0]:
            c = sol.spaces.find(sol.spaces.id(axis))
            if c in sol.permuted:
                uses[c] += 1
    rows = []
    for c, name in sorted(sol.permuted.items(), key=lambda kv: space_order(kv[1])):
        link = sol.link(c)
        if link and sol.spaces.kind_of(c) == "cat":
            parts = [f"{sol.spaces.info(x).size}" + ("" if x in sol.permuted else " (fixed)") for x in link]
            structure = " | ".join(parts) + " (concatenated blocks, each permuted within itself)"
        elif link:
            parts = [f"{sol.spaces.info(x).size}" + ("" if x in sol.permuted else " (fixed)") for x in link]
            structure = " x ".join(parts)
            inner = link[-1]
            if c in sol.blocks:
                structure += (" (quantization blocks: whole blocks move, values move within their block, "
                              + ("one permutation per block)" if inner in sol.dependent else "one permutation)"))
            elif inner in sol.dependent:
                structure += " (whole-head + per-head inner permutations)"
            elif inner in sol.permuted:
                structure += " (whole-head + shared inner permutation)"
        elif c in sol.dependent:
            structure = f"per-head: {sol.sizes[sol.dependent[c]]} independent permutations"
        else:
            structure = "flat"
        rows.append({"name": name, "size": sol.sizes[c], "structure": structure, "constants": uses[c],
                     "log10_choices": round(_log10_choices(sol, c), 1),
                     "log2_choices": round(_log10_choices(sol, c) * math.log2(10), 1)})
    return rows


def _log10_choices(sol: Solution, c: int) -> float:
    link = sol.link(c)
    if link:
        parts = link if sol.spaces.kind_of(c) == "prod" else set(link)  # rotary halves share one permutation
        return sum(_log10_choices(sol, x) for x in parts if x in sol.permuted)
    n = log10_factorial(sol.sizes[c])
    if c in sol.dependent:
        n *= sol.sizes[sol.dependent[c]]
    return n


def space_order(name: str) -> tuple:
    """Report order of spaces: hidden first, then by layer, then the rest."""
    head = name.split(".")[0]
    if head == "hidden":
        return (0, 0, name)
    if head.startswith("layer") and head[5:].isdigit():
        return (1, int(head[5:]), name)
    return (2, 0, name)


def _fmt_shape(g: Graph, name: str) -> list:
    return [d if isinstance(d, int) else str(d) for d in g.shapes.get(name, [])]


def plaintext_crossings(g: Graph, sol: Solution, part: Partition) -> list[dict]:
    rows = []
    nodes = g.model.graph.node
    for t in part.crossing:
        p = g.producer.get(t)
        op = nodes[p].op_type if p is not None else "?"
        classes = sol.classes(t, len(g.shapes.get(t, [])))
        spaces = [sol.name(c) for c in classes if c is not None]
        if spaces:
            reveals = (f"permuted features (spaces: {', '.join(spaces)}); order-invariant statistics such as norms "
                       "and sorted values are visible")
            kind = "permuted"
        elif op in ("Shape", "Size"):
            reveals = f"batch size and sequence length (shape of '{nodes[p].input[0]}')"
            kind = "plaintext"
        else:
            reveals = "values in plaintext"
            kind = "plaintext"
        rows.append({"tensor": t, "from": "client.pre", "dtype": DTYPE.get(g.dtypes.get(t, 0), "?"),
                     "shape": _fmt_shape(g, t), "kind": kind, "reveals": reveals})
    cache = {i for i, _ in part.cache}
    server_reads = {x for i in part.server_nodes for x in nodes[i].input}
    for n in part.public:
        if n in cache or n not in server_reads:
            continue
        low = n.lower()
        if "mask" in low:
            reveals = "padding pattern: which positions are padding, hence each sequence's true length"
        elif "position" in low:
            reveals = "token positions"
        else:
            reveals = "its values, in plaintext"
        rows.append({"tensor": n, "from": "user input", "dtype": DTYPE.get(g.dtypes.get(n, 0), "?"),
                     "shape": _fmt_shape(g, n), "kind": "plaintext", "reveals": reveals})
    return rows


def feature_classes(g: Graph, sol: Solution) -> dict[int, str]:
    """Classes (and, through links, their parts) that hold a weight's feature axis -> that weight's name."""
    sp = sol.spaces
    out: dict[int, str] = {}
    for idx, n in enumerate(g.model.graph.node):
        for j, x in enumerate(n.input):
            if x not in g.constants:
                continue
            for a in weight_feature_axes(n, j, g.constants[x]):
                key = (use_key(x, idx, j), a)
                stack = [sp.find(sp.id(key))] if sp.has(key) else []
                while stack:
                    c = sp.find(stack.pop())
                    if c not in out:
                        out[c] = x
                        stack.extend(sp.link_of(c) or ())
    return out


def _plaintext_parts(sol: Solution, c: int) -> list[int]:
    """Parts of class c (itself, or blocks of a flattened or concatenated axis) left in plaintext order."""
    sp = sol.spaces
    if sp.info(c).size == 1:
        return []
    link = sp.link_of(c)
    if link:
        return [x for part in link for x in _plaintext_parts(sol, part)]
    return [] if c in sol.permuted else [c]


def unpermuted_crossings(g: Graph, sol: Solution, part: Partition) -> list[str]:
    """Warnings for tensors the client sends that keep a feature axis (one that reaches a weight's feature axis)
    wholly or partly in plaintext order: e.g. a private input multiplied into the hidden state and marked
    --public pins its own axis inside the permuted one, and the server reads that block unpermuted."""
    sp = sol.spaces
    features = feature_classes(g, sol)
    out = []
    for t in part.crossing:
        p = g.producer.get(t)
        if p is None or g.model.graph.node[p].op_type in ("Shape", "Size"):
            continue
        for a, d in enumerate(g.shapes.get(t, [])):
            if not isinstance(d, int) or d <= 1 or not sp.has((t, a)):
                continue
            c = sp.find(sp.id((t, a)))
            plain = _plaintext_parts(sol, c) if c in features else []
            if not plain:
                continue
            why = sp.info(plain[0]).fixed or "not permutable"
            block = (f"feature axis {a} (size {d})" if plain == [c] else
                     f"a block of size {' x '.join(str(sp.info(x).size) for x in plain)} of feature axis {a} "
                     f"(size {d})")
            out.append(f"tensor '{t}' sent to the server keeps {block} in plaintext order, although it reaches "
                       f"the feature axis of weight '{features[c]}' (pinned by {why}): the server can read the "
                       "values that enter through it, e.g. a private mask or role ids multiplied into the hidden "
                       "state; treat them as public, or feed them through a weight first")
    return out


def unplaced_nodes(sol: Solution) -> list[dict]:
    return [{"node": b.node, "op": b.op, "reason": b.reason} for b in sol.blockers]


def layer_count(sol: Solution) -> int:
    return sum(1 for n in sol.permuted.values() if n.endswith(".heads"))


def model_summary(g: Graph, sol: Solution, part: Partition | None, refusals: list[str] | None = None) -> dict:
    """`refusals`: analyse(strict=False)'s list; empty means compile would go on to write and self-check."""
    ops = Counter(n.op_type for n in g.model.graph.node)
    params = sum(int(v.size) for v in g.constants.values())
    weights = sum(1 for idx, n in enumerate(g.model.graph.node) for j, x in enumerate(n.input)
                  if x in g.constants and g.constants[x].ndim >= 2
                  and any(c is not None for c in sol.classes(use_key(x, idx, j), g.constants[x].ndim)))
    out = {
        "model": str(g.path),
        "opset": next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), None),
        "producer": f"{g.model.producer_name} {g.model.producer_version}".strip(),
        "nodes": len(g.model.graph.node),
        "parameters": params,
        "permuted_weights": weights,
        "layers": layer_count(sol),
        "ops": dict(sorted(ops.items())),
        "inputs": [{"name": n, "shape": _fmt_shape(g, n), "dtype": DTYPE.get(g.dtypes.get(n, 0), "?")}
                   for n in g.input_names],
        "outputs": [{"name": n, "shape": _fmt_shape(g, n),
                     "spaces": [sol.name(c) for c in sol.classes(n, len(g.shapes.get(n, [])))]}
                    for n in g.output_names],
        "spaces": describe_spaces(g, sol),
        "unplaced": unplaced_nodes(sol),
        "blockers": list(refusals or []),
        "compiles": not refusals,
        "warnings": g.warnings,
        "security_notes": SECURITY_NOTES,
    }
    if g.merged is not None:
        out["merged_decoder"] = {"if": g.merged.node, "fixed_input": g.merged.cond, "value": g.merged.value}
    if part is not None:
        out["private_inputs"] = part.private
        out["public_inputs"] = [n for n in part.public if n not in {i for i, _ in part.cache}]
        out["server_state"] = [{"input": i, "output": o, "spaces": [sol.name(c) for c in sol.classes(
            i, len(g.shapes.get(i, [])))]} for i, o in part.cache]
        out["client_pre_nodes"] = len(part.pre_nodes)
        out["server_nodes"] = len(part.server_nodes)
        out["crosses_to_server"] = plaintext_crossings(g, sol, part)
        out["unpermuted_crossings"] = unpermuted_crossings(g, sol, part)
        pre_consts = {x for i in part.pre_nodes for x in g.model.graph.node[i].input if x in g.constants}
        out["client_bytes_estimate"] = int(sum(g.constants[x].nbytes for x in pre_consts))
    return out


def render(report: dict) -> str:
    """Readable text, in the spirit of `polygraphy inspect model`."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    buf = StringIO()
    con = Console(file=buf, width=120, force_terminal=False, color_system=None)
    if "bundle" in report:
        b = report["bundle"]
        con.print(f"[b]STIP bundle[/b] {b['path']}  key id {b['key_id']}")
        t = Table("party", "file", "size", "holds", title="What each party gets")
        for row in b["files"]:
            t.add_row(row["party"], row["file"], _human(row["bytes"]), row["holds"])
        con.print(t)
        con.print(f"download size: user (client/) {_human(b['client_bytes'])}   model server (server/) "
                  f"{_human(b['server_bytes'])}")
    if "model" in report:
        con.print(f"[b]Model[/b] {report['model']}  opset {report['opset']}  {report['nodes']} nodes  "
                  f"{report['parameters']:,} parameters  {report['layers']} attention layers  "
                  f"{report['permuted_weights']} permuted weights")
        if report.get("merged_decoder"):
            m = report["merged_decoder"]
            con.print(f"merged decoder: {m['if']}: compiles as its with-past branch ({m['fixed_input']}="
                      f"{m['value']}), which also computes the first token from an empty past; callers need not "
                      f"feed {m['fixed_input']}")
        if "private_inputs" in report:
            con.print(f"private inputs (client only): {', '.join(report['private_inputs']) or '-'}")
            con.print(f"public inputs: {', '.join(report['public_inputs']) or '-'}")
            if report.get("server_state"):
                first = report["server_state"][0]
                con.print(f"server-held KV cache: {len(report['server_state'])} tensors ({first['input']} -> "
                          f"{first['output']}, ...), permuted ({', '.join(x or '-' for x in first['spaces'])}); "
                          "never sent to users")
            con.print(f"client pre graph: {report['client_pre_nodes']} nodes, about "
                      f"{_human(report['client_bytes_estimate'])} of weights; server graph: "
                      f"{report['server_nodes']} nodes")
        t = Table("space", "size", "structure", "constants", "log10(choices)", "key bits", title="Permutation spaces")
        for s in report["spaces"]:
            bits = s.get("log2_choices", s["log10_choices"] * math.log2(10))  # bundles written before log2_choices
            t.add_row(s["name"], str(s["size"]), s["structure"], str(s["constants"]), f"{s['log10_choices']:.1f}",
                      f"{bits:.1f}")
        con.print(t)
        t = Table("output", "shape", "spaces (un-permuted by client.post)", title="Outputs")
        for o in report["outputs"]:
            t.add_row(o["name"], str(o["shape"]), ", ".join(x or "-" for x in o["spaces"]))
        con.print(t)
    if report.get("crosses_to_server"):
        t = Table("tensor", "from", "dtype", "shape", "kind", "what the server learns", title="Crosses to server")
        for r in report["crosses_to_server"]:
            t.add_row(r["tensor"], r["from"], r["dtype"], str(r["shape"]), r["kind"], r["reveals"])
        con.print(t)
    if "unplaced" in report:
        if report["unplaced"]:
            t = Table("op", "node", "reason", title="Nodes the compiler could not place")
            for r in report["unplaced"]:
                t.add_row(r["op"], r["node"], r["reason"])
            con.print(t)
        if report.get("blockers"):
            con.print(f"[b]stip compile would refuse this model[/b] ({len(report['blockers'])} blocker(s)):")
            for b in report["blockers"]:
                con.print(f" - {b}", soft_wrap=True)
        else:
            con.print("every node placed: no blockers (compile still runs its self-check before writing)")
    for w in report.get("warnings", []) + report.get("unpermuted_crossings", []):
        con.print(f"warning: {w}", soft_wrap=True)
    if report.get("security_notes"):
        con.print("[b]Security notes[/b]")
        for n in report["security_notes"]:
            con.print(f" - {n}")
    return buf.getvalue()


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
