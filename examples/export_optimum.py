"""Export small random-weight Hugging Face models with `optimum-cli export onnx`, as most users make their files.

Why a separate venv: optimum-onnx 0.1.0 needs transformers<4.58 and the project's dev extra has transformers 5, so
optimum runs in its own venv, built once and cached (default ~/.cache/stip/optimum-venv, or $STIP_OPTIMUM_VENV).
This file has two halves: the driver (stdlib only, importable by tests) builds the venv and runs this same file
inside it (`--inside`), where a model is built from a small config with noise on every parameter, saved with a
tokenizer or image processor, and handed to optimum-cli.

    python examples/export_optimum.py bert text-classification -o out/bert-cls
    python examples/export_optimum.py --list
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# What pip resolves offline on these machines with these pins (torch 2.13.0 is a CPU wheel on local disk here;
# elsewhere an unpinned index may offer a multi-GB CUDA build of the same version).
REQUIREMENTS = ["torch==2.13.0", "transformers==4.57.6", "optimum-onnx==0.1.0", "optimum==2.1.0",
                "sentence-transformers==5.7.0", "onnxruntime==1.31.1", "pillow==13.0.0"]
TASKS = ["feature-extraction", "text-classification", "token-classification", "question-answering", "fill-mask",
         "image-classification", "text-generation", "text-generation-with-past", "sentence-similarity",
         "multiple-choice"]
# (arch, task) pairs the tests cover; sentence-transformers models are `st-bert feature-extraction`.
CASES = [("bert", "feature-extraction"), ("bert", "text-classification"), ("bert", "token-classification"),
         ("bert", "question-answering"), ("distilbert", "fill-mask"), ("roberta", "text-classification"),
         ("vit", "image-classification"), ("gpt2", "text-generation-with-past"),
         ("llama", "text-generation-with-past"), ("qwen2", "text-generation-with-past"),
         ("st-bert", "feature-extraction"), ("electra", "token-classification"), ("bert", "multiple-choice"),
         ("beit", "image-classification"), ("deit", "image-classification"), ("opt", "text-generation-with-past")]
ARCHS = ["bert", "distilbert", "roberta", "vit", "gpt2", "llama", "qwen2", "st-bert", "xlm-roberta", "mpnet",
         "deberta-v2", "albert", "electra", "deit", "beit", "swin", "mistral", "phi3", "gemma", "falcon", "opt",
         "gpt-neox", "gptj", "bloom", "gpt-bigcode", "codegen", "roformer", "mobilebert", "dinov2"]
IMAGE_ARCHS = ("vit", "deit", "beit", "swin", "dinov2")
STAMP = "stip-requirements.txt"


class ExportError(RuntimeError):
    """The optimum venv could not be built or optimum-cli failed; the message says which and shows its output."""


def venv_path() -> Path:
    return Path(os.environ.get("STIP_OPTIMUM_VENV") or Path.home() / ".cache" / "stip" / "optimum-venv")


def exports_root() -> Path:
    return Path(os.environ.get("STIP_OPTIMUM_EXPORTS") or Path.home() / ".cache" / "stip" / "optimum-exports")


@contextlib.contextmanager
def _locked(path: Path):
    """One builder at a time per path (parallel test sessions and helpers share the cache)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_venv(path: Path | None = None, log=print, requirements: list[str] | None = None) -> Path:
    """The venv's python, building the venv first unless it exists with exactly these requirements
    (`requirements`: another tool venv's pins, e.g. export_optimum_legacy.py's optimum 1.27)."""
    reqs = requirements or REQUIREMENTS
    path = Path(path or venv_path())
    python = path / "bin" / "python"
    want = "\n".join(reqs) + "\n"
    stamp = path / STAMP
    if stamp.exists() and stamp.read_text() == want and python.exists():
        return python
    with _locked(path):
        if stamp.exists() and stamp.read_text() == want and python.exists():
            return python
        t0 = time.time()
        if not python.exists():  # else: bring an existing venv to these pins (pip changes only what differs)
            shutil.rmtree(path, ignore_errors=True)
            log(f"building the optimum venv at {path} (once; about a minute from local wheels)")
            _run([sys.executable, "-m", "venv", str(path)], "create the optimum venv")
        _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *reqs],
             f"pip install {' '.join(reqs)} into {path} (needs the package index or local wheels)")
        stamp.write_text(want)  # written last: a half-built venv is rebuilt next time
        log(f"optimum venv ready in {time.time() - t0:.0f} s")
    return python


