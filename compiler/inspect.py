"""`stip inspect`: a model as the compiler sees it, or a bundle as each party receives it."""

from __future__ import annotations

import json
from pathlib import Path

from stip.compiler.report import model_summary
from stip.passes.errors import StipError
from stip.runtime.bundle_format import CLIENT_DIR, DEVELOPER_DIR, SERVER_DIR, Layout, Manifest, model_key_id

_L = Layout(Path())
HOLDS = {
    _L.server_model.as_posix(): "server graph: permuted weights, no key",
    _L.server_model.as_posix() + ".data": "server weights (external data)",
    _L.pre.as_posix(): "embedding / patch projection with the input permutation folded in",
    _L.post.as_posix(): "un-permutes the outputs",
    _L.manifest.as_posix(): "key id, input/output names, what is sent to the server",
    _L.key.as_posix(): "THE KEY: every permutation (mode 0600, never shipped)",
    _L.report.as_posix(): "compile report",
}
PARTY = {SERVER_DIR: "model server (cloud)", CLIENT_DIR: "user", DEVELOPER_DIR: "model developer"}


def _external_data(rel: str) -> str:
    if rel.endswith(".onnx.data"):
        return "server weights (external data shard)" if rel.startswith(SERVER_DIR) else "weights (external data)"
    return ""


def inspect_model(path: Path, private=None, public=None, graph=None) -> dict:
    from stip.compiler.pipeline import analyse

    a = analyse(path, private, public, strict=False, graph=graph)
    return model_summary(a.graph, a.solution, a.partition, a.refusals)


def inspect_files(paths: list[Path], private=None, public=None) -> dict:
    """An export of several files, as `stip compile DIR` takes them: each role's graph with the tensors that pass
    between files marked as held on the server (as compile links them), then the same analysis per file."""
    from stip.passes.multifile import discover, find_links, load_role

    files = discover(paths)
    graphs = {role: load_role(role, path) for role, path in files.items()}
    links = find_links(graphs)
    return {"files": {role: inspect_model(files[role], private, public, graph=g) for role, g in graphs.items()},
            "links": [[lk.src, lk.output, lk.dst, lk.input] for lk in links]}


def inspect_bundle(d: Path) -> dict:
    lay = Layout(d)
    manifest = Manifest.read(lay.manifest) if lay.manifest.exists() else None
    roles = list(manifest.get("files") or []) if manifest is not None else []
    if manifest is None or not (roles or lay.server_model.exists()):
        raise StipError(f"{d}: not a stip bundle (expected {_L.server_model} and {_L.manifest})")
    files = []
    for f in sorted(d.rglob("*")):
        if f.is_file():
            rel = f.relative_to(d).as_posix()
            parts = rel.split("/")
            generic = f"{parts[0]}/{parts[2]}" if len(parts) == 3 and parts[1] in roles else rel  # <part>/<role>/
            holds = HOLDS.get(generic) or _external_data(generic)
            files.append({"party": PARTY.get(parts[0], "?"), "file": rel, "bytes": f.stat().st_size,
                          "holds": f"{holds} ({parts[1]})" if generic != rel and holds else holds})
    size = lambda top: sum(x["bytes"] for x in files if x["file"].startswith(top + "/"))  # noqa: E731
    report: dict = {"bundle": {
        "path": str(d), "key_id": manifest.key_id, "files": files, "client_bytes": size(CLIENT_DIR),
        "server_bytes": size(SERVER_DIR)}}
    if roles:  # several files, one key (stip.compiler.multifile)
        subs = {r: Manifest.read(lay.client_dir / r / _L.manifest.name) for r in roles}
        report["bundle"].update({
            "server_key_id": {r: model_key_id(lay.server_dir / r / _L.server_model.name) for r in roles},
            "roles": manifest["files"], "links": manifest["links"],
            "private_inputs": {r: m.private for r, m in subs.items()},
            "public_inputs": {r: m.public for r, m in subs.items()},
            "sent_to_server": {r: m.crossing + m.public for r, m in subs.items()},
            "outputs": {r: m.outputs for r, m in subs.items()}})
    else:
        report["bundle"].update({
            "server_key_id": model_key_id(lay.server_model), "private_inputs": manifest.private,
            "public_inputs": manifest.public, "sent_to_server": manifest.crossing + manifest.public,
            "outputs": manifest.outputs})
    rep = lay.report
    if rep.exists():
        full = json.loads(rep.read_text())
        report.update({k: v for k, v in full.items() if k not in ("bundle_sizes",)})
    return report
