"""Export small random-weight models that optimum writes as several ONNX files (seq2seq T5/BART, a legacy GPT-2
decoder pair), with the cached optimum venv of export_optimum.py.

Why its own file: export_optimum.py keys its export cache on its model-building half, so adding architectures
there would invalidate every cached export; this file has its own cache entries.

    python examples/export_multifile.py t5 -o out/t5    # encoder_model, decoder_model, decoder_with_past_model
    python examples/export_multifile.py bart -o out/bart
    python examples/export_multifile.py marian -o out/marian    # also mbart, pegasus, m2m100

optimum 2.1 writes no legacy decoder pair (text-generation-with-past gives one model.onnx even with
--no-post-process); examples/export_optimum_legacy.py (optimum 1.27 --legacy) writes those.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_optimum import ExportError, cached_dir, ensure_venv, exports_root, run_inside  # noqa: E402

SEQ2SEQ = "text2text-generation-with-past"
# Further families, which differ from BART in sinusoidal position tables (Marian, Pegasus, M2M100), final_logits_bias
# (Marian, mBART, Pegasus), scaled embeddings and pre-LayerNorm blocks (mBART, Pegasus, M2M100).
FAMILIES = ("marian", "mbart", "pegasus", "m2m100")
CASES = {"t5": (SEQ2SEQ, []), "bart": (SEQ2SEQ, []), **{f: (SEQ2SEQ, []) for f in FAMILIES}}  # (task, extra flags)


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
    out = exports_root() / f"multifile-{case}-{key}"
    return cached_dir(out, lambda d: (d / "export.log").exists() and bool(list(d.glob("*.onnx"))),
                      lambda tmp: export(case, tmp, seed))


# ---------------------------------------------------------------- inside the optimum venv (torch, transformers)

def _tokenizer(d: Path, specials: list[str]) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the quick brown fox jumps over the lazy dog", "translate english to german: hello world",
              "secret permutations folded into weights", "a man is eating food"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    names = dict(zip(["pad_token", "eos_token", "unk_token", "bos_token"], specials))
    PreTrainedTokenizerFast(tokenizer_object=tok, **names).save_pretrained(d)
    return tok.get_vocab_size()


def build_model(case: str, d: Path, seed: int) -> None:
    import torch
    import transformers as tf

    d.mkdir(parents=True, exist_ok=True)
    vocab = max(_tokenizer(d, ["<pad>", "</s>", "<unk>", "<s>"]), 128)
    if case == "t5":
        cfg = tf.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = tf.T5ForConditionalGeneration(cfg)
    elif case == "bart":
        cfg = tf.BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                            bos_token_id=3, decoder_start_token_id=1, forced_eos_token_id=None)
        model = tf.BartForConditionalGeneration(cfg)
    elif case in FAMILIES:
        model = _family(case, vocab)
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


def _family(case: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  pad_token_id=0, eos_token_id=1, forced_eos_token_id=None)
    if case == "marian":  # sinusoidal positions, shared embeddings, final_logits_bias, post-LN, scaled embeddings
        return tf.MarianMTModel(tf.MarianConfig(**common, decoder_start_token_id=0, decoder_vocab_size=vocab,
                                                scale_embedding=True, share_encoder_decoder_embeddings=True))
    if case == "mbart":  # learned positions (offset 2), layernorm_embedding, pre-LN, final layer norms
        return tf.MBartForConditionalGeneration(tf.MBartConfig(**common, decoder_start_token_id=1,
                                                               scale_embedding=True))
    if case == "pegasus":  # sinusoidal positions, pre-LN, final_logits_bias
        return tf.PegasusForConditionalGeneration(tf.PegasusConfig(**common, decoder_start_token_id=0,
                                                                   scale_embedding=True))
    # m2m100: sinusoidal positions with padding offset, pre-LN, scaled embeddings
    return tf.M2M100ForConditionalGeneration(tf.M2M100Config(**common, decoder_start_token_id=1,
                                                             scale_embedding=True))


def _inside(a: argparse.Namespace) -> None:
    out = Path(a.output)
    build_model(a.case, out / "hf", a.seed)
    task, extra = CASES[a.case]
    args = ["export", "onnx", "--model", str(out / "hf"), "--task", task, *extra, str(out)]
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
            sys.exit(f"export_multifile: {e}")


if __name__ == "__main__":
    main()
