"""`stip compile`: load -> solve spaces -> partition -> draw key -> fold -> write the bundle atomically."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from stip.compiler.external import ExternalWriter, InlineWriter
from stip.compiler.keys import new_key_id, random_permutation, write_key
from stip.compiler.output import (
    check_output_dir,
    finish_temp,
    interruptible,
    locked,
    new_temp,
    output_path,
    swap_into_place,
)
from stip.compiler.report import model_summary
from stip.passes.axes import input_axes, position_table_rows
from stip.passes.build import build, client_reads_cache
from stip.passes.errors import StipError
from stip.passes.formats import refuse_unsupported_format
from stip.passes.graph import Graph, load_graph
from stip.passes.partition import Partition, detect_private, partition
from stip.passes.permute import Permutations, draw
from stip.passes.solve import Solution, require_transformer, solve
from stip.runtime.bundle_format import TOKENIZER_DIR, Layout, Manifest
from stip.runtime.verify import index_range

EXTERNAL_DATA_THRESHOLD = 1 << 30  # serialized bytes above which the server graph uses external data
Progress = Callable[[str, int | None], Callable[[], None]]


@dataclass
class Analysis:
    graph: Graph
    solution: Solution
    partition: Partition | None
    refusals: list[str] = field(default_factory=list)  # every reason compile would refuse, in compile's words


def analyse(model_path: str | Path, private: list[str] | None = None, public: list[str] | None = None,
            strict: bool = True, head: str = "server", graph: Graph | None = None) -> Analysis:
    """The one analysis compile and inspect share. strict=True (compile) raises the first refusal as a
    StipError; strict=False (inspect) collects them all, so inspect never calls a model fine that compile
    refuses. Model-level problems (unreadable, quantized, merged decoder, no Transformer) raise in both modes."""
    g = graph if graph is not None else load_graph(model_path)  # a multi-file compile loads and links first
    refuse_unsupported_format(g)
    sol = solve(g)
    require_transformer(sol)
    refusals: list[str] = []

    def refuse(msg: str) -> None:
        if strict:
            raise StipError(msg)
        refusals.append(msg)

    if sol.blockers:
        extra = f" (and {len(sol.blockers) - 1} more; see `stip inspect`)" if len(sol.blockers) > 1 else ""
        if strict:
            raise StipError(f"{g.path}: cannot place {sol.blockers[0]}{extra}")
        refusals += [f"{g.path}: cannot place {b}" for b in sol.blockers]
    priv = detect_private(g, sol, private, public)
    part = None
    if not priv:
        refuse(f"{g.path}: no private input found (no input reaches an embedding, patch or linear weight)")
    else:
        try:
            part = partition(g, sol, priv, head)
            cache_read = client_reads_cache(g, part.pre_nodes)
            if cache_read:
                refuse(cache_read)
        except StipError as e:
            refuse(str(e))
    return Analysis(g, sol, part, refusals)


# What --tokenizer ships to users: tokenizer files only. The directory is often the one optimum exported the model
# into, so copying all of it would hand users the plaintext .onnx files (measured: it did).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    found = [Path(src) / n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    if not found:
        raise StipError(f"--tokenizer {src}: no tokenizer files there (expected {', '.join(TOKENIZER_FILES[:3])})")
    dst.mkdir()
    for f in found:
        shutil.copyfile(f, dst / f.name)


def _save(writer: ExternalWriter | InlineWriter, model: onnx.ModelProto) -> None:
    """Finish one graph's file (its weights are already in place); the seam the crash-safety tests hook."""
    writer.finish_model(model)


@interruptible()
def compile_model(model_path: str | Path, out_dir: str | Path, *, force: bool = False,
                  private: list[str] | None = None, public: list[str] | None = None,
                  external_data: str = "auto", progress: Progress | None = None, head: str = "server",
                  tokenizer: str | Path | None = None, max_context: int | None = None, check: bool = True,
                  shard_size: int | None = None) -> dict:
    """Write out/{server,client,developer}; nothing is left behind on failure, nothing replaced without force,
    and only a bundle replaced with it (see stip.compiler.output). With `check`, the bundle must match the
    original in onnxruntime before it takes the output's place."""
    out = output_path(out_dir)
    if out.parent.is_dir():
        with locked(out):  # repairs what a killed compile left, before judging the output
            check_output_dir(out, force)
    else:
        check_output_dir(out, force)
    step = progress or (lambda _label, _total: (lambda: None))
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise StipError(f"--tokenizer {tokenizer}: not a directory")
    if max_context is not None and max_context < 1:
        raise StipError(f"--max-context {max_context}: must be at least 1")
    if shard_size is not None and (shard_size < 1 or external_data == "never"):
        raise StipError(f"--shard-size {shard_size}: must be positive, and cannot be combined with "
                        "--external-data never")
    planned = _analyse_and_draw(model_path, private, public, step, head, max_context)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StipError(f"{out.parent}: cannot create the output's parent directory ({e.strerror})")
    with locked(out):
        check_output_dir(out, force)  # again: the directory may have changed while we analysed
        tmp = new_temp(out)
        lay = Layout(tmp)
        writers: dict[str, ExternalWriter | InlineWriter] = {}
        try:
            for d in (lay.server_dir, lay.client_dir, lay.developer_dir):
                d.mkdir()
            # Weights stream from the original (memory-mapped) into the bundle's files as they are folded, so
            # neither model is ever whole in memory; small graphs are assembled in memory and written at once.
            writers = _writers(planned, lay, external_data, shard_size)
            bundle, report, manifest, key = _build(planned, step, writers)
            del planned
            tick = step("writing bundle", None)
            for part_name in ("server", "pre", "post"):
                _save(writers[part_name], getattr(bundle, part_name))
            del bundle  # on disk now: the self-check loads it as sessions, so drop the in-memory copy first
            if tokenizer is not None:
                copy_tokenizer(tokenizer, lay.client_dir / TOKENIZER_DIR)
                manifest["tokenizer"] = TOKENIZER_DIR
            Manifest.from_dict(manifest, str(Layout(out).manifest)).write(lay.manifest)
            write_key(lay.key, manifest["key_id"], key)
            report["key_id"] = manifest["key_id"]
            report["bundle_sizes"] = {
                "client_bytes": sum(f.stat().st_size for f in lay.client_dir.rglob("*") if f.is_file()),
                "server_bytes": sum(f.stat().st_size for f in lay.server_dir.rglob("*") if f.is_file()),
                "server_files": sorted(f.name for f in lay.server_dir.iterdir()),
            }
            report["self_check"] = _check(tmp, model_path, step) if check else "skipped (--no-check)"
            lay.report.write_text(json.dumps(report, indent=2))
            finish_temp(tmp)
            swap_into_place(tmp, out)
            tick()
        except BaseException:
            for w in writers.values():
                w.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return report


