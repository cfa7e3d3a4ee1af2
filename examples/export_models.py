"""Export small Hugging Face Transformers to ONNX the way users do (both torch exporters).

Why: every test and example needs real exporter output, not hand-built graphs. Weights are random and
every parameter gets noise, since default init (gamma=1, beta=0) hides missing permutations.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import torch


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Add noise to every parameter so a missed permutation changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


class _Plain(torch.nn.Module):
    """Return plain tensors instead of ModelOutput so both exporters name outputs predictably."""

    def __init__(self, model: torch.nn.Module, keys: list[str]):
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *args):
        names = self.input_names
        out = self.model(**dict(zip(names, args)))
        return tuple(out[k] for k in self.keys)


def export(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    outputs: list[str],
    path: str | Path,
    *,
    dynamo: bool,
    opset: int = 17,
    dynamic: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Export with dynamic axes under either exporter; output names follow `outputs`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Plain(model.eval(), outputs).eval()
    wrapper.input_names = list(inputs)
    args = tuple(inputs.values())
    dynamic = dynamic or {}
    if dynamo:
        dims: dict[str, torch.export.Dim] = {}
        shapes = []
        for name in inputs:
            spec = {}
            for axis, dim_name in dynamic.get(name, {}).items():
                dims.setdefault(dim_name, torch.export.Dim.DYNAMIC)
                spec[axis] = dims[dim_name]
            shapes.append(spec or None)
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=list(inputs),
            output_names=outputs,
            dynamic_shapes=(tuple(shapes),),
            external_data=False,
        )
    else:
        axes = {k: v for k, v in dynamic.items()}
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(inputs),
            output_names=outputs,
            dynamic_axes=axes,
        )
    return path


def tiny_bert_config(**kw):
    from transformers import BertConfig

    base = dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, num_labels=3,
    )
    base.update(kw)
    return BertConfig(**base)


def export_bert(path, *, dynamo: bool, opset: int = 17, classifier: bool = False, seed: int = 0, config=None):
    """BertModel (last_hidden_state, pooler_output) or BertForSequenceClassification (logits)."""
    from transformers import BertForSequenceClassification, BertModel

    cfg = config or tiny_bert_config()
    torch.manual_seed(seed)
    cls = BertForSequenceClassification if classifier else BertModel
    model = randomize_(cls(cfg), seed=seed)
    b, s = 2, 8
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(0, cfg.vocab_size, (b, s), generator=g),
        "attention_mask": torch.ones(b, s, dtype=torch.int64),
        "token_type_ids": torch.randint(0, cfg.type_vocab_size, (b, s), generator=g),
    }
    dyn = {k: {0: "batch", 1: "sequence"} for k in inputs}
    outputs = ["logits"] if classifier else ["last_hidden_state", "pooler_output"]
    return export(model, inputs, outputs, path, dynamo=dynamo, opset=opset, dynamic=dyn)


def tiny_vit_config(**kw):
    from transformers import ViTConfig

    base = dict(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=5,
    )
    base.update(kw)
    return ViTConfig(**base)


def export_vit(path, *, dynamo: bool, opset: int = 17, seed: int = 0, config=None):
    """ViTForImageClassification with a dynamic batch axis (image size is fixed by the position table)."""
    from transformers import ViTForImageClassification

    cfg = config or tiny_vit_config()
    torch.manual_seed(seed)
    model = randomize_(ViTForImageClassification(cfg), seed=seed)
    inputs = {"pixel_values": torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size)}
    return export(model, inputs, ["logits"], path, dynamo=dynamo, opset=opset,
                  dynamic={"pixel_values": {0: "batch"}})


def export_encoder(path, family: str, *, dynamo: bool, opset: int = 17, seed: int = 0):
    """Other encoders built from the same op vocabulary (no stip code is specific to any of them)."""
    import transformers as tf

    small = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64)
    if family == "roberta":
        cfg, cls = tf.RobertaConfig(**small, type_vocab_size=1, pad_token_id=1), tf.RobertaModel
    elif family == "electra":
        cfg, cls = tf.ElectraConfig(**small, embedding_size=16), tf.ElectraModel
    elif family == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                  max_position_embeddings=64)
        cls = tf.DistilBertModel
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = randomize_(cls(cfg), seed=seed)
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(2, cfg.vocab_size, (2, 8), generator=g),
        "attention_mask": torch.ones(2, 8, dtype=torch.int64),
    }
    dyn = {k: {0: "batch", 1: "sequence"} for k in inputs}
    return export(model, inputs, ["last_hidden_state"], path, dynamo=dynamo, opset=opset, dynamic=dyn)


class _CausalLM(torch.nn.Module):
    """Decoder as a function of flat tensors: exporters can neither take nor return a transformers Cache object.

    With `n_cache` layers, `past_key_values.{i}.key/value` kwargs become a DynamicCache and the grown cache comes
    back as `present.{i}.key/value`; with 0, the cache is switched off so no present computation is traced.
    """

    def __init__(self, model: torch.nn.Module, n_cache: int = 0):
        super().__init__()
        self.model = model
        self.n_cache = n_cache

    def forward(self, **kw):
        from transformers import DynamicCache

        if not self.n_cache:
            return {"logits": self.model(**kw, use_cache=False).logits}
        past = [(kw.pop(f"past_key_values.{i}.key"), kw.pop(f"past_key_values.{i}.value")) for i in range(self.n_cache)]
        cache = DynamicCache(ddp_cache_data=past, config=self.model.config)
        # transformers 5.2x renamed past_key_values -> cache; earlier 5.x (e.g. 5.17) still takes past_key_values
        arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        out = self.model(**kw, **{arg: cache}, use_cache=True)
        grown = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        res = {"logits": out.logits}
        for i, layer in enumerate(grown.layers):
            res[f"present.{i}.key"], res[f"present.{i}.value"] = layer.keys, layer.values
        return res


def _export_causal_lm(model, path, *, dynamo: bool, opset: int, cache: bool, seed: int,
                      kv_heads: int, head_dim: int, position_ids: bool) -> Path:
    """Shared decoder export: sample inputs, dynamic axes and names for both exporters.

    Sample sizes avoid 0/1 and coincidences (batch 2, sequence 4, past 6) so torch.export keeps every dim symbolic.
    The mask spans past + current tokens; under dynamo that is a separate dim since two dims cannot be added.
    """
    if dynamo and opset < 17:
        raise ValueError("dynamo decoder export supports opset 17 or 18+; use dynamo=False for older opsets")
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    b, s, p = 2, 4, 6 if cache else 0
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(0, cfg.vocab_size, (b, s), generator=g),
        "attention_mask": torch.ones(b, p + s, dtype=torch.int64),
    }
    dyn = {"input_ids": {0: "batch", 1: "sequence"},
           "attention_mask": {0: "batch", 1: "total_sequence" if cache else "sequence"}}
    if position_ids:
        inputs["position_ids"] = torch.arange(p, p + s).expand(b, s).contiguous()
        dyn["position_ids"] = {0: "batch", 1: "sequence"}
    outputs = ["logits"]
    dyn["logits"] = {0: "batch", 1: "sequence"}  # output names: TorchScript takes them, dynamo ones are set after
    for i in range(n_layers if cache else 0):
        for kind in ("key", "value"):
            name = f"past_key_values.{i}.{kind}"
            inputs[name] = torch.randn(b, kv_heads, p, head_dim, generator=g)
            dyn[name] = {0: "batch", 2: "past_sequence"}
            outputs.append(f"present.{i}.{kind}")
            dyn[outputs[-1]] = {0: "batch", 2: "total_sequence"}
    wrapper = _CausalLM(model.eval(), n_layers if cache else 0)
    # dynamo has no opset-17 translations: ask for 18 and convert the optimised graph ourselves (see _to_opset17)
    path = export(wrapper, inputs, outputs, path, dynamo=dynamo, opset=max(opset, 18) if dynamo else opset,
                  dynamic=dyn)
    if dynamo:
        _tidy_dynamo(path, opset, dyn)
    return path


def _tidy_dynamo(path: Path, opset: int, dynamic: dict[str, dict[int, str]]) -> None:
    """Post-process a dynamo decoder export: requested opset, and the declared dim names."""
    import onnx

    model = onnx.load(str(path))
    _name_dims(model.graph, dynamic)
    if opset == 17:
        _to_opset17(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _name_dims(graph, dynamic: dict[str, dict[int, str]]) -> None:
    """Replace torch.export's symbols (s21, s50 + s57) with the declared names, as TorchScript exports have them.

    torch.export gives each input's dims their own symbol unless it proves them equal (the mask's batch and the
    past lengths of values stay separate), so the KV interface would otherwise read differently per exporter.
    Declared output dims are set outright: a present's `past + sequence` is the next step's `total_sequence`.
    """
    import re

    rename: dict[str, str] = {}
    for vi in graph.input:
        dims = vi.type.tensor_type.shape.dim
        for axis, name in dynamic.get(vi.name, {}).items():
            if dims[axis].dim_param:
                rename.setdefault(dims[axis].dim_param, name)
    symbol = re.compile(r"\bs\d+\b")
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = symbol.sub(lambda m: rename.get(m.group(), m.group()), d.dim_param)
    for vi in graph.output:
        for axis, name in dynamic.get(vi.name, {}).items():
            vi.type.tensor_type.shape.dim[axis].dim_param = name


def _to_opset17(model) -> None:
    """Rewrite a dynamo export, which torch.onnx builds at opset 18, as a valid opset-17 model.

    torch.onnx's own down-conversion runs before its optimiser and fails both ways here: ReduceMean's axes (an input
    since 18) are not constants yet, so Llama stays at 18 after a logged traceback; GPT-2 converts, but the optimiser
    then fuses the QKV slices into a Split with `num_outputs` (18-only) and onnxruntime rejects the file. onnx's C
    converter has no Split 18->17 adapter and drops node metadata. The only 18->17 changes these graphs use are
    rewritten here in place (metadata and names kept); onnx's checker refuses anything else.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for n in g.node:
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "Split":  # without a `split` input, opset 17 splits evenly too (uneven fails loudly)
            if "num_outputs" in attrs:
                n.attribute.remove(attrs["num_outputs"])
        elif n.op_type.startswith("Reduce") and n.op_type != "ReduceSum":  # ReduceSum moved at 13 already
            axes = []
            if len(n.input) > 1 and n.input[1]:
                if n.input[1] not in inits:
                    raise ValueError(f"{n.name}: {n.op_type} axes are not an initializer")
                axes = numpy_helper.to_array(inits[n.input[1]]).reshape(-1).tolist()
                n.attribute.append(helper.make_attribute("axes", axes))
                del n.input[1:]
            if "noop_with_empty_axes" in attrs:
                if attrs["noop_with_empty_axes"].i and not axes:
                    raise ValueError(f"{n.name}: empty-axes no-op {n.op_type} has no opset-17 form")
                n.attribute.remove(attrs["noop_with_empty_axes"])
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 17
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for t in [t for t in g.initializer if t.name not in used]:  # axes now live in attributes
        g.initializer.remove(t)


