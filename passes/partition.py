"""Cut the graph at the secret boundary: what the user's machine computes (pre) and what the cloud computes.

Why this shape: the user holds the private inputs (token ids, pixels). The pre graph must contain every op that
reads their values up to the first heavy op, so the server only ever receives permuted features. Anything the
server needs from a private input's *shape* (batch, sequence length) crosses as plain integers and is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stip.passes.errors import StipError
from stip.passes.graph import Graph
from stip.passes.rules import SHAPE_ONLY, contract, op_key
from stip.passes.solve import Solution


@dataclass
class Partition:
    private: list[str]
    public: list[str]
    pre_nodes: list[int]
    server_nodes: list[int]
    crossing: list[str]  # tensors computed by pre and sent to the server
    pre_outputs: list[str]  # original graph outputs that pre computes itself (post un-permutes them)
    post_nodes: list[int] = field(default_factory=list)  # the LM head, with --head client
    to_post: list[str] = field(default_factory=list)  # tensors the server returns for post_nodes
    cache: list[tuple[str, str]] = field(default_factory=list)  # server-held KV cache (input, output)
    held_out: list[str] = field(default_factory=list)  # outputs another file of the model reads on the server

    @property
    def user_outputs(self) -> list[str]:
        return [o for o in self.outputs if o not in {c for _, c in self.cache} and o not in self.held_out]

    outputs: list[str] = field(default_factory=list)
    tail_inputs: list[str] = field(default_factory=list)  # what post un-permutes before running the plaintext tail


def is_lift(g: Graph, idx: int, j: int) -> bool:
    """Does input j of node idx turn values into features through a weight (embedding, patch conv, linear)?"""
    n = g.model.graph.node[idx]
    weights = contract(n).lifts.get(j)
    if weights is None:
        return False
    if n.op_type == "Gather":  # a table computed from constants only (int8 dequantized first) is a table too
        return n.input[0] in g.constants or _static_producers(g, n.input[0]) is not None
    return any(w < len(n.input) and n.input[w] in g.constants for w in weights)


def reads(n, k: int, j: int) -> bool:
    """Do the values of output k of node n depend on input j (see OpContract.reads)?"""
    only = contract(n).reads.get(k)
    return only is None or j in only


def value_cone(g: Graph, sources: list[str]) -> set[int]:
    """Nodes whose outputs depend on the *values* of `sources` (Shape/Size break the dependence)."""
    seen: set[int] = set()
    reached = set(sources)
    stack = list(sources)
    while stack:
        t = stack.pop()
        for idx, j in g.consumers.get(t, []):
            n = g.model.graph.node[idx]
            if n.op_type in SHAPE_ONLY:
                continue
            seen.add(idx)
            for k, o in enumerate(n.output):
                if o and o not in reached and reads(n, k, j):
                    reached.add(o)
                    stack.append(o)
    return seen


def detect_private(g: Graph, sol: Solution, private: list[str] | None = None,
                   public: list[str] | None = None) -> list[str]:
    """Inputs whose values a weight lifts into feature space (token ids, token types, pixels).

    The walk stops at tensors that already carry a permuted axis: the attention mask also reaches later
    MatMuls, but only after mixing into permuted attention scores, so it is public metadata. Overridable.
    """
    names = g.input_names
    for flag, given in (("--private", private or []), ("--public", public or [])):
        for n in given:
            if n not in names:
                raise StipError(f"{g.path}: {flag} {n}: no such graph input (inputs: {', '.join(names)})")
    if private:
        return [n for n in names if n in private]
    cache = g.state_inputs
    out = []
    for name in names:
        if (public and name in public) or name in cache:
            continue
        if _lifted(g, sol, name):
            out.append(name)
    return out


def _featured(g: Graph, sol: Solution, t: str) -> bool:
    return any(c is not None for c in sol.classes(t, len(g.shapes.get(t, []))))


def position_lookup(g: Graph, idx: int) -> bool:
    """A Gather into a position table: its indices count tokens (a CumSum over a mask, as OPT numbers positions
    by `cumsum(attention_mask) * attention_mask - 1`). A mask that only selects positions is padding metadata the
    server needs anyway, not a private value; token ids reach their table without counting."""
    n = g.model.graph.node[idx]
    if n.op_type != "Gather" or n.input[0] not in g.constants:
        return False
    seen: set[str] = set()
    stack = [n.input[1]]
    while stack:
        t = stack.pop()
        p = g.producer.get(t)
        if t in seen or p is None:
            continue
        seen.add(t)
        src = g.model.graph.node[p]
        if src.op_type == "CumSum":
            return True
        if src.op_type not in SHAPE_ONLY:
            stack.extend(x for x in src.input if x)
    return False


def _lifted(g: Graph, sol: Solution, source: str) -> bool:
    seen: set[str] = set()
    stack = [source]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        for idx, j in g.consumers.get(t, []):
            n = g.model.graph.node[idx]
            if n.op_type in SHAPE_ONLY or position_lookup(g, idx):
                continue
            if is_lift(g, idx, j):
                return True
            stack.extend(o for o in n.output if o and not _featured(g, sol, o))
    return False


def _static_producers(g: Graph, t: str) -> list[int] | None:
    """Nodes computing `t` from constants only (dynamo ties embeddings as MatMul(x, Transpose(W))), or None."""
    if t in g.constants:
        return []
    p = g.producer.get(t)
    if p is None:
        return None
    out = [p]
    for x in g.model.graph.node[p].input:
        if x:
            sub = _static_producers(g, x)
            if sub is None:
                return None
            out += sub
    return out


HEAD_OPS = ("MatMul", "Gemm", "com.microsoft:MatMulNBits", "com.microsoft:FusedMatMul")  # a weight times x


def lm_head_tail(g: Graph, output: str, max_nodes: int = 8) -> tuple[list[int], str]:
    """The nodes from the last weight MatMul/Gemm to `output` (a chain), and that MatMul's activation input."""
    nodes = g.model.graph.node
    tail: list[int] = []
    t = output
    while len(tail) < max_nodes:
        p = g.producer.get(t)
        if p is None:
            break
        n = nodes[p]
        tail.append(p)
        static = {x: _static_producers(g, x) for x in n.input if x}
        acts = [x for x, chain in static.items() if chain is None]
        if op_key(n) in HEAD_OPS and len(acts) == 1 and any(
                static[x] is not None for x in n.input[:2] if x):
            for chain in static.values():
                tail += chain or []
            return sorted(set(tail)), acts[0]
        if len(acts) != 1:
            break
        for chain in static.values():
            tail += chain or []
        t = acts[0]
    raise StipError(f"{g.path}: --head client: no weight MatMul/Gemm found within {max_nodes} nodes before "
                    f"output '{output}'")


