"""Several ONNX files of one model, one key: which file plays which role, which tensors pass between them on the
server, and one consistent set of permutations over all of them.

Why: optimum writes seq2seq models as an encoder plus decoder files, and older decoders as a prefill graph plus a
with-past graph. A tensor one file writes and another reads on the server (the encoder's last_hidden_state, a
prefill's presents, the cross-attention cache) must be in the same permuted basis in both, and a weight the two
decoders share must not reach the server under two different permutations. Each file is solved on its own
(passes/solve.py); then the classes that must agree are united across files here: the axes of each linked tensor,
and the free axes of weights with identical bytes (matched by content, never by name). Each group of united
classes gets one permutation; a group whose members cannot carry one is refused, naming the tensor.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stip.passes.errors import StipError
from stip.passes.graph import Graph
from stip.passes.permute import Permutations, _checked
from stip.passes.solve import Solution, use_key

# optimum's file names -> role; the order is the order files run in
ROLE_FILES = {"encoder": "encoder_model.onnx", "decoder": "decoder_model.onnx",
              "decoder_with_past": "decoder_with_past_model.onnx"}
MERGED_FILE = "decoder_model_merged.onnx"
# optimum's names, with the suffix a quantizer or converter adds (ORTQuantizer's _quantized, transformers.js's
# _quantized/_int8/_q4/_fp16/...): the longer stem first, so decoder_model_merged is not decoder_model + _merged
_NAME = re.compile(r"^(encoder_model|decoder_with_past_model|decoder_model_merged|decoder_model)(_\w+)?\.onnx$")


def role_name(name: str) -> tuple[str, str] | None:
    """(optimum file name without suffix, suffix) of a multi-file model's file name, or None."""
    m = _NAME.match(name)
    return (m.group(1) + ".onnx", m.group(2) or "") if m else None
ENCODER_OUTPUT, ENCODER_STATES = "last_hidden_state", "encoder_hidden_states"


