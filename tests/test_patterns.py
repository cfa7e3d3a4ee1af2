"""Graph patterns seen in real exported files (optimum, sentence-transformers, third-party uploads): each one
compiles exactly, on small real exports of the same code (both torch exporters) or on the hand-built graph that
reproduces it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from graphs import embed_then, ints, model, save, weight
from helpers import assert_equivalent, compile_in_memory, run_model, run_three
from onnx import TensorProto, helper

from stip.passes.graph import load_graph
from stip.passes.solve import solve

IDS = {"ids": np.random.default_rng(1).integers(0, 32, (3, 7))}


def export(module: torch.nn.Module, path, dynamo: bool, inputs: dict, outputs: list[str], dyn: dict,
           opset: int = 17):
    """A tiny module with every parameter random (biases and norms too), exported like a user would."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    module.eval()
    names = list(inputs)
    if dynamo:
        dims: dict = {}
        shapes = [{a: dims.setdefault(d, torch.export.Dim.DYNAMIC) for a, d in dyn.get(n, {}).items()} or None
                  for n in names]
        torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=True, opset_version=18,
                          input_names=names, output_names=outputs, dynamic_shapes=tuple(shapes),
                          external_data=False)
    else:
        torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=False, opset_version=opset,
                          input_names=names, output_names=outputs, dynamic_axes=dyn)
    return path


def exact(path, feeds, **kw):
    g, sol, part, perms, bundle = compile_in_memory(path, **kw)
    assert sol.blockers == [], [str(b) for b in sol.blockers]
    assert_equivalent(run_model(path, feeds), run_three(bundle, feeds), atol=1e-4, rtol=1e-4)
    return g, sol, part, bundle


def permuted(sol, g, tensor, axis) -> bool:
    return sol.classes(tensor, len(g.shapes[tensor]))[axis] is not None


class Attention(torch.nn.Module):
    """Heads split with sizes read from the graph: x.view(x.size(0), x.size(1), heads, -1)."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.emb = torch.nn.Embedding(32, d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.heads = heads

    def forward(self, ids):
        x = self.emb(ids)
        b, t = x.size(0), x.size(1)
        q = self.q(x).view(b, t, self.heads, 4).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.v(x).view(x.shape[0], -1, self.heads, 4).transpose(1, 2)
        y = (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2).reshape(b, t, -1)
        return self.o(y)


class _Crash:
    @staticmethod
    def infer_shapes(*_a, **_k):
        raise TypeError("unsupported operand type(s) for *: 'NoneType' and 'int'")


@pytest.mark.parametrize("dynamo", [False, True])
def test_runtime_reshape_target_when_symbolic_inference_crashes(tmp_path, monkeypatch, dynamo):
    """ONNX's own shape inference (the fallback) loses the -1 dims of `view(b, t, h, -1)`; the Reshape rule
    recovers them from the shape value built by Shape/Gather/Concat, and the crash is reported."""
    import stip.passes.graph as graph

    path = export(Attention(), tmp_path / "m.onnx", dynamo, {"ids": torch.randint(0, 32, (2, 5))}, ["y"],
                  {"ids": {0: "B", 1: "S"}})
    monkeypatch.setattr(graph, "_symbolic_shape_inference", lambda: _Crash)
    g = load_graph(path)
    assert any("symbolic shape inference failed" in w and "TypeError" in w for w in g.warnings), g.warnings
    assert any(isinstance(d, str) and d.startswith("unk") for n in g.model.graph.node if n.op_type == "Reshape"
               for d in g.shapes[n.output[0]])  # the pattern: inference left the target unknown
    g, sol, part, _ = exact(path, IDS)
    assert len(sol.permuted) >= 4  # hidden, heads, and two head_dim spaces


def test_reshape_zero_and_minus_one_and_allowzero():
    from stip.passes.rules import reshape_target

    sym = np.empty(4, dtype=object)
    sym[:] = [0, (1, ("S",)), 4, -1]
    assert reshape_target(sym, ["B", "S", 16], 0) == [(1, ("B",)), (1, ("S",)), 4, 4]
    sym[:] = [0, 0, 4, 4]
    assert reshape_target(sym, ["B", "S", 16], 0) == [(1, ("B",)), (1, ("S",)), 4, 4]
    assert reshape_target(sym, ["B", "S", 16], 1) == [0, 0, 4, 4]  # allowzero: 0 is a size, not a copy
    sym[:] = [None, -1, 4, 4]
    assert reshape_target(sym, ["B", "S", 16], 0) is None  # two unknowns


def test_runtime_slice_bounds_pin_only_the_sliced_axis(tmp_path):
    """h[:, :S-1, :] with S read from the graph: the sequence axis is positional, the features stay permuted."""
    nodes = [helper.make_node("MatMul", ["h", "w"], ["m"]),
             helper.make_node("Shape", ["ids"], ["shp"]),
             helper.make_node("Gather", ["shp", "one"], ["s"], axis=0),
             helper.make_node("Sub", ["s", "one"], ["end"]),
             helper.make_node("Unsqueeze", ["end", "zeros"], ["ends"]),
             helper.make_node("Slice", ["m", "zeros", "ends", "ones"], ["y"])]
    inits = [weight("w", 8, 6), onnx.numpy_helper.from_array(np.array(1, np.int64), "one"), ints("ones", [1]),
             ints("zeros", [0])]
    path = save(embed_then(nodes, ["B", "S1", 6], inits), tmp_path / "m.onnx")
    g, sol, _, _ = exact(path, {"ids": IDS["ids"] % 16})
    assert permuted(sol, g, "y", 2) and permuted(sol, g, "m", 2)
    assert not permuted(sol, g, "y", 1)


class SliceLast(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, ids):
        h = self.lin(self.emb(ids))
        return h[:, 1: ids.shape[1] - 1]


@pytest.mark.parametrize("dynamo", [False, True])
def test_runtime_slice_real_export(tmp_path, dynamo):
    path = export(SliceLast(), tmp_path / "m.onnx", dynamo, {"ids": torch.randint(0, 32, (2, 5))}, ["y"],
                  {"ids": {0: "B", 1: "S"}})
    g, sol, _, _ = exact(path, IDS)
    assert permuted(sol, g, g.output_names[0], 2)


@pytest.mark.parametrize("echo", ["ids_out", "ids"])
def test_output_echoing_a_private_input_is_made_on_the_client(tmp_path, echo):
    """sentence-transformers returns Identity(input_ids) (or lists the input as an output): post defines it once,
    and the server never sees the ids."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 6]),
            helper.make_tensor_value_info(echo, TensorProto.INT64, ["B", "S"])]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    if echo != "ids":
        nodes.append(helper.make_node("Identity", ["ids"], [echo]))
    path = save(model(nodes, [ids], outs, [weight("table", 32, 8), weight("w", 8, 6)]), tmp_path / "m.onnx")
    g, sol, part, bundle = exact(path, IDS)
    server_io = [i.name for i in bundle.server.graph.input] + [o.name for o in bundle.server.graph.output]
    assert not any(n.startswith("ids") for n in server_io), server_io
    assert [o.name for o in bundle.post.graph.output] == ["y", echo]