def partition(g: Graph, sol: Solution, private: list[str], head: str = "server") -> Partition:
    nodes = g.model.graph.node
    public = [n for n in g.input_names if n not in private and n not in g.held_in]
    cone = value_cone(g, private)
    eligible: set[int] = set()
    for idx in sorted(cone):
        n = nodes[idx]
        if contract(n).heavy:
            continue
        if all(g.producer.get(x) not in cone or g.producer.get(x) in eligible for x in n.input if x):
            eligible.add(idx)
    eligible, raw = _choose_pre(g, sol, cone, eligible, set(private))

    cache_outputs = g.state_outputs
    post_nodes: set[int] = set()
    to_post: list[str] = []
    if head == "client":
        for o in g.output_names:
            if o in cache_outputs or g.producer.get(o) in eligible:
                continue
            tail, hidden = lm_head_tail(g, o)
            post_nodes.update(tail)
            if hidden not in to_post:
                to_post.append(hidden)
    elif head != "server":
        raise StipError(f"--head {head}: expected server or client")
    tail_inputs: list[str] = []
    if sol.post_tail:  # ops after the last weight that need plaintext (see solve.solve): post runs them
        if sol.post_tail & eligible:
            n = min(sol.post_tail & eligible)
            raise StipError(f"{g.path}: {g.node_label(n)} runs after the last weight but also reads private data "
                            "before any weight (e.g. GPT-2 sequence classification picks each row's last non-pad "
                            "token from the token ids); the compiler cannot place it: export without that step (task "
                            "feature-extraction or text-generation) and apply it to the outputs on the client")
        post_nodes |= sol.post_tail
        for i in sorted(sol.post_tail):
            for x in nodes[i].input:
                if x and x not in g.constants and g.producer.get(x) not in post_nodes and x not in tail_inputs:
                    tail_inputs.append(x)

    # server: everything the graph outputs need, stopping at tensors pre computes
    server: set[int] = set()
    stack = [o for o in g.output_names if g.producer.get(o) not in post_nodes] + to_post + [
        t for t in tail_inputs if t not in g.input_names]
    seen_t: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen_t:
            continue
        seen_t.add(t)
        p = g.producer.get(t)
        if p is None or p in eligible or p in server:
            continue
        server.add(p)
        stack.extend(x for x in nodes[p].input if x)
    # Shapes of private data cross as integers; any other server use of raw private values is a leak.
    shape_to_pre: set[int] = set()
    for idx in sorted(server):
        for x in nodes[idx].input:
            if x in raw:
                if nodes[idx].op_type in SHAPE_ONLY:
                    shape_to_pre.add(idx)
                else:
                    raise StipError(f"{g.path}: {g.node_label(idx)} reads private data '{x}' before any weight "
                                    "permutes it, so it cannot run on the server (mark the input --public if it "
                                    "is not private)")
    server -= shape_to_pre
    if not server:
        raise StipError(f"{g.path}: nothing is left for the server: every op reading the private inputs is cheap "
                        "enough to run on the client (no MatMul/Gemm on the feature path)")
    pre_core = eligible | shape_to_pre
    pre = set(pre_core)
    stack = [x for i in pre_core for x in nodes[i].input if x]
    while stack:
        t = stack.pop()
        p = g.producer.get(t)
        if p is None or p in pre:
            continue
        pre.add(p)
        stack.extend(x for x in nodes[p].input if x)
    server_produced = {o for i in server for o in nodes[i].output}
    crossing: list[str] = []
    for idx in sorted(server):
        for x in nodes[idx].input:
            if x and x not in crossing and x in g.producer and x not in server_produced:
                crossing.append(x)
    for t in crossing:  # defence in depth: only permuted features and shape integers may leave the client
        p = g.producer.get(t)
        if t in raw and nodes[p].op_type not in SHAPE_ONLY:
            raise StipError(f"{g.path}: tensor '{t}' would reach the server unpermuted (from {g.node_label(p)})")
    # outputs the client computes itself, or that echo an input it holds (sentence-transformers returns
    # Identity(input_ids)): produced on the client, never sent to or returned by the server
    pre_outputs = [o for o in g.output_names if g.producer.get(o) in eligible or o in g.input_names]
    return Partition(private, public, sorted(pre), sorted(server), crossing, pre_outputs, sorted(post_nodes),
                     to_post, list(g.cache), list(g.held_out), g.output_names, tail_inputs)