def discover(paths: list[Path]) -> dict[str, Path]:
    """Role -> file, from a directory that optimum wrote or from files named as optimum names them."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.onnx"))
            if not found:
                raise StipError(f"{p}: no .onnx files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise StipError(f"{p}: no such file or directory")
    by_name = {f.name: f for f in files}
    if len(by_name) != len(files):
        dup = next(f.name for f in files if sum(g.name == f.name for g in files) > 1)
        raise StipError(f"{dup}: given twice (from two directories?); pass each file of the model once")
    named = {n: role_name(n) for n in by_name}
    variants = sorted({r[1] for r in named.values() if r})
    if len(variants) > 1:  # transformers.js writes every variant into one directory
        one = " ".join(str(by_name[n]) for n, r in sorted(named.items()) if r and r[1] == variants[-1])
        raise StipError(f"{files[0].parent}: files of {len(variants)} variants of one model (suffixes "
                        f"{', '.join(v or '(none)' for v in variants)}); pass the files of one variant: {one}")
    by_name = {(named[n] or (n, ""))[0]: f for n, f in by_name.items()}  # one variant: its suffix says no role
    roles = {r: by_name.pop(n) for r, n in ROLE_FILES.items() if n in by_name}
    merged = by_name.pop(MERGED_FILE, None)
    if by_name and not roles and merged is None:  # optimum's quantize -o DIR beside the export: model*.onnx
        raise StipError(f"{', '.join(str(by_name[n]) for n in sorted(by_name))}: {len(by_name)} separate models "
                        "(no file is one of optimum's multi-file names: encoder_model.onnx, decoder_model.onnx, ...); "
                        "pass one file to compile it on its own")
    if by_name:
        other = sorted(by_name)
        raise StipError(f"{by_name[other[0]]}: not a file name optimum writes for a multi-file model (expected "
                        f"{', '.join(ROLE_FILES.values())}); compile it on its own, or rename the files to say "
                        "which role each plays")
    if merged is not None and merged_supported():
        # one file holding both decoders: each role is one branch of its If (stip.passes.merged.branch_model),
        # preferred over a pair beside it (the same weights, one source)
        roles["decoder"] = roles["decoder_with_past"] = merged
    elif merged is not None and "decoder" not in roles and "decoder_with_past" not in roles:
        raise StipError(f"{merged}: a merged decoder (an If on use_cache_branch) is not supported yet in multi-file "
                        f"compiles; export without post-processing (optimum-cli --no-post-process) so that "
                        f"{ROLE_FILES['decoder']} and {ROLE_FILES['decoder_with_past']} are written, and pass those")
    if "decoder" not in roles:
        raise StipError(f"{', '.join(str(f) for f in roles.values())}: no {ROLE_FILES['decoder']} (the graph "
                        "that reads the prompt and writes the first cache); pass it too")
    if "decoder_with_past" not in roles:
        raise StipError(f"{roles['decoder']}: no {ROLE_FILES['decoder_with_past']} beside it; a decoder without "
                        "its with-past graph is one file: compile it on its own")
    return roles


def merged_supported() -> bool:
    """Whether this stip has the merged-decoder pass (stip.passes.merged.branch_model)."""
    try:
        from stip.passes.merged import branch_model  # noqa: F401
    except ImportError:
        return False
    return True


def branch_of(role: str, path: Path) -> str | None:
    """Which branch of a merged decoder plays `role` (None: the file is the role's own graph)."""
    if (role_name(path.name) or ("", ""))[0] != MERGED_FILE:
        return None
    return "first_token" if role == "decoder" else "with_past"


def _branch(model, path: Path, which: str):
    from stip.passes.merged import branch_model

    m = branch_model(model, path, which)
    if m is None:
        raise StipError(f"{path}: no top-level If on a bool input (use_cache_branch): not a merged decoder; pass "
                        f"{ROLE_FILES['decoder']} and {ROLE_FILES['decoder_with_past']} instead")
    _drop_placeholder_presents(m)
    return m


def _drop_placeholder_presents(m) -> None:
    """optimum 2.1's merged seq2seq decoders return Constant placeholders as the with-past branch's cross-attention
    presents (the cross cache does not change after the first token; optimum's runtime ignores them). A present
    computed from no input is not a cache: drop it, so its past input is held state like decoder_with_past's."""
    from stip.runtime.bundle_format import is_cache_output

    const = {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    const |= {t.name for t in m.graph.initializer}
    keep = [o for o in m.graph.output if not (is_cache_output(o.name) and o.name in const)]
    if len(keep) != len(m.graph.output):
        del m.graph.output[:]
        m.graph.output.extend(keep)


def load_role(role: str, path: Path) -> Graph:
    """One file of the model as the graph of its role, cache and held tensors marked (see Graph.held_in)."""
    from stip.passes.graph import load_graph, load_model

    which = branch_of(role, path)
    if which is None:
        return load_graph(path, held=True)
    return load_graph(path, model=_branch(load_model(path), path, which), held=True)


def original_model(role: str, path: Path) -> Path | bytes:
    """What onnxruntime loads as the original of `role`: the file, or its merged decoder's branch."""
    import onnx

    which = branch_of(role, path)
    if which is None:
        return path
    return _branch(onnx.load(str(path)), path, which).SerializeToString()


@dataclass
class Link:
    """A tensor that file `src` writes and file `dst` reads, on the server."""

    src: str
    output: str
    dst: str
    input: str


def find_links(graphs: dict[str, Graph]) -> list[Link]:
    """By role: encoder output -> encoder_hidden_states; a decoder's present.X -> the with-past past_key_values.X
    (the naming of stip.runtime.bundle_format.pair_cache). Marks the linked tensors as held on both sides, and
    refuses a held input nothing writes or a present nothing reads."""
    from stip.runtime.bundle_format import expected_output

    links: list[Link] = []
    enc, dec, past = graphs.get("encoder"), graphs["decoder"], graphs["decoder_with_past"]
    if enc is not None:
        if ENCODER_OUTPUT not in enc.output_names:
            raise StipError(f"{enc.path}: the encoder has no output '{ENCODER_OUTPUT}' (outputs: "
                            f"{', '.join(enc.output_names)})")
        enc.held_out = [ENCODER_OUTPUT]
        for role in ("decoder", "decoder_with_past"):
            if ENCODER_STATES in graphs[role].input_names:
                links.append(Link("encoder", ENCODER_OUTPUT, role, ENCODER_STATES))
                graphs[role].held_in.append(ENCODER_STATES)
        if not any(lk.dst == "decoder" for lk in links):
            raise StipError(f"{dec.path}: the decoder has no input '{ENCODER_STATES}' to read the encoder's output")
    elif ENCODER_STATES in dec.input_names:
        raise StipError(f"{dec.path}: this decoder reads '{ENCODER_STATES}': pass {ROLE_FILES['encoder']} too")
    wants = {expected_output(i): i for i in past.input_names if i in {c for c, _ in past.cache} | set(past.held_in)}
    for o in list(dec.held_out):
        if o not in wants:
            raise StipError(f"{dec.path}: output '{o}' has no input '{o.replace('present', 'past_key_values', 1)}' "
                            f"in {past.path.name} to feed")
        links.append(Link("decoder", o, "decoder_with_past", wants[o]))
    for i in past.held_in:
        if i == ENCODER_STATES:
            continue
        if expected_output(i) not in dec.held_out:
            raise StipError(f"{past.path}: cache input '{i}' is written by no file ({dec.path.name} has no output "
                            f"'{expected_output(i)}')")
    # the prefill's self-attention presents feed the with-past graph too
    return links


def _content_key(a: np.ndarray) -> bytes:
    h = hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
    h.update(repr((a.shape, str(a.dtype))).encode())
    return h.digest()


class _Groups:
    """Union-find over (role, class root)."""

    def __init__(self) -> None:
        self.parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a

    def groups(self) -> dict:
        out: dict = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), []).append(x)
        return out