def tiny_gpt2_config(**kw):
    """Two-layer GPT-2 (d=32, 4 heads, fused QKV, tied LM head); keyword arguments override."""
    from transformers import GPT2Config

    base = dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64)
    base.update(kw)
    # GPT-2's <|endoftext|> is its last token; the default 50256 lies outside a tiny vocabulary
    base.setdefault("bos_token_id", base["vocab_size"] - 1)
    base.setdefault("eos_token_id", base["vocab_size"] - 1)
    return GPT2Config(**base)


def export_gpt2(path, *, dynamo: bool, opset: int = 17, cache: bool = False, seed: int = 0, config=None):
    """GPT2LMHeadModel (logits, plus present.{i}.key/value with `cache`); positions come from the past length.

    The LM head stays tied to wte as transformers builds it, since that is how real GPT-2 checkpoints export.
    Under dynamo, onnxscript constant-folds the head's Transpose when the table has at most 8192 elements (the
    default 128x32), leaving two initializers; a vocab of 257+ keeps one shared by Gather and Transpose.
    """
    from transformers import GPT2LMHeadModel

    cfg = config or tiny_gpt2_config()
    torch.manual_seed(seed)
    model = randomize_(GPT2LMHeadModel(cfg), seed=seed)
    return _export_causal_lm(model, path, dynamo=dynamo, opset=opset, cache=cache, seed=seed,
                             kv_heads=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head, position_ids=False)


