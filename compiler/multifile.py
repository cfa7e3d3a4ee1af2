"""`stip compile DIR_OR_FILES...`: several ONNX files of one model (seq2seq encoder + decoders, a prefill +
with-past decoder pair) -> one bundle, one key.

Layout (each file's part is laid out as a one-file bundle, so the one-file runtime classes read it):
    server/<role>/model.onnx         the permuted server graph of each file
    client/<role>/pre.onnx, post.onnx, stip.json   (no post for a file whose outputs all stay on the server)
    client/stip.json                 the model's manifest: files, links between them, generation settings
    developer/key.npz, report.json   one key (entries `role/space`), one report
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
from stip.passes.errors import StipError
from stip.passes.multifile import (
    ROLE_FILES,
    branch_of,
    discover,
    draw_joint,
    find_links,
    key_entries,
    load_role,
    role_name,
    unify,
)
from stip.runtime.bundle_format import (
    CACHE_SHAPE_SUFFIX,
    CHAIN_PROP,
    POST_MODEL,
    PRE_MODEL,
    SERVER_MODEL,
    TOKENIZER_DIR,
    Layout,
    Manifest,
)

GENERATION_KEYS = ("decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id")


def is_multifile(paths: list[str | Path]) -> bool:
    """Several paths, or a directory of several .onnx files: the multi-file compile. One .onnx file, or a directory
    holding just one (optimum's model.onnx): the one-file compile (see single_file)."""
    return len(paths) > 1 or (Path(paths[0]).is_dir() and single_file(paths) is None)


def single_file(paths: list[str | Path]) -> Path | None:
    """The one model file of a directory that holds exactly one .onnx file (not one of the multi-file names)."""
    if len(paths) != 1 or not Path(paths[0]).is_dir():
        return None
    found = sorted(Path(paths[0]).glob("*.onnx"))
    if len(found) == 1 and role_name(found[0].name) is None:
        return found[0]
    return None


def _generation_config(files: dict[str, Path]) -> dict:
    """decoder_start_token_id and eos from the config.json optimum writes beside the files, if any."""
    out: dict = {}
    for name in ("config.json", "generation_config.json"):
        f = next(iter(files.values())).parent / name
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except ValueError:
                continue
            out.update({k: cfg[k] for k in GENERATION_KEYS if isinstance(cfg.get(k), int)})
    return out


def _client_axes(g, axes: dict) -> dict:
    """Axis roles of the client's inputs. An input sized by a held tensor's length (the encoder mask in a decoder:
    the encoder's length, not the decoder's new tokens) has no role in one file's terms, so it is left unchecked."""
    from stip.passes.axes import declared_dims

    dims = {vi.name: declared_dims(vi) for vi in g.model.graph.input}
    other = {d for n in g.held_in for d in dims.get(n, [])[1:] if isinstance(d, str)}
    return {n: r for n, r in axes.items() if n not in g.held_in and not other & set(dims.get(n, [])[1:])}


@interruptible()
def compile_files(paths: list[str | Path], out_dir: str | Path, *, force: bool = False,
                  tokenizer: str | Path | None = None, check: bool = True, progress=None,
                  external_data: str = "auto", shard_size: int | None = None) -> dict:
    """As compile_model, for several files: weights stream into each file's server graph as they are folded
    (external data when over the threshold or asked, sharded with `shard_size`)."""
    from types import SimpleNamespace

    from stip.compiler.external import InlineWriter
    from stip.compiler.pipeline import _build, _Plan, _save, _writers, analyse, copy_tokenizer

    step = progress or (lambda _label, _total: (lambda: None))
    out = output_path(out_dir)
    check_output_dir(out, force)
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise StipError(f"--tokenizer {tokenizer}: not a directory")
    if shard_size is not None and (shard_size < 1 or external_data == "never"):
        raise StipError(f"--shard-size {shard_size}: must be positive, and cannot be combined with "
                        "--external-data never")
    files = discover([Path(p) for p in paths])
    tick = step("analysing graphs", None)
    graphs = {role: load_role(role, path) for role, path in files.items()}
    links = find_links(graphs)
    analyses = {role: analyse(files[role], graph=g) for role, g in graphs.items()}
    tick()
    joint = unify(graphs, {r: a.solution for r, a in analyses.items()}, links)
    perms = draw_joint(joint, random_permutation)
    key_id = new_key_id()
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out):
        check_output_dir(out, force)
        tmp = new_temp(out)
        lay = Layout(tmp)
        try:
            for d in (lay.server_dir, lay.client_dir, lay.developer_dir):
                d.mkdir()
            reports = {}
            for role, a in analyses.items():
                g = a.graph
                srv, cli = lay.server_dir / role, lay.client_dir / role
                srv.mkdir()
                cli.mkdir()
                plan = _Plan(a, perms[role], key_id, "server", None)
                paths = SimpleNamespace(server_model=srv / SERVER_MODEL, pre=cli / PRE_MODEL, post=cli / POST_MODEL)
                writers = _writers(plan, paths, external_data, shard_size)
                try:
                    bundle, report, manifest, _ = _build(plan, step, writers)
                except BaseException:
                    for w in writers.values():
                        w.close()
                    raise
                shape_of = [i.name[: -len(CACHE_SHAPE_SUFFIX)] for i in bundle.pre.graph.input
                            if i.name.endswith(CACHE_SHAPE_SUFFIX)]
                if set(shape_of) & set(g.held_in):
                    held = next(x for x in shape_of if x in g.held_in)
                    raise StipError(f"{files[role]}: the client graph needs the shape of '{held}', which another "
                                    "file writes on the server; multi-file compiles do not support this yet")
                bundle.server.metadata_props.add(key=CHAIN_PROP, value=json.dumps(
                    {"role": role, "roles": list(analyses), "links": [[lk.src, lk.output, lk.dst, lk.input]
                                                                      for lk in links]}))
                for part in ("server", "pre", "post"):
                    m = getattr(bundle, part)
                    if part == "post" and not m.graph.output and isinstance(writers[part], InlineWriter):
                        writers[part].discard()  # every output stays on the server (an encoder): no post graph
                        continue
                    _save(writers[part], m)
                del bundle
                held_in = set(g.held_in)
                manifest["inputs"] = [n for n in manifest["inputs"] if n not in held_in]
                manifest["public"] = [n for n in manifest["public"] if n not in held_in]
                manifest["held_inputs"], manifest["held_outputs"] = list(g.held_in), list(g.held_out)
                manifest["source"] = files[role].name
                if branch_of(role, files[role]):
                    manifest["branch"] = branch_of(role, files[role])
                manifest["axes"] = _client_axes(g, manifest["axes"])
                Manifest.from_dict(manifest, str(cli / "stip.json")).write(cli / "stip.json")
                reports[role] = report
            top = {"key_id": key_id, "inputs": [], "private": [], "public": [], "crossing": [], "outputs": [],
                   "files": {r: files[r].name for r in analyses},
                   "links": [[lk.src, lk.output, lk.dst, lk.input] for lk in links],
                   "kind": "seq2seq" if "encoder" in analyses else "decoder",
                   "generation": _generation_config(files)}
            if tokenizer is not None:
                copy_tokenizer(tokenizer, lay.client_dir / TOKENIZER_DIR)
                top["tokenizer"] = TOKENIZER_DIR
            Manifest.from_dict(top, str(Layout(out).manifest)).write(lay.manifest)
            write_key(lay.key, key_id, key_entries(perms))
            report = {"key_id": key_id, "files": {r: str(files[r]) for r in analyses}, "per_file": reports,
                      "links": top["links"], "bundle_sizes": {
                          "client_bytes": sum(f.stat().st_size for f in lay.client_dir.rglob("*") if f.is_file()),
                          "server_bytes": sum(f.stat().st_size for f in lay.server_dir.rglob("*") if f.is_file())}}
            if check:
                from stip.compiler.selfcheck import self_check_files

                tick = step("checking bundle against the originals", None)
                report["self_check"] = self_check_files(tmp, files)
                tick()
            else:
                report["self_check"] = "skipped (--no-check)"
            lay.report.write_text(json.dumps(report, indent=2, default=str))
            finish_temp(tmp)
            swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return report


__all__ = ["ROLE_FILES", "compile_files", "is_multifile"]
