"""Where the secret boundary falls on real exports."""

from __future__ import annotations

from stip.passes.graph import load_graph
from stip.passes.partition import detect_private, partition
from stip.passes.solve import solve


def _cut(path, **kw):
    g = load_graph(path)
    sol = solve(g)
    priv = detect_private(g, sol, **kw)
    return g, sol, partition(g, sol, priv)


def test_bert_private_and_public_inputs(zoo):
    for dynamo in (False, True):
        g, sol, part = _cut(zoo.get("bert", dynamo))
        assert part.private == ["input_ids", "token_type_ids"]
        assert part.public == ["attention_mask"]
        float_crossing = [t for t in part.crossing if g.dtypes[t] == 1]
        assert len(float_crossing) == 1, part.crossing  # one permuted hidden state after the embedding LayerNorm
        assert sol.classes(float_crossing[0], 3)[2] is not None
        server_inputs = {x for i in part.server_nodes for x in g.model.graph.node[i].input}
        assert "input_ids" not in server_inputs and "token_type_ids" not in server_inputs


def test_vit_sends_one_tensor_and_runs_patch_conv_on_client(zoo):
    for dynamo in (False, True):
        g, sol, part = _cut(zoo.get("vit", dynamo))
        assert part.private == ["pixel_values"]
        float_crossing = [t for t in part.crossing if g.dtypes[t] == 1]
        assert len(float_crossing) == 1, part.crossing  # embeddings only; the first LayerNorm moved to the server
        pre_ops = {g.model.graph.node[i].op_type for i in part.pre_nodes}
        assert "Conv" in pre_ops and "MatMul" not in pre_ops


def test_private_override_still_exact(zoo):
    """Marking only input_ids private: token types are public, yet the client embeds them (it has them anyway)."""
    import numpy as np
    from helpers import assert_equivalent, compile_in_memory, run_model, run_three

    from stip.runtime.verify import random_feeds

    path = zoo.get("bert")
    g, sol, part, perms, bundle = compile_in_memory(path, private=["input_ids"])
    assert part.private == ["input_ids"] and "token_type_ids" in part.public
    feeds = random_feeds(path, batch=2, seq=7)
    assert_equivalent(run_model(path, feeds), run_three(bundle, feeds))
    assert np.all([i.name != "input_ids" for i in bundle.server.graph.input])
