"""Export small Hugging Face Transformers to ONNX the way users do (both torch exporters).

Why: every test and example needs real exporter output, not hand-built graphs. Weights are random and
every parameter gets noise, since default init (gamma=1, beta=0) hides missing permutations.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("family", choices=["bert", "bert-cls", "vit"])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--dynamo", action="store_true", help="use torch.onnx.export(dynamo=True)")
    ap.add_argument("--opset", type=int, default=17)
    a = ap.parse_args()
    if a.family == "vit":
        export_vit(a.output, dynamo=a.dynamo, opset=a.opset)
    else:
        export_bert(a.output, dynamo=a.dynamo, opset=a.opset, classifier=a.family == "bert-cls")
    print(a.output)


if __name__ == "__main__":
    main()