def tiny_llama_config(**kw):
    """Two-layer Llama with GQA (4 query heads over 2 KV heads, head_dim 8) and an untied LM head."""
    from transformers import LlamaConfig

    base = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


def export_llama(path, *, dynamo: bool, opset: int = 17, cache: bool = False, seed: int = 0, config=None):
    """LlamaForCausalLM with grouped-query attention; position_ids is an input and RoPE is computed in-graph.

    cos/sin come from the inv_freq buffer at run time (as transformers does), so position handling stays visible
    in the graph instead of being a precomputed table.
    """
    from transformers import LlamaForCausalLM

    cfg = config or tiny_llama_config()
    torch.manual_seed(seed)
    model = randomize_(LlamaForCausalLM(cfg), seed=seed)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return _export_causal_lm(model, path, dynamo=dynamo, opset=opset, cache=cache, seed=seed,
                             kv_heads=cfg.num_key_value_heads, head_dim=head_dim, position_ids=True)


def export_llama_like(path, family: str, *, dynamo: bool, opset: int = 17, cache: bool = True, seed: int = 0):
    """Other Llama-family decoders (Qwen2 q/k/v biases, Mistral, Phi-3 fused qkv and gate|up, Gemma GeGLU and
    scaled embeddings): stip has no code specific to any of them."""
    import transformers as tf

    small = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg, cls = {
        "qwen2": (lambda: tf.Qwen2Config(**small), tf.Qwen2ForCausalLM),
        "mistral": (lambda: tf.MistralConfig(**small), tf.MistralForCausalLM),
        "phi3": (lambda: tf.Phi3Config(**small, pad_token_id=0), tf.Phi3ForCausalLM),
        "gemma": (lambda: tf.GemmaConfig(**small, head_dim=8), tf.GemmaForCausalLM),
    }[family]
    config = cfg()
    torch.manual_seed(seed)
    model = randomize_(cls(config), seed=seed)
    return _export_causal_lm(model, path, dynamo=dynamo, opset=opset, cache=cache, seed=seed,
                             kv_heads=config.num_key_value_heads,
                             head_dim=config.hidden_size // config.num_attention_heads, position_ids=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("family", choices=["bert", "bert-cls", "vit", "gpt2", "gpt2-cache", "llama", "llama-cache"])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--dynamo", action="store_true", help="use torch.onnx.export(dynamo=True)")
    ap.add_argument("--opset", type=int, default=17)
    a = ap.parse_args()
    if a.family == "vit":
        export_vit(a.output, dynamo=a.dynamo, opset=a.opset)
    elif a.family.startswith(("gpt2", "llama")):
        fn = export_gpt2 if a.family.startswith("gpt2") else export_llama
        fn(a.output, dynamo=a.dynamo, opset=a.opset, cache=a.family.endswith("-cache"))
    else:
        export_bert(a.output, dynamo=a.dynamo, opset=a.opset, classifier=a.family == "bert-cls")
    print(a.output)


if __name__ == "__main__":
    main()