def _run(cmd: list[str], what: str, env: dict | None = None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise ExportError(f"cannot {what} (exit {r.returncode}):\n{tail}")
    return r.stdout + r.stderr


def run_inside(python: Path, script: str | Path, args: list[str], out: str | Path, what: str,
               after: list[str] | None = None) -> tuple[Path, str]:
    """`python script --inside ARGS -o OUT AFTER`, offline and quiet, as every export script here drives its venv;
    OUT is replaced first, and the run's log is kept as OUT/export.log. Returns (OUT resolved, the log)."""
    out = Path(out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    log = _run([str(python), str(Path(script).resolve()), "--inside", *args, "-o", str(out), *(after or [])],
               what, env)
    (out / "export.log").write_text(log)
    return out, log


def cached_dir(out: Path, done, make) -> Path:
    """OUT, made once by make(OUT.tmp) and renamed into place, then reused while done(OUT); parallel callers (test
    workers) wait for one export instead of racing."""
    if done(out):
        return out
    with _locked(out):
        if not done(out):
            tmp = out.with_name(out.name + ".tmp")
            make(tmp)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out


def export(arch: str, task: str, out: str | Path, *, seed: int = 0, venv: Path | None = None,
           extra: list[str] | None = None) -> Path:
    """Build the random-weight model and run optimum-cli in the venv; returns OUT/model.onnx.

    `extra`: more optimum-cli flags (e.g. ["--dtype", "fp16"]). OUT is replaced; OUT/hf holds the source model."""
    if arch not in ARCHS:
        raise ExportError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    python = ensure_venv(venv)
    out, log = run_inside(python, __file__, [arch, task], out, f"export {arch} {task} with optimum",
                          ["--seed", str(seed), "--", *(extra or [])])
    model = out / "model.onnx"
    if not model.exists():
        raise ExportError(f"optimum-cli wrote no {model}:\n{log[-2000:]}")
    return model


def cache_key(arch: str, task: str, seed: int = 0, extra: list[str] | None = None) -> str:
    """Changes whenever the model-building half of this file, the pins or the case changes, so a cached export
    is never stale (edits to the driver half keep the cache)."""
    text = Path(__file__).read_text()
    h = hashlib.sha256(text[text.index(INSIDE_MARK):].encode())
    h.update(repr((REQUIREMENTS, arch, task, seed, extra or [])).encode())
    return h.hexdigest()[:12]


def cached_export(arch: str, task: str, *, seed: int = 0, extra: list[str] | None = None,
                  root: Path | None = None) -> Path:
    """model.onnx of this case, exported once into the cache dir (keyed by content) and reused afterwards."""
    root = Path(root or exports_root())
    flags = "".join("-" + a.strip("-") for a in extra or [])
    out = root / f"{arch}-{task}{flags}-{cache_key(arch, task, seed, extra)}"

    def done(d: Path) -> bool:
        return (d / "model.onnx").exists() and (d / "export.log").exists()

    return cached_dir(out, done, lambda tmp: export(arch, task, tmp, seed=seed, extra=extra)) / "model.onnx"


INSIDE_MARK = "# " + "-" * 64 + " inside the optimum venv"
# ---------------------------------------------------------------- inside the optimum venv (torch, transformers)

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, private inference on permuted weights",
          "a man is eating food", "a girl is carrying a baby", "secret permutations folded into weights",
          "3 parties: the user, the cloud and the developer"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _config(arch: str, vocab: int):
    import transformers as tf

    if arch in ("bert", "st-bert"):
        return tf.BertConfig(vocab_size=vocab, max_position_embeddings=64, type_vocab_size=2, num_labels=3, **SMALL)
    if arch == "distilbert":
        return tf.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                   max_position_embeddings=64, num_labels=3)
    if arch == "roberta":
        return tf.RobertaConfig(vocab_size=vocab, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                                bos_token_id=0, eos_token_id=2, num_labels=3, **SMALL)
    if arch == "vit":
        return tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, num_labels=5, **SMALL)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                             bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(vocab_size=vocab, max_position_embeddings=64, num_key_value_heads=2,
                              bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, **SMALL)
    if arch == "qwen2":
        return tf.Qwen2Config(vocab_size=vocab, max_position_embeddings=64, num_key_value_heads=2,
                              bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, **SMALL)
    dec = dict(vocab_size=vocab, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    enc = dict(vocab_size=vocab, max_position_embeddings=64, num_labels=3, **SMALL)
    img = dict(image_size=32, patch_size=8, num_channels=3, num_labels=5)
    simple = {"xlm-roberta": lambda: tf.XLMRobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                                         **{**enc, "max_position_embeddings": 66}),
              "mpnet": lambda: tf.MPNetConfig(pad_token_id=1, **{**enc, "max_position_embeddings": 66}),
              "deberta-v2": lambda: tf.DebertaV2Config(**enc),
              "albert": lambda: tf.AlbertConfig(embedding_size=16, **enc),
              "electra": lambda: tf.ElectraConfig(embedding_size=16, **enc),
              "deit": lambda: tf.DeiTConfig(architectures=["DeiTForImageClassification"], **img, **SMALL),
              "beit": lambda: tf.BeitConfig(**img, **SMALL),
              "swin": lambda: tf.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                                            num_heads=[2, 4], window_size=4, num_labels=5),
              "mistral": lambda: tf.MistralConfig(num_key_value_heads=2, tie_word_embeddings=False, **dec, **SMALL),
              "phi3": lambda: tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False,
                                            **dec, **SMALL),
              "gemma": lambda: tf.GemmaConfig(num_key_value_heads=2, head_dim=8, pad_token_id=0, **dec, **SMALL),
              "falcon": lambda: tf.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, bos_token_id=0, eos_token_id=0),
              "opt": lambda: tf.OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                          num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=1),
              "gpt-neox": lambda: tf.GPTNeoXConfig(**dec, **SMALL),
              "gptj": lambda: tf.GPTJConfig(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                            rotary_dim=4, bos_token_id=0, eos_token_id=0),
              "bloom": lambda: tf.BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4,
                                              bos_token_id=0, eos_token_id=0),
              "gpt-bigcode": lambda: tf.GPTBigCodeConfig(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2,
                                                         n_head=4, bos_token_id=0, eos_token_id=0),
              "codegen": lambda: tf.CodeGenConfig(vocab_size=vocab, n_positions=64, n_ctx=64, n_embd=32, n_layer=2,
                                                  n_head=4, rotary_dim=4, bos_token_id=0, eos_token_id=0),
              "roformer": lambda: tf.RoFormerConfig(**enc),
              "mobilebert": lambda: tf.MobileBertConfig(embedding_size=16, intra_bottleneck_size=16,
                                                        true_hidden_size=16, **enc),
              "dinov2": lambda: tf.Dinov2Config(**img, **SMALL)}
    if arch in simple:
        return simple[arch]()
    raise ValueError(arch)