@dataclass
class Joint:
    """Solved files and the cross-file unification of their spaces."""

    solutions: dict[str, Solution]
    links: list[Link]
    groups: _Groups = field(default_factory=_Groups)


def _compatible(sa: Solution, ca: int, sb: Solution, cb: int) -> bool:
    """Can these two classes carry one permutation: same size, and the same structure down to their parts?"""
    if sa.sizes.get(ca) != sb.sizes.get(cb):
        return False
    la, lb = sa.link(ca), sb.link(cb)
    if not la or not lb:
        return True  # an unstructured class takes the other's composed permutation
    if sa.spaces.kind_of(ca) != sb.spaces.kind_of(cb) or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        px, py = x in sa.permuted, y in sb.permuted
        if px != py:
            return False
        if px and not _compatible(sa, x, sb, y):
            return False
        if not px and sa.spaces.info(x).size != sb.spaces.info(y).size:
            return False
    return True


def _unite(j: Joint, ra: str, ca: int, rb: str, cb: int) -> None:
    j.groups.union((ra, ca), (rb, cb))
    sa, sb = j.solutions[ra], j.solutions[rb]
    la, lb = sa.link(ca), sb.link(cb)
    if la and lb:
        for x, y in zip(la, lb):
            if x in sa.permuted:
                _unite(j, ra, x, rb, y)


def unify(graphs: dict[str, Graph], solutions: dict[str, Solution], links: list[Link]) -> Joint:
    """Unite the classes that must share a permutation across files; refuses a linked tensor whose axes disagree."""
    j = Joint(solutions, links)
    for role, sol in solutions.items():
        for c in sol.permuted:
            j.groups.find((role, c))
    for lk in links:
        ga, gb = graphs[lk.src], graphs[lk.dst]
        sa, sb = solutions[lk.src], solutions[lk.dst]
        da, db = ga.shapes.get(lk.output, []), gb.shapes.get(lk.input, [])
        if len(da) != len(db) or any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(da, db)):
            raise StipError(f"{gb.path}: input '{lk.input}' has shape {db}, but {ga.path.name} writes "
                            f"'{lk.output}' with shape {da}")
        for a, (ca, cb) in enumerate(zip(sa.classes(lk.output, len(da)), sb.classes(lk.input, len(db)))):
            if ca is None and cb is None:
                continue
            if ca is None or cb is None or not _compatible(sa, ca, sb, cb):
                why = "unpermuted" if ca is None else "permuted"
                raise StipError(f"{gb.path}: axis {a} of '{lk.input}' cannot take the permutation {ga.path.name} "
                                f"writes '{lk.output}' in (it is {why} there, {sa.name(ca) or 'unpermuted'} vs "
                                f"{sb.name(cb) or 'unpermuted'} here); the files do not share this tensor's layout")
            _unite(j, lk.src, ca, lk.dst, cb)
    _unite_shared_weights(j, graphs)
    return j