def _check(tmp: Path, model_path: str | Path, step: Progress) -> dict:
    """The self-check (compiler/selfcheck.py); a StipError here removes the temp dir, so nothing is written."""
    from stip.compiler.selfcheck import self_check

    tick = step("checking bundle against the original", None)
    summary = self_check(tmp, model_path)
    tick()
    return summary


@dataclass
class _Plan:
    analysis: Analysis
    perms: Permutations
    key_id: str
    head: str
    max_context: int | None


def _part_weight_bytes(g: Graph, node_ids: list[int]) -> int:
    nodes = g.model.graph.node
    names = {x for i in node_ids for x in nodes[i].input if x in g.constants}
    size = getattr(g.constants, "nbytes", None)
    return sum(size(x) if size else int(g.constants[x].nbytes) for x in names)


def _writers(plan: _Plan, lay: Layout, external: str,
             shard_size: int | None) -> dict[str, ExternalWriter | InlineWriter]:
    """Where each graph's folded weights stream to: external data for the server when asked (always, sharded)
    or when its weights exceed the threshold, and for pre/post (embedding table, client-side head) when theirs
    do; otherwise straight into the graph's own .onnx (InlineWriter). No graph is ever whole in memory."""
    g, part = plan.analysis.graph, plan.analysis.partition
    out: dict[str, ExternalWriter | InlineWriter] = {}
    server_bytes = _part_weight_bytes(g, part.server_nodes)
    if external == "always" or shard_size or (external == "auto" and server_bytes > EXTERNAL_DATA_THRESHOLD):
        out["server"] = ExternalWriter(lay.server_model, shard_size)
    else:
        out["server"] = InlineWriter(lay.server_model)
    for name, nodes, path in (("pre", part.pre_nodes, lay.pre), ("post", part.post_nodes, lay.post)):
        big = _part_weight_bytes(g, nodes) > EXTERNAL_DATA_THRESHOLD
        out[name] = ExternalWriter(path) if big else InlineWriter(path)
    return out


def _analyse_and_draw(model_path, private, public, step, head="server", max_context=None) -> _Plan:
    tick = step("analysing graph", None)
    a = analyse(model_path, private, public, head=head)
    tick()
    assert a.partition is not None
    return _Plan(a, draw(a.solution, random_permutation), new_key_id(), head, max_context)


def _build(plan: _Plan, step, sinks: dict):
    g, sol, part = plan.analysis.graph, plan.analysis.solution, plan.analysis.partition
    perms, key_id, head, max_context = plan.perms, plan.key_id, plan.head, plan.max_context
    uses = sum(1 for i in part.pre_nodes + part.server_nodes + part.post_nodes
               for x in g.model.graph.node[i].input if x in g.constants)
    report = model_summary(g, sol, part)
    report["head"] = head
    vocab = {n: index_range(g, n) for n in part.private if g.dtypes.get(n) in (6, 7)}
    context = max_context or position_table_rows(g)
    axes = input_axes(g)  # each input axis's role, from the graph (before build releases the constants)
    bundle = build(g, sol, perms, part, key_id, progress=step("folding permutations into weights", uses),
                   release_constants=True, sinks=sinks)
    server_inputs = {i.name for i in bundle.server.graph.input}
    cache_inputs = {i for i, _ in part.cache}
    manifest = {
        "key_id": key_id,
        "inputs": [n for n in g.input_names if n not in cache_inputs],
        "private": part.private,
        "public": [n for n in part.public if n in server_inputs and n not in cache_inputs],
        "crossing": [i.name for i in bundle.server.graph.input if i.name not in g.input_names],
        "outputs": part.user_outputs,
        "cache": [list(p) for p in part.cache],
        "cache_dims": {i: [d if isinstance(d, int) else None for d in g.shapes[i]] for i, _ in part.cache},
        "head": head,
        "vocab_size": vocab,
        "max_context": context,
        "axes": axes,
        "fixed_inputs": {g.merged.cond: g.merged.value} if g.merged else {},
    }

    return bundle, report, manifest, perms.by_name()