class QAHead(torch.nn.Module):
    """optimum's question-answering head: one Linear with 2 outputs, then Split into start/end and Squeeze."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.lin = torch.nn.Linear(16, 16)
        self.qa = torch.nn.Linear(16, 2)

    def forward(self, ids):
        start, end = self.qa(torch.relu(self.lin(self.emb(ids)))).split(1, dim=-1)
        return start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()


@pytest.mark.parametrize("dynamo", [False, True])
def test_question_answering_split_head(tmp_path, dynamo):
    path = export(QAHead(), tmp_path / "m.onnx", dynamo, {"ids": torch.randint(0, 32, (2, 5))},
                  ["start_logits", "end_logits"], {"ids": {0: "B", 1: "S"}})
    g, sol, _, _ = exact(path, IDS)
    assert not any("parts unpermuted" in str(b) for b in sol.blockers)
    hidden = [t for t in g.shapes if len(g.shapes[t]) == 3 and g.shapes[t][2] == 16 and g.dtypes.get(t) == 1]
    assert hidden and all(permuted(sol, g, t, 2) for t in hidden)  # the hidden state stays protected


def test_hidden_split_into_single_columns_is_still_refused(tmp_path):
    """Only an axis no weight contracts over may stay in plaintext order: a hidden state split into columns that
    later weights read would expose features, so that remains a blocker."""
    nodes = [helper.make_node("Split", ["h", "sizes"], [f"c{i}" for i in range(8)], axis=2),
             helper.make_node("Concat", [f"c{i}" for i in range(8)][::-1], ["r"], axis=2),
             helper.make_node("MatMul", ["r", "w"], ["y"])]
    path = save(embed_then(nodes, ["B", "S", 4], [ints("sizes", [1] * 8), weight("w", 8, 4)]), tmp_path / "m.onnx")
    sol = solve(load_graph(path))
    assert sol.blockers and not any("parts unpermuted" in str(b) for b in sol.blockers)


class ArgMaxTail(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, ids):
        h = self.lin(self.emb(ids))
        return h.argmax(1), h


class SegmentationDecoder(torch.nn.Module):
    """A ViT-like backbone, then a ConvTranspose + bilinear Resize + Conv image decoder."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 16, 4, 4)
        self.norm = torch.nn.LayerNorm(16)
        self.lin = torch.nn.Linear(16, 16)
        self.up = torch.nn.ConvTranspose2d(16, 8, 2, 2)
        self.head = torch.nn.Conv2d(8, 3, 1)

    def forward(self, px):
        x = self.patch(px)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.lin(self.norm(t))
        x = self.up(t.transpose(1, 2).reshape(b, c, h, w))
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(torch.relu(x))