def _wordpiece(d: Path) -> int:
    """A BERT vocab.txt (special tokens, characters, continuation pieces, corpus words) and its tokenizer."""
    from transformers import BertTokenizerFast

    chars = sorted({c for line in CORPUS for c in line if not c.isspace()})
    words = sorted({w.strip(",:") for line in CORPUS for w in line.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{c}" for c in chars],
             *[w for w in words if w not in chars]]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    return len(vocab)


def _bpe(d: Path, arch: str) -> int:
    """A byte-level BPE trained here with `tokenizers` (as GPT-2, RoBERTa, Llama-3 and Qwen2 use)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if arch in ("roberta", "xlm-roberta") else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if arch in ("roberta", "xlm-roberta"):
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                       unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[0],
                                       unk_token=specials[0], pad_token=specials[0])
    fast.save_pretrained(d)
    return tok.get_vocab_size()


def _auto_class(arch: str, task: str):
    import transformers as tf

    by_task = {"feature-extraction": tf.AutoModel, "text-classification": tf.AutoModelForSequenceClassification,
               "token-classification": tf.AutoModelForTokenClassification,
               "question-answering": tf.AutoModelForQuestionAnswering, "fill-mask": tf.AutoModelForMaskedLM,
               "image-classification": tf.AutoModelForImageClassification,
               "text-generation": tf.AutoModelForCausalLM, "text-generation-with-past": tf.AutoModelForCausalLM,
               "multiple-choice": tf.AutoModelForMultipleChoice}
    if task not in by_task:
        raise SystemExit(f"unknown task {task!r}; expected one of {', '.join(by_task)}")
    return by_task[task]


def build_model(arch: str, task: str, d: Path, seed: int = 0) -> Path:
    """Save a random-weight model (noise on every parameter, norms and biases too) plus its preprocessor in d."""
    import torch

    d.mkdir(parents=True, exist_ok=True)
    if arch in IMAGE_ARCHS:
        from transformers import ViTImageProcessor

        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
        vocab = 0
    elif arch in ("bert", "distilbert", "st-bert", "electra", "mpnet", "roformer", "mobilebert"):
        vocab = _wordpiece(d)
    else:
        vocab = _bpe(d, arch)
    cfg = _config(arch, max(vocab, 128))
    if task == "question-answering":
        cfg.num_labels = 2  # start and end logits
    torch.manual_seed(seed)
    model = _auto_class(arch, "feature-extraction" if arch == "st-bert" else task).from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    model.save_pretrained(d)
    if arch == "st-bert":  # a sentence-transformers model: Transformer -> mean Pooling -> Normalize
        from sentence_transformers import SentenceTransformer, models

        st_dir = d.parent / (d.name + "-st")
        body = models.Transformer(str(d), max_seq_length=64)
        st = SentenceTransformer(modules=[body, models.Pooling(body.get_word_embedding_dimension(), "mean"),
                                          models.Normalize()], device="cpu")
        st.save(str(st_dir))
        return st_dir
    return d


def _inside(a: argparse.Namespace) -> None:
    out = Path(a.output)
    src = build_model(a.arch, a.task, out / "hf", a.seed)
    args = ["export", "onnx", "--model", str(src), "--task", a.task,
            *(["--library-name", "sentence_transformers"] if a.arch == "st-bert" else []), *a.extra, str(out)]
    print("optimum-cli " + " ".join(args), flush=True)
    from optimum.commands.optimum_cli import main as optimum_cli  # in this process: torch is imported once

    sys.argv = ["optimum-cli", *args]
    optimum_cli()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", nargs="?", choices=ARCHS)
    ap.add_argument("task", nargs="?", help=f"one of {', '.join(TASKS)}")
    ap.add_argument("-o", "--output", help="directory to write (replaced): model.onnx, config, tokenizer, hf/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="print the tested (arch, task) pairs")
    ap.add_argument("--venv-only", action="store_true", help="just build (or find) the cached optimum venv")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    a.extra = argv[cut + 1:]  # after --: more optimum-cli flags, e.g. -- --dtype fp16
    if a.list:
        print("\n".join(f"{arch} {task}" for arch, task in CASES))
    elif a.venv_only:
        print(ensure_venv())
    elif a.inside:
        _inside(a)
    elif not (a.arch and a.task and a.output):
        ap.error("give ARCH TASK -o OUT (or --list / --venv-only)")
    else:
        try:
            print(export(a.arch, a.task, a.output, seed=a.seed, extra=a.extra))
        except ExportError as e:
            sys.exit(f"export_optimum: {e}")


if __name__ == "__main__":
    main()
