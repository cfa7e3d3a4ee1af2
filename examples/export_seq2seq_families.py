"""Export small random-weight seq2seq models of further families (MarianMT, mBART, Pegasus, M2M100) as optimum's
encoder_model.onnx + decoder_model.onnx + decoder_with_past_model.onnx (+ merged), with the cached optimum venv.

Why its own file: export_multifile.py keys its cache on its own content, so adding families there would rebuild the
cached T5/BART exports; these families differ from BART in sinusoidal position tables (Marian, Pegasus, M2M100),
final_logits_bias (Marian, mBART, Pegasus), scaled embeddings and pre-LayerNorm blocks (mBART, Pegasus, M2M100).

    python examples/export_seq2seq_families.py marian -o out/marian
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_optimum import ExportError, cached_dir, ensure_venv, exports_root, run_inside  # noqa: E402

TASK = "text2text-generation-with-past"
CASES = ("marian", "mbart", "pegasus", "m2m100")


def export(case: str, out: str | Path, seed: int = 0) -> Path:
    """Build the random-weight model and run optimum-cli in the optimum venv; returns OUT (the files' directory)."""
    if case not in CASES:
        raise ExportError(f"unknown case {case!r}; expected one of {', '.join(CASES)}")
    out, log = run_inside(ensure_venv(), __file__, [case], out, f"export {case} with optimum", ["--seed", str(seed)])
    if not list(out.glob("*.onnx")):
        raise ExportError(f"optimum-cli wrote no .onnx file in {out}:\n{log[-2000:]}")
    return out


def cached_export(case: str, seed: int = 0) -> Path:
    """The export directory of this case, made once and reused (keyed by this file's content and the case)."""
    key = hashlib.sha256(Path(__file__).read_bytes() + repr((case, seed)).encode()).hexdigest()[:12]
    out = exports_root() / f"seq2seq-{case}-{key}"
    return cached_dir(out, lambda d: (d / "export.log").exists() and bool(list(d.glob("*.onnx"))),
                      lambda tmp: export(case, tmp, seed))


# ---------------------------------------------------------------- inside the optimum venv (torch, transformers)

def build_model(case: str, d: Path, seed: int) -> None:
    import torch
    import transformers as tf
    from export_multifile import _tokenizer

    d.mkdir(parents=True, exist_ok=True)
    vocab = max(_tokenizer(d, ["<pad>", "</s>", "<unk>", "<s>"]), 128)
    common = dict(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  pad_token_id=0, eos_token_id=1, forced_eos_token_id=None)
    if case == "marian":  # sinusoidal positions, shared embeddings, final_logits_bias, post-LN, scaled embeddings
        model = tf.MarianMTModel(tf.MarianConfig(**common, decoder_start_token_id=0, decoder_vocab_size=vocab,
                                                 scale_embedding=True, share_encoder_decoder_embeddings=True))
    elif case == "mbart":  # learned positions (offset 2), layernorm_embedding, pre-LN, final layer norms
        model = tf.MBartForConditionalGeneration(tf.MBartConfig(**common, decoder_start_token_id=1,
                                                                scale_embedding=True))
    elif case == "pegasus":  # sinusoidal positions, pre-LN, final_logits_bias
        model = tf.PegasusForConditionalGeneration(tf.PegasusConfig(**common, decoder_start_token_id=0,
                                                                    scale_embedding=True))
    elif case == "m2m100":  # sinusoidal positions with padding offset, pre-LN, scaled embeddings
        model = tf.M2M100ForConditionalGeneration(tf.M2M100Config(**common, decoder_start_token_id=1,
                                                                  scale_embedding=True))
    else:
        raise SystemExit(f"unknown case {case!r}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
        for name, b in model.named_buffers():  # final_logits_bias is a buffer: randomize it too
            if name.endswith("final_logits_bias"):
                b.add_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.5)
    model.save_pretrained(d)


def _inside(a: argparse.Namespace) -> None:
    out = Path(a.output)
    build_model(a.case, out / "hf", a.seed)
    args = ["export", "onnx", "--model", str(out / "hf"), "--task", TASK, str(out)]
    print("optimum-cli " + " ".join(args), flush=True)
    from optimum.commands.optimum_cli import main as optimum_cli

    sys.argv = ["optimum-cli", *args]
    optimum_cli()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("-o", "--output")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inside:
        _inside(a)
    elif not a.output:
        ap.error("give -o OUT")
    else:
        try:
            print(export(a.case, a.output, a.seed))
        except ExportError as e:
            sys.exit(f"export_seq2seq_families: {e}")


if __name__ == "__main__":
    main()