def _unite_shared_weights(j: Joint, graphs: dict[str, Graph]) -> None:
    """Weights with identical bytes in several files (the two decoders hold the same ones; T5 shares its
    embedding) take the same permutation on every free axis, so the server never holds one matrix twice under
    two permutations. Fixed axes stay per use, as within one file (solve._share_weight_uses)."""
    uses: dict[bytes, list[tuple[str, str, int, int]]] = {}
    for role, g in graphs.items():
        seen: dict[str, bytes] = {}
        for idx, n in enumerate(g.model.graph.node):
            for k, x in enumerate(n.input):
                if x not in g.constants or g.constants[x].ndim < 2:
                    continue
                if x not in seen:
                    seen[x] = _content_key(g.constants[x])
                uses.setdefault(seen[x], []).append((role, x, idx, k))
    for group in uses.values():
        if len({r for r, *_ in group}) < 2:
            continue
        first: dict[tuple[int, object], tuple[str, int]] = {}
        for role, x, idx, k in group:
            sol = j.solutions[role]
            rank = graphs[role].constants[x].ndim
            for a, c in enumerate(sol.classes(use_key(x, idx, k), rank)):
                if c is None:
                    continue
                shape = (sol.spaces.kind_of(c), tuple(sol.sizes.get(p, -1) for p in sol.link(c))) \
                    if sol.link(c) else None
                prev = first.setdefault((a, shape), (role, c))
                if prev != (role, c) and _compatible(j.solutions[prev[0]], prev[1], sol, c):
                    _unite(j, prev[0], prev[1], role, c)


def draw_joint(j: Joint, permutation) -> dict[str, Permutations]:
    """One permutation per group of united classes (a structured member's is composed from its parts, and the
    unstructured members take it); per-head inner spaces stay per head only if every member of the group is."""
    sols = j.solutions
    groups = j.groups.groups()
    for members in groups.values():
        dep = [sols[r].dependent.get(c) for r, c in members]
        heads = {j.groups.find((r, h)) for (r, _), h in zip(members, dep) if h is not None}
        if len(members) > 1 and (None in dep or len(heads) > 1):
            for r, c in members:
                sols[r].dependent.pop(c, None)
    perms = {r: Permutations(s, {}) for r, s in sols.items()}
    done: set = set()

    def resolve(gid, stack=()) -> None:
        if gid in done:
            return
        if gid in stack:
            raise StipError("multi-file spaces: a permutation is built from itself (cyclic structure); "
                            "this is a stip bug")
        members = groups[gid]
        linked = [(r, c) for r, c in members if sols[r].link(c)]
        if linked:
            r0, c0 = linked[0]
            for r, c in linked:
                for x in sols[r].link(c):
                    if x in sols[r].permuted:
                        resolve(j.groups.find((r, x)), (*stack, gid))
            vec = perms[r0].vector(c0)
            for r, c in members:
                if not sols[r].link(c):
                    perms[r].drawn[c] = vec
        else:
            r0, c0 = members[0]
            n = sols[r0].sizes[c0]
            h = sols[r0].dependent.get(c0)
            if h is not None:
                p = np.stack([_checked(permutation(n), n) for _ in range(sols[r0].sizes[h])])
            else:
                p = _checked(permutation(n), n)
            for r, c in members:
                perms[r].drawn[c] = p
        done.add(gid)

    for gid in groups:
        resolve(gid)
    for gid, members in groups.items():  # the invariant this module exists for, checked on the drawn values
        r0, c0 = members[0]
        want = perms[r0].drawn[c0] if c0 in sols[r0].dependent else perms[r0].vector(c0)
        for r, c in members[1:]:
            got = perms[r].drawn[c] if c in sols[r].dependent else perms[r].vector(c)
            if not np.array_equal(want, got):
                raise StipError(f"multi-file spaces: '{sols[r].name(c)}' in {r} and '{sols[r0].name(c0)}' in {r0} "
                                "must share a permutation but were drawn differently; this is a stip bug")
    return perms


def key_entries(perms: dict[str, Permutations]) -> dict[str, np.ndarray]:
    """The key file's entries: every file's spaces, named `role/space`."""
    return {f"{r}/{name}": v for r, p in perms.items() for name, v in p.by_name().items()}