@pytest.mark.parametrize("dynamo", [False, True])
def test_ops_after_the_last_weight(tmp_path, dynamo):
    """ArgMax over the sequence; ConvTranspose and Resize keep image channels permuted (they commute)."""
    path = export(ArgMaxTail(), tmp_path / "a.onnx", dynamo, {"ids": torch.randint(0, 32, (2, 5))},
                  ["am", "h"], {"ids": {0: "B", 1: "S"}})
    exact(path, IDS)
    path = export(SegmentationDecoder(), tmp_path / "s.onnx", dynamo, {"px": torch.randn(2, 3, 8, 8)}, ["y"],
                  {"px": {0: "B"}})
    px = {"px": np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    g, sol, part, bundle = exact(path, px)
    ops = {g.model.graph.node[i].op_type for i in part.server_nodes}
    assert {"ConvTranspose", "Resize"} <= ops
    ct = next(n for n in g.model.graph.node if n.op_type == "ConvTranspose")
    assert permuted(sol, g, ct.input[0], 1) and permuted(sol, g, ct.output[0], 1)


class SharedLayers(torch.nn.Module):
    """ALBERT-style: one FFN applied N times, plus a head tied to the embedding."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 32)
        self.up = torch.nn.Linear(32, 128)
        self.down = torch.nn.Linear(128, 32)
        self.n = n

    def forward(self, ids):
        h = self.emb(ids)
        for _ in range(self.n):
            h = h + self.down(torch.relu(self.up(h)))
        return h @ self.emb.weight.T


def _init_bytes(m: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in m.graph.initializer)


@pytest.mark.parametrize("dynamo", [False, True])
def test_shared_weight_is_emitted_once_per_distinct_permutation(tmp_path, dynamo):
    path = export(SharedLayers(), tmp_path / "m.onnx", dynamo, {"ids": torch.randint(0, 64, (2, 5))}, ["y"],
                  {"ids": {0: "B", 1: "S"}})
    g, sol, part, bundle = exact(path, {"ids": IDS["ids"] * 2})
    original = _init_bytes(onnx.load(str(path)))
    server = _init_bytes(bundle.server)
    assert server <= 1.1 * original, (server, original)  # one copy of up/down, not one per layer
    names = [t.name.split(".p")[0] for t in bundle.server.graph.initializer if t.raw_data and len(t.raw_data) > 4096]
    assert len(names) == len(set(names)), names


def _tiny_decoder(family: str):
    from transformers import FalconConfig, FalconForCausalLM, OPTConfig, OPTForCausalLM

    if family == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    return FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))


@pytest.mark.parametrize("family", ["opt", "falcon"])
@pytest.mark.parametrize("dynamo", [False, True])
def test_decoder_masks_and_positions(tmp_path, family, dynamo):
    """OPT numbers positions as cumsum(attention_mask) * attention_mask - 1 into a learned table, and builds its
    causal mask from Shape(inputs_embeds): the mask is padding metadata (public), the token ids stay private.
    Falcon under dynamo reads RoPE's cos/sin and the padding mask with GatherND."""
    import export_models as em

    torch.manual_seed(0)
    m = em.randomize_(_tiny_decoder(family), scale=0.3)
    path = em._export_causal_lm(m, tmp_path / f"{family}.onnx", dynamo=dynamo, opset=17, cache=False, seed=0,
                                kv_heads=4, head_dim=8, position_ids=False)
    feeds = {"input_ids": np.random.default_rng(3).integers(0, 128, (2, 6)),
             "attention_mask": np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], np.int64)}
    g, sol, part, bundle = exact(path, feeds)
    assert part.private == ["input_ids"] and "attention_mask" in part.public
    assert "input_ids" not in {i.name for i in bundle.server.graph.input}


