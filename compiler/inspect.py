"""`stip inspect`: a model as the compiler sees it, or a bundle as each party receives it."""

from __future__ import annotations

import json
from pathlib import Path

from stip.compiler.report import model_summary
from stip.passes.errors import StipError
from stip.runtime.bundle import CLIENT_MANIFEST, model_key_id

HOLDS = {
    "server/model.onnx": "server graph: permuted weights, no key",
    "server/model.onnx.data": "server weights (external data)",
    "client/pre.onnx": "embedding / patch projection with the input permutation folded in",
    "client/post.onnx": "un-permutes the outputs",
    f"client/{CLIENT_MANIFEST}": "key id, input/output names, what is sent to the server",
    "developer/key.npz": "THE KEY: every permutation (mode 0600, never shipped)",
    "developer/report.json": "compile report",
}
PARTY = {"server": "model server (cloud)", "client": "user", "developer": "model developer"}


def inspect_model(path: Path, private=None, public=None) -> dict:
    from stip.compiler.pipeline import analyse

    a = analyse(path, private, public, strict=False)
    return model_summary(a.graph, a.solution, a.partition)


def inspect_bundle(d: Path) -> dict:
    man_path = d / "client" / CLIENT_MANIFEST
    if not man_path.exists() or not (d / "server" / "model.onnx").exists():
        raise StipError(f"{d}: not a stip bundle (expected server/model.onnx and client/{CLIENT_MANIFEST})")
    manifest = json.loads(man_path.read_text())
    files = []
    for f in sorted(d.rglob("*")):
        if f.is_file():
            rel = f.relative_to(d).as_posix()
            files.append({"party": PARTY.get(rel.split("/")[0], "?"), "file": rel, "bytes": f.stat().st_size,
                          "holds": HOLDS.get(rel, "")})
    size = lambda top: sum(x["bytes"] for x in files if x["file"].startswith(top + "/"))  # noqa: E731
    report: dict = {"bundle": {
        "path": str(d), "key_id": manifest["key_id"], "server_key_id": model_key_id(d / "server" / "model.onnx"),
        "files": files, "client_bytes": size("client"), "server_bytes": size("server"),
        "private_inputs": manifest["private"], "public_inputs": manifest["public"],
        "sent_to_server": manifest["crossing"] + manifest["public"], "outputs": manifest["outputs"],
    }}
    rep = d / "developer" / "report.json"
    if rep.exists():
        full = json.loads(rep.read_text())
        report.update({k: v for k, v in full.items() if k not in ("bundle_sizes",)})
    return report
