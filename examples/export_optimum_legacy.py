"""Export small random-weight decoders with optimum 1.27's `optimum-cli export onnx --legacy`: three files,
decoder_model.onnx (prefill, no past inputs, `present.*` outputs), decoder_with_past_model.onnx, and
decoder_model_merged.onnx (both inside one top-level If on the bool input `use_cache_branch`). Many published
ONNX LLM files have this layout.

Why a second venv: optimum 1.27 is the last release with --legacy and needs transformers 4.53.x, which conflicts
with both the project's venv and export_optimum.py's optimum 2 venv. It is built once and cached (default
~/.cache/stip/optimum-legacy-venv, or $STIP_OPTIMUM_LEGACY_VENV). On torch 2.13 optimum 1.27 needs an import shim
(_legacy_shim below). Models are built by export_optimum.build_model (same configs, noise on every parameter).

    python examples/export_optimum_legacy.py gpt2 -o out/gpt2-legacy
    python examples/export_optimum_legacy.py --venv-only
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import export_optimum as eo  # noqa: E402  (its driver half is stdlib only)

REQUIREMENTS = ["torch==2.13.0", "transformers==4.53.3", "optimum==1.27.0", "onnx==1.23.2", "onnxruntime==1.31.1"]
FILES = ("decoder_model.onnx", "decoder_with_past_model.onnx", "decoder_model_merged.onnx")
ARCHS = ("gpt2", "llama")  # what the tests cover; other decoder archs of export_optimum.ARCHS work the same way
TASK = "text-generation-with-past"


def venv_path() -> Path:
    return Path(os.environ.get("STIP_OPTIMUM_LEGACY_VENV") or Path.home() / ".cache" / "stip" / "optimum-legacy-venv")


def ensure_venv(log=print) -> Path:
    """The legacy venv's python, built once (about a minute; pip from the index or local wheels)."""
    return eo.ensure_venv(venv_path(), log, requirements=REQUIREMENTS)


def export(arch: str, out: str | Path, *, task: str = TASK, seed: int = 0) -> Path:
    """Build the random-weight model and run optimum-cli --legacy in the legacy venv; returns OUT, which holds
    FILES (plus config, tokenizer, hf/ with the source model, export.log). OUT is replaced."""
    if arch not in eo.ARCHS:
        raise eo.ExportError(f"unknown arch {arch!r}; expected one of {', '.join(eo.ARCHS)}")
    out, log = eo.run_inside(ensure_venv(), __file__, [arch, "--task", task], out,
                             f"export {arch} {task} with optimum 1.27 --legacy", ["--seed", str(seed)])
    missing = [f for f in FILES if not (out / f).exists()]
    if missing:
        raise eo.ExportError(f"optimum-cli --legacy wrote no {', '.join(missing)} in {out}:\n{log[-2000:]}")
    return out


def cache_key(arch: str, task: str = TASK, seed: int = 0) -> str:
    """Changes with this file, the model-building half of export_optimum.py, the pins or the case."""
    base = (HERE / "export_optimum.py").read_text()
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(base[base.index(eo.INSIDE_MARK):].encode())
    h.update(repr((REQUIREMENTS, arch, task, seed)).encode())
    return h.hexdigest()[:12]


def cached_export(arch: str, task: str = TASK, *, seed: int = 0, root: Path | None = None) -> Path:
    """The export directory of this case (holding FILES), exported once into export_optimum's cache dir and
    reused afterwards; parallel callers wait for one export."""
    root = Path(root or eo.exports_root())
    out = root / f"legacy-{arch}-{task}-{cache_key(arch, task, seed)}"

    def done(d: Path) -> bool:
        return all((d / f).exists() for f in FILES) and (d / "export.log").exists()

    return eo.cached_dir(out, done, lambda tmp: export(arch, tmp, task=task, seed=seed))
    with eo._locked(out):
        if not done():
            tmp = out.with_name(out.name + ".tmp")
            export(arch, tmp, task=task, seed=seed)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out


# ---------------------------------------------------------------- inside the legacy venv (torch, optimum 1.27)

def _legacy_shim() -> None:
    """optimum 1.27 imports attention helpers from torch.onnx.symbolic_opset14, which torch >= 2.9 moved to
    torch.onnx._internal, and torch >= 2.9 exports with dynamo=True unless told otherwise: re-export the helpers,
    and default torch.onnx.export to the TorchScript exporter optimum 1.27 was written for."""
    import functools

    import torch.onnx
    import torch.onnx.symbolic_opset14 as public
    from torch.onnx._internal.torchscript_exporter import symbolic_opset14 as moved

    for name in ("_attention_scale", "_causal_attention_mask", "_onnx_symbolic", "_type_utils", "jit_utils",
                 "symbolic_helper"):
        if not hasattr(public, name):
            setattr(public, name, getattr(moved, name))
    original = torch.onnx.export

    @functools.wraps(original)
    def export(*args, **kwargs):
        kwargs.setdefault("dynamo", False)
        return original(*args, **kwargs)

    torch.onnx.export = export


def _inside(a: argparse.Namespace) -> None:
    out = Path(a.output)
    src = eo.build_model(a.arch, a.task, out / "hf", a.seed)
    _legacy_shim()
    args = ["export", "onnx", "--model", str(src), "--task", a.task, "--legacy", str(out)]
    print("optimum-cli " + " ".join(args), flush=True)
    from optimum.commands.optimum_cli import main as optimum_cli  # in this process, after the shim

    sys.argv = ["optimum-cli", *args]
    optimum_cli()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", nargs="?", choices=eo.ARCHS)
    ap.add_argument("--task", default=TASK)
    ap.add_argument("-o", "--output", help="directory to write (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--venv-only", action="store_true", help="just build (or find) the cached legacy venv")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.venv_only:
        print(ensure_venv())
    elif a.inside:
        _inside(a)
    elif not (a.arch and a.output):
        ap.error("give ARCH -o OUT (or --venv-only)")
    else:
        try:
            print(export(a.arch, a.output, task=a.task, seed=a.seed))
        except eo.ExportError as e:
            sys.exit(f"export_optimum_legacy: {e}")


if __name__ == "__main__":
    main()