class LabelTail(torch.nn.Module):
    """Token classification exported with its post-processing: ArgMax and TopK over the labels, a masked
    softmax. They need the labels in plaintext order, so they run in post on un-permuted logits."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.lin = torch.nn.Linear(16, 16)
        self.cls = torch.nn.Linear(16, 5)

    def forward(self, ids, mask):
        logits = self.cls(torch.relu(self.lin(self.emb(ids))))
        probs = torch.softmax(logits, -1) * mask.unsqueeze(-1)
        return logits.argmax(-1), logits, probs.topk(2, dim=-1).values


@pytest.mark.parametrize("dynamo", [False, True])
def test_label_ops_after_the_last_weight_run_in_post(tmp_path, dynamo):
    path = export(LabelTail(), tmp_path / "m.onnx", dynamo, {"ids": torch.randint(0, 32, (2, 5)),
                                                             "mask": torch.ones(2, 5)},
                  ["pred", "logits", "top"], {"ids": {0: "B", 1: "S"}, "mask": {0: "B", 1: "S"}})
    feeds = {**IDS, "mask": np.random.default_rng(4).random((3, 7)).astype(np.float32)}
    g, sol, part, bundle = exact(path, feeds)
    post_ops = {n.op_type for n in bundle.post.graph.node}
    assert {"ArgMax", "TopK"} <= post_ops
    assert not {"ArgMax", "TopK"} & {n.op_type for n in bundle.server.graph.node}
    hidden = [t for t in part.crossing if g.dtypes.get(t) == TensorProto.FLOAT]
    assert hidden and all(permuted(sol, g, t, 2) for t in hidden)


class SentenceEncoder(torch.nn.Module):
    """sentence-transformers' export: per-head attention, mean pooling under the mask (Expand to the embeddings'
    size), L2 Normalize (a ReduceL2, whose axes are an input at opset 18), and the ids echoed as an output."""

    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, input_ids, attention_mask):
        tok = self.attn(input_ids)
        m = attention_mask.unsqueeze(-1).expand(tok.size()).float()
        pooled = (tok * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
        return tok, torch.nn.functional.normalize(pooled, p=2, dim=1), input_ids


def test_sentence_transformers_pattern_keeps_symbolic_shapes(tmp_path):
    """ORT's symbolic inference has no opset-18 ReduceL2; its Expand handler then crashed and every dim was lost.
    Now the shapes stay symbolic, no warning is needed, and the echoed ids are produced on the client."""
    args = {"input_ids": torch.randint(0, 32, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.int64)}
    path = export(SentenceEncoder(), tmp_path / "st.onnx", False, args,
                  ["token_embeddings", "sentence_embedding", "ids"], {n: {0: "B", 1: "S"} for n in args}, opset=18)
    g = load_graph(path)
    assert any(n.op_type == "ReduceL2" for n in g.model.graph.node)
    assert g.warnings == [] and g.shapes["sentence_embedding"] == ["B", 16], g.warnings
    feeds = {"input_ids": IDS["ids"], "attention_mask": np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 7])}
    g, sol, part, bundle = exact(path, feeds)
    assert "input_ids" not in {i.name for i in bundle.server.graph.input}
    assert not any(o.name.startswith("ids") for o in bundle.server.graph.output)


def test_a_crashing_shape_handler_is_reported_and_contained(tmp_path, monkeypatch, capsys):
    """A crash in one op handler of ORT's symbolic inference is named (node, exception) in the warnings that
    `inspect` and `compile` show; the compile stays exact on what inference could still recover."""
    import stip.passes.graph as graph

    def crash(self, node):
        raise TypeError("object of type 'NoneType' has no len()")

    monkeypatch.setattr(graph._symbolic_shape_inference(), "_infer_Expand", crash)
    args = {"input_ids": torch.randint(0, 32, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.int64)}
    path = export(SentenceEncoder(), tmp_path / "st.onnx", False, args,
                  ["token_embeddings", "sentence_embedding", "ids"], {n: {0: "B", 1: "S"} for n in args}, opset=18)
    g = load_graph(path)
    assert "crashed on Expand node" in g.warnings[0] and "TypeError" in g.warnings[0], g.warnings
    feeds = {"input_ids": IDS["ids"], "attention_mask": np.ones((3, 7), np.int64)}
    exact(path, feeds)
    from stip.compiler.cli import main

    for cmd in (["inspect", path], ["compile", path, "-o", tmp_path / "out", "-q"]):
        assert main([str(x) for x in cmd]) == 0
        captured = capsys.readouterr()
        assert "crashed on Expand node" in captured.out + captured.err, cmd


@pytest.mark.parametrize("dynamo", [False, True])
def test_albert_shared_layers_stay_one_copy(tmp_path, dynamo):
    """ALBERT applies one layer (attention heads included) N times: the server holds it once, not N times."""
    import export_models as em
    from transformers import AlbertConfig, AlbertModel

    cfg = AlbertConfig(vocab_size=128, embedding_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    m = em.randomize_(AlbertModel(cfg), scale=0.3)
    inputs = {"input_ids": torch.randint(0, 128, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.int64)}
    path = em.export(m, inputs, ["last_hidden_state"], tmp_path / "albert.onnx", dynamo=dynamo,
                     dynamic={k: {0: "B", 1: "S"} for k in inputs})
    feeds = {"input_ids": np.random.default_rng(5).integers(0, 128, (2, 6)),
             "attention_mask": np.array([[1] * 6, [1] * 4 + [0] * 2])}
    g, sol, part, bundle = exact(path, feeds)
    original, server = _init_bytes(onnx.load(str(path))), _init_bytes(bundle.server)
    assert server <= 1.1 * original, (server, original)


class ResizeToInput(torch.nn.Module):
    """A decoder that upsamples back to the input's (dynamic) size: Resize's sizes are built at run time."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 16, 4, 4)
        self.lin = torch.nn.Linear(16, 16)
        self.head = torch.nn.Conv2d(16, 3, 1)

    def forward(self, px):
        x = self.patch(px)
        b, c, h, w = x.shape
        x = self.lin(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        x = torch.nn.functional.interpolate(x, size=px.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.relu(x))


@pytest.mark.parametrize("dynamo", [False, True])
def test_resize_to_a_runtime_size_keeps_channels_permuted(tmp_path, dynamo):
    path = export(ResizeToInput(), tmp_path / "m.onnx", dynamo, {"px": torch.randn(2, 3, 8, 8)}, ["y"],
                  {"px": {0: "B", 2: "H", 3: "W"}})
    px = {"px": np.random.default_rng(6).standard_normal((3, 3, 12, 16)).astype(np.float32)}
    g, sol, part, bundle = exact(path, px)
    rs = next(n for n in g.model.graph.node if n.op_type == "Resize")
    assert permuted(sol, g, rs.output[0], 1) and not sol.post_tail


class Tiled(torch.nn.Module):
    """`.repeat` exports as Tile: a pooled [B, 1, D] summary tiled over the sequence (a size-1 axis: broadcast),
    then the whole sequence tiled twice (the sequence axis is positional; the features pass through)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.emb, self.lin, self.out = torch.nn.Embedding(32, d), torch.nn.Linear(d, d), torch.nn.Linear(d, 5)

    def forward(self, ids):
        h = self.lin(self.emb(ids))
        pooled = h.mean(1, keepdim=True).repeat(1, ids.shape[1], 1)
        return self.out(torch.relu(h + pooled).repeat(1, 2, 1))


@pytest.mark.parametrize("dynamo", [False, True])
def test_tile_keeps_features_permuted(tmp_path, dynamo):
    path = export(Tiled(), tmp_path / "m.onnx", dynamo, {"ids": torch.tensor(IDS["ids"])}, ["y"],
                  {"ids": {0: "B", 1: "S"}})
    g, sol, part, bundle = exact(path, IDS)
    tiles = [n for n in g.model.graph.node if n.op_type == "Tile"]
    assert tiles and all(permuted(sol, g, n.output[0], 2) for n in tiles)


class Trigram(torch.nn.Module):
    """MobileBERT's trigram input: each token's embedding beside its neighbours', shifted in with F.pad along
    the sequence (TorchScript computes the pads with Concat/Reshape/Slice/Transpose/Cast from constants)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.emb, self.lin, self.out = torch.nn.Embedding(32, d), torch.nn.Linear(3 * d, 16), torch.nn.Linear(16, 5)

    def forward(self, ids):
        e = self.emb(ids)
        nxt = torch.nn.functional.pad(e[:, 1:], [0, 0, 0, 1])
        prev = torch.nn.functional.pad(e[:, :-1], [0, 0, 1, 0])
        return self.out(torch.relu(self.lin(torch.cat([nxt, e, prev], dim=2))))


@pytest.mark.parametrize("dynamo", [False, True])
def test_pad_along_the_sequence_keeps_features_permuted(tmp_path, dynamo):
    path = export(Trigram(), tmp_path / "m.onnx", dynamo, {"ids": torch.tensor(IDS["ids"])}, ["y"],
                  {"ids": {0: "B", 1: "S"}})
    g, sol, part, bundle = exact(path, IDS)
    pads = [n for n in g.model.graph.node if n.op_type == "Pad"]
    assert pads and all(permuted(sol, g, n.output[0], 2) for n in pads)
