"""Shared fixtures: real exporter output from small randomized transformers configs, exported once per session."""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import export_models  # noqa: E402
import export_optimum  # noqa: E402
import export_optimum_legacy  # noqa: E402

warnings.filterwarnings("ignore")


class ModelZoo:
    """Exports on first use and caches by (family, exporter, opset)."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[tuple, Path] = {}

    def get(self, family: str, dynamo: bool = False, opset: int = 17) -> Path:
        key = (family, dynamo, opset)
        if key not in self.cache:
            path = self.root / f"{family}-{'dynamo' if dynamo else 'ts'}-op{opset}.onnx"
            EXPORTERS[family](path, dynamo=dynamo, opset=opset)
            self.cache[key] = path
        return self.cache[key]


EXPORTERS = {
    "bert": lambda p, **kw: export_models.export_bert(p, **kw),
    "bert-cls": lambda p, **kw: export_models.export_bert(p, classifier=True, **kw),
    "vit": lambda p, **kw: export_models.export_vit(p, **kw),
    "roberta": lambda p, **kw: export_models.export_encoder(p, "roberta", **kw),
    "distilbert": lambda p, **kw: export_models.export_encoder(p, "distilbert", **kw),
    "electra": lambda p, **kw: export_models.export_encoder(p, "electra", **kw),
    "gpt2": lambda p, **kw: export_models.export_gpt2(p, **kw),
    "gpt2-cache": lambda p, **kw: export_models.export_gpt2(p, cache=True, **kw),
    "gpt2-cache-tied": lambda p, **kw: export_models.export_gpt2(
        p, cache=True, config=export_models.tiny_gpt2_config(vocab_size=257), **kw),
    "llama": lambda p, **kw: export_models.export_llama(p, **kw),
    "llama-cache": lambda p, **kw: export_models.export_llama(p, cache=True, **kw),
    **{f"{fam}-cache": functools.partial(export_models.export_llama_like, family=fam)
       for fam in ("qwen2", "mistral", "phi3", "gemma")},
}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> ModelZoo:
    return ModelZoo(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def bert_bundle(zoo, tmp_path_factory):
    """One compiled BertModel shared by the read-only tests (hygiene, inspect)."""
    from stip.compiler.pipeline import compile_model

    model = zoo.get("bert")
    out = tmp_path_factory.mktemp("bundles") / "bert"
    compile_model(model, out)
    return model, out


def _fails_loudly(ensure_venv, what: str, export):
    """export(...) behind a venv built once per session (without an index it fails fast after the first try); a
    venv or an export that cannot be made fails the test, never skips it."""
    venv: list[str | None] = []

    def get(*args, **kw) -> Path:
        if not venv:
            try:
                ensure_venv()
                venv.append(None)
            except export_optimum.ExportError as e:
                venv.append(str(e))
        if venv[0]:
            pytest.fail(f"the {what} venv could not be built: {venv[0]}", pytrace=False)
        try:
            return export(*args, **kw)
        except export_optimum.ExportError as e:
            pytest.fail(f"{what} export of {' '.join(map(str, args))} failed: {e}", pytrace=False)

    return get


@pytest.fixture(scope="session")
def optimum_model():
    """`get(arch, task)`: model.onnx exported by optimum-cli in its own venv. Both the venv and the exports are
    cached on disk by content (~/.cache/stip, see examples/export_optimum.py), so later runs reuse them. A venv
    that cannot be built fails the tests loudly: they are part of the suite, never silently skipped."""
    return _fails_loudly(export_optimum.ensure_venv, "optimum",
                         lambda arch, task, extra=None: export_optimum.cached_export(arch, task, extra=extra))


@pytest.fixture(scope="session")
def optimum_legacy():
    """`get(arch, task="text-generation-with-past")`: the directory of an optimum 1.27 `--legacy` export
    (decoder_model.onnx, decoder_with_past_model.onnx, decoder_model_merged.onnx, config and tokenizer), made in
    its own cached venv (examples/export_optimum_legacy.py) and cached on disk by content. Fails loudly, like
    optimum_model, when the venv cannot be built."""
    return _fails_loudly(export_optimum_legacy.ensure_venv, "optimum 1.27 --legacy",
                         lambda arch, task=export_optimum_legacy.TASK: export_optimum_legacy.cached_export(arch, task))
