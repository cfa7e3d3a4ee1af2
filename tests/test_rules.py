"""One test per op rule: the solved spaces are what the rule promises, and the folded graph is exact."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import embed_then, ints, save, weight
from helpers import assert_equivalent, compile_in_memory, run_model, run_three
from onnx import helper

from stip.passes.graph import load_graph
from stip.passes.rules import group_axes
from stip.passes.solve import solve

FEEDS = {"ids": np.random.default_rng(1).integers(0, 16, (3, 5))}


def check(tmp_path, m, feeds=FEEDS):
    path = save(m, tmp_path / "m.onnx")
    g, sol, part, perms, bundle = compile_in_memory(path)
    assert sol.blockers == []
    assert_equivalent(run_model(path, feeds), run_three(bundle, feeds), atol=1e-5, rtol=1e-5)
    return g, sol, part


def space_of(sol, g, tensor, axis):
    return sol.classes(tensor, len(g.shapes[tensor]))[axis]


def test_elementwise_bias_and_broadcast_scalar(tmp_path):
    nodes = [helper.make_node("MatMul", ["h", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Mul", ["a", "half"], ["x"]), helper.make_node("Erf", ["x"], ["y"])]
    g, sol, _ = check(tmp_path, embed_then(nodes, ["B", "S", 6], [weight("w", 8, 6), weight("b", 6),
                                                                   weight("half", 1)]))
    assert space_of(sol, g, "y", 2) is not None  # the projection's output space reaches the output
    assert space_of(sol, g, "y", 2) == space_of(sol, g, "m", 2)
    assert space_of(sol, g, "y", 1) is None  # sequence axis: from the ids input, never permuted


def test_layernorm_gamma_beta_take_the_permutation(tmp_path):
    nodes = [helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["y"])]
    g, sol, _ = check(tmp_path, embed_then(nodes, ["B", "S", 4], [weight("gamma", 8), weight("beta", 8),
                                                                   weight("w", 8, 4)]))
    assert space_of(sol, g, "n", 2) == space_of(sol, g, "h", 2) is not None


def test_rmsnorm_written_out_reduces_over_a_permuted_axis(tmp_path):
    nodes = [helper.make_node("Pow", ["h", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Div", ["h", "rms"], ["nrm"]), helper.make_node("Mul", ["nrm", "gamma"], ["g"]),
             helper.make_node("MatMul", ["g", "w"], ["y"])]
    inits = [numpy_helper_scalar("two", 2.0), numpy_helper_scalar("eps", 1e-6), weight("gamma", 8), weight("w", 8, 4)]
    g, sol, _ = check(tmp_path, embed_then(nodes, ["B", "S", 4], inits))
    assert space_of(sol, g, "g", 2) == space_of(sol, g, "h", 2) is not None


def numpy_helper_scalar(name, v):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(v, dtype=np.float32), name)


def test_reshape_split_links_heads_and_inner_and_attention_is_exact(tmp_path):
    """q/k from the hidden state, split into 2 heads of 4, scores, softmax, times v, merged back."""
    nodes = [
        helper.make_node("MatMul", ["h", "wq"], ["q"]), helper.make_node("MatMul", ["h", "wk"], ["k"]),
        helper.make_node("MatMul", ["h", "wv"], ["v"]),
        helper.make_node("Reshape", ["q", "split"], ["q4"]), helper.make_node("Reshape", ["k", "split"], ["k4"]),
        helper.make_node("Reshape", ["v", "split"], ["v4"]),
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vt"], ["c"]), helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ct", "merge"], ["cm"]), helper.make_node("MatMul", ["cm", "wo"], ["y"]),
    ]
    inits = [weight("wq", 8, 8), weight("wk", 8, 8), weight("wv", 8, 8), weight("wo", 8, 8),
             ints("split", [0, 0, 2, 4]), ints("merge", [0, 0, 8])]
    g, sol, _ = check(tmp_path, embed_then(nodes, ["B", "S", 8], inits))
    q, k, v = (space_of(sol, g, t, 2) for t in ("q", "k", "v"))
    assert q == k and q != v  # Q and K share one space (it cancels in Q K^T); V has its own
    heads_q, inner_q = sol.link(q)
    heads_v, inner_v = sol.link(v)
    assert heads_q == heads_v  # whole-head permutation shared by Q, K, V
    assert inner_q != inner_v and inner_q in sol.dependent  # per-head inner permutations
    assert sol.sizes[heads_q] == 2 and sol.sizes[inner_q] == 4


def test_gather_axis_is_positional(tmp_path):
    nodes = [helper.make_node("Gather", ["h", "zero"], ["first"], axis=1),
             helper.make_node("MatMul", ["first", "w"], ["y"])]
    g, sol, _ = check(tmp_path, embed_then(nodes, ["B", 4], [ints("zero", 0), weight("w", 8, 4)]))
    assert space_of(sol, g, "first", 1) == space_of(sol, g, "h", 2)


def test_concat_and_slice_axes_are_positional_others_pass(tmp_path):
    nodes = [helper.make_node("Concat", ["cls", "h"], ["hc"], axis=1),
             helper.make_node("Slice", ["hc", "s0", "s1", "ax1"], ["hs"]),
             helper.make_node("Add", ["hs", "pos"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])]
    inits = [weight("cls", 1, 1, 8), ints("s0", [1]), ints("s1", [4]), ints("ax1", [1]), weight("pos", 1, 3, 8),
             weight("w", 8, 8)]
    m = embed_then(nodes, ["B", 3, 8], inits)
    feeds = {"ids": np.random.default_rng(2).integers(0, 16, (1, 6))}
    g, sol, _ = check(tmp_path, m, feeds)
    assert space_of(sol, g, "hc", 1) is None and space_of(sol, g, "hc", 2) == space_of(sol, g, "h", 2)


def test_conv_patch_embedding_channels(tmp_path):
    from graphs import model
    from onnx import TensorProto

    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, 6])
    nodes = [helper.make_node("Conv", ["pixels", "w", "b"], ["c"], strides=[4, 4], kernel_shape=[4, 4]),
             helper.make_node("Reshape", ["c", "shp"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "w2"], ["y"])]
    inits = [weight("w", 8, 3, 4, 4), weight("b", 8), ints("shp", [0, 8, -1]), weight("w2", 8, 6)]
    m = model(nodes, [x], [y], inits)
    feeds = {"pixels": np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    g, sol, part = check(tmp_path, m, feeds)
    assert part.private == ["pixels"]
    assert space_of(sol, g, "c", 1) is not None and space_of(sol, g, "c", 2) is None


def test_unsupported_op_on_hidden_path_is_a_named_blocker(tmp_path):
    nodes = [helper.make_node("CumSum", ["h", "axis"], ["cs"], name="my_cumsum"),
             helper.make_node("MatMul", ["cs", "w"], ["y"])]
    path = save(embed_then(nodes, ["B", "S", 4], [ints("axis", 2), weight("w", 8, 4)]), tmp_path / "m.onnx")
    sol = solve(load_graph(path))
    assert sol.blockers, "CumSum over the feature axis must block"
    text = " ".join(str(b) for b in sol.blockers)
    assert "CumSum" in text and "my_cumsum" in text


@pytest.mark.parametrize("ins,out,expected", [
    (["B", "S", 32], ["B", "S", 4, 8], [([0], [0]), ([1], [1]), ([2], [2, 3])]),
    (["B", "S", 4, 8], ["B", "S", 32], [([0], [0]), ([1], [1]), ([2, 3], [2])]),
    (["B", 4, "S", 8], ["B*4", "S", 8], [([0, 1], [0]), ([2], [1]), ([3], [2])]),
    (["B", "S", 32], ["B*S", 32], [([0, 1], [0]), ([2], [1])]),
    ([1, "S", 8], ["S", 8], [([1], [0]), ([2], [1])]),
    ([6, 4], [4, 6], None),
])
def test_group_axes(ins, out, expected):
    assert group_axes(ins, out) == expected


def test_shared_constant_is_duplicated_per_permutation(tmp_path):
    """Exporters share identical initializers (and scalars) between unrelated ops; each use gets its own copy."""
    nodes = [helper.make_node("MatMul", ["h", "w1"], ["a"]), helper.make_node("Add", ["a", "b"], ["a2"]),
             helper.make_node("MatMul", ["h", "w2"], ["c"]), helper.make_node("Add", ["c", "b"], ["c2"]),
             helper.make_node("MatMul", ["a2", "w3"], ["p"]), helper.make_node("MatMul", ["c2", "w4"], ["q"]),
             helper.make_node("Add", ["p", "q"], ["y"])]
    inits = [weight("w1", 8, 6), weight("w2", 8, 6), weight("b", 6), weight("w3", 6, 5), weight("w4", 6, 5)]
    g, sol, part = check(tmp_path, embed_then(nodes, ["B", "S", 5], inits))
    a, c = space_of(sol, g, "a2", 2), space_of(sol, g, "c2", 2)
    assert a != c and a is not None and c is not None
    _, _, _, _, bundle = compile_in_memory(tmp_path / "m.onnx")
    copies = [t.name for t in bundle.server.graph.initializer if t.name.startswith("b.")]
    assert len(copies) == 2


def test_split_of_fused_projection_and_gemm_transb(tmp_path):
    """GPT-2 style: one Gemm(transB=1) makes [q | k | v]; Split hands each output one block of its space."""
    nodes = [helper.make_node("Reshape", ["h", "flat"], ["h2"]),
             helper.make_node("Gemm", ["h2", "wqkv", "bqkv"], ["qkv"], transB=1),
             helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=1),
             helper.make_node("Mul", ["q", "k"], ["qk"]), helper.make_node("Add", ["qk", "v"], ["s"]),
             helper.make_node("Gemm", ["s", "wo"], ["y"])]
    inits = [ints("flat", [-1, 8]), weight("wqkv", 18, 8), weight("bqkv", 18), ints("sizes", [6, 6, 6]),
             weight("wo", 6, 5)]
    from graphs import model
    from onnx import TensorProto

    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    m = model([helper.make_node("Gather", ["table", "ids"], ["h"])] + nodes, [ids], [y],
              [weight("table", 16, 8), *inits])
    g, sol, _ = check(tmp_path, m, {"ids": np.array([1, 5, 7, 2])})
    whole = space_of(sol, g, "qkv", 1)
    assert sol.spaces.kind_of(whole) == "cat" and len(sol.link(whole)) == 3
    assert space_of(sol, g, "q", 1) == space_of(sol, g, "k", 1) == space_of(sol, g, "v", 1)  # unified by Mul/Add


def test_expand_and_reduce_keep_the_unreduced_spaces(tmp_path):
    nodes = [helper.make_node("ReduceSum", ["h", "ax"], ["r"], keepdims=0),  # over the sequence axis
             helper.make_node("Unsqueeze", ["r", "ax"], ["r3"]), helper.make_node("Expand", ["r3", "shp"], ["e"]),
             helper.make_node("Add", ["e", "h"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])]
    g, sol, _ = check(tmp_path, embed_then(nodes, ["B", "S", 4], [ints("ax", [1]), ints("shp", [1, 5, 8]),
                                                                   weight("w", 8, 4)]),
                      {"ids": np.random.default_rng(4).integers(0, 16, (1, 5))})
    assert space_of(sol, g, "r", 1) == space_of(sol, g, "h", 2) is not None


def test_shape_values_evaluate_static_slice_bounds(tmp_path):
    from stip.passes.values import shape_values

    nodes = [helper.make_node("Shape", ["h"], ["shape"]), helper.make_node("Gather", ["shape", "last"], ["d"]),
             helper.make_node("Div", ["d", "two"], ["half"]), helper.make_node("Unsqueeze", ["half", "zero1"], ["end"]),
             helper.make_node("Slice", ["h", "zero1", "end", "ax2"], ["x1"]),
             helper.make_node("MatMul", ["x1", "w"], ["y"])]
    inits = [ints("last", 2), ints("two", 2), ints("zero1", [0]), ints("ax2", [2]), weight("w", 4, 3)]
    path = save(embed_then(nodes, ["B", "S", 3], inits), tmp_path / "m.onnx")
    g = load_graph(path)
    vals = shape_values(g)
    assert vals["half"].tolist() == 4 and vals["end"].tolist() == [4]
    assert "shape" not in vals  # batch and sequence are dynamic: the whole shape is not known
    check(tmp_path, embed_then(nodes, ["B", "S", 3], inits))


def test_cache_pairs_and_errors():
    from stip.passes.errors import StipError
    from stip.passes.state import pair_cache

    ins = ["input_ids", "past_key_values.0.key", "past_key_values.0.value"]
    outs = ["logits", "present.0.key", "present.0.value"]
    assert pair_cache(ins, outs) == [("past_key_values.0.key", "present.0.key"),
                                     ("past_key_values.0.value", "present.0.value")]
    with pytest.raises(StipError, match="no matching output 'present.0.value'"):
        pair_cache(ins, outs[:2])
    with pytest.raises(StipError, match="no matching input"):
        pair_cache(ins[:2], outs)