def _choose_pre(g: Graph, sol: Solution, cone: set[int], eligible: set[int],
                private: set[str]) -> tuple[set[int], set[str]]:
    """The client's share of the cone: every op that still sees raw private data (ids, pixels, position ids
    derived from them) must run there; cheap ops after the lift join it while that sends no more tensors
    (BERT: the whole embedding block incl. LayerNorm; ViT and Llama: stop before the first layer's norm,
    since the residual needs the embeddings anyway)."""
    nodes = g.model.graph.node
    # raw: private values not yet lifted into a permuted space (statistics of permuted features, such as a
    # norm's mean square, are derived from features and are not raw)
    lifted: set[str] = set()
    raw: set[str] = set(private)
    for i in sorted(cone):
        n = nodes[i]
        for k, o in enumerate(n.output):
            if not o:
                continue
            deps = [x for j, x in enumerate(n.input) if x and reads(n, k, j)]
            if _featured(g, sol, o) or any(x in lifted for x in deps):
                lifted.add(o)
            elif any(x in raw for x in deps):
                raw.add(o)
    pre = {i for i in eligible if any(x in raw for x in nodes[i].input)}
    stack = list(pre)
    while stack:  # ancestors within the eligible region
        for x in nodes[stack.pop()].input:
            p = g.producer.get(x)
            if p in eligible and p not in pre:
                pre.add(p)
                stack.append(p)
    outputs = set(g.output_names)

    def crossing(region: set[int]) -> int:
        return sum(1 for i in region for o in nodes[i].output if o and (o in outputs or any(
            c not in region for c, _ in g.consumers.get(o, []))))

    changed = True
    while changed:
        changed = False
        for idx in sorted(eligible - pre):
            if not all(g.producer.get(x) not in cone or g.producer.get(x) in pre for x in nodes[idx].input if x):
                continue
            if crossing(pre | {idx}) <= crossing(pre):
                pre.add(idx)
                changed = True
    return pre, raw
