"""The whole op table, one representative node per op: no rule may ignore an input axis.

Why: a rule that forgets an input (FastGelu's bias sat in the one-input list) leaves that input in plaintext
order while the tensor beside it is permuted, and the bundle is silently wrong. Every input axis of size > 1 must
end up related to another tensor of the node (an output, or the input it is contracted with, directly or through
a structure link) or pinned; axes a reduction deliberately leaves free are listed per case and must stay free.
Adding an op to the table without a case here fails `test_every_op_has_a_case`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from stip.passes.graph import Graph
from stip.passes.rules import ELEMENTWISE, MS, MS_ELEMENTWISE, MS_UNARY, OPS, REDUCE, UNARY, op_key
from stip.passes.solve import RuleContext, Solver

RNG = np.random.default_rng(0)


def act(*shape):
    return ("f", shape)


def ids(*shape):
    return ("i", shape)


def flag(*shape):
    return ("b", shape)


def w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def i8(*shape):
    return RNG.integers(-128, 128, shape).astype(np.int8)


def u8(*shape):
    return RNG.integers(0, 256, shape).astype(np.uint8)


def iconst(values):
    return np.asarray(values, dtype=np.int64)


@dataclass
class Case:
    inputs: list  # act/ids/flag spec, a numpy constant, or None for an absent optional input
    outputs: list[tuple]
    attrs: dict = field(default_factory=dict)
    free: set[tuple[int, int]] = field(default_factory=set)  # (input, axis) an order-invariant op leaves free
    refused: bool = False  # the rule must refuse this use (then it pins every axis)


X = act(2, 3, 4)
CASES: dict[str, Case] = {}
for _op in UNARY + MS_UNARY + ["Softmax", "LogSoftmax"]:
    CASES[_op] = Case([X], [(2, 3, 4)])
for _op in ELEMENTWISE + MS_ELEMENTWISE:
    CASES[_op] = Case([X, w(4)], [(2, 3, 4)])
for _op in REDUCE:
    CASES[_op] = Case([X], [(2, 3, 1)], {"axes": [2]}, free={(0, 2)})
CASES.update({
    "Dropout": Case([X], [(2, 3, 4), (2, 3, 4)]),
    "CastLike": Case([X, act(5)], [(2, 3, 4)]),
    "Where": Case([flag(2, 3, 4), X, act(1, 3, 4)], [(2, 3, 4)]),
    "Clip": Case([X, np.float32(-1), np.float32(1)], [(2, 3, 4)]),
    MS + "BiasAdd": Case([X, w(4), act(2, 3, 4)], [(2, 3, 4)]),
    "Expand": Case([act(3, 1, 4), iconst([3, 2, 4])], [(3, 2, 4)]),
    "Tile": Case([act(3, 1, 4), iconst([1, 5, 2])], [(3, 5, 8)]),
    "Pad": Case([X, iconst([0, 1, 0, 0, 0, 0]), np.float32(0)], [(2, 4, 4)]),
    "LayerNormalization": Case([X, w(4), w(4)], [(2, 3, 4), (2, 3, 1), (2, 3, 1)]),
    "SimplifiedLayerNormalization": Case([X, w(4)], [(2, 3, 4), (2, 3, 1)]),
    "RMSNormalization": Case([X, w(4)], [(2, 3, 4)]),
    MS + "SkipLayerNormalization": Case([X, X, w(4), w(4), w(4)], [(2, 3, 4), (2, 3, 1), (2, 3, 1), (2, 3, 4)]),
    MS + "SkipSimplifiedLayerNormalization": Case([X, X, w(4), w(4)], [(2, 3, 4), (2, 3, 1), (2, 3, 1), (2, 3, 4)]),
    "MatMul": Case([X, w(4, 5)], [(2, 3, 5)]),
    MS + "FusedMatMul": Case([act(2, 2, 3, 4), act(2, 2, 5, 4)], [(2, 2, 3, 5)], {"transB": 1, "alpha": 0.5}),
    "Gemm": Case([act(3, 4), w(5, 4), w(5)], [(3, 5)], {"transB": 1}),
    "Transpose": Case([X], [(2, 4, 3)], {"perm": [0, 2, 1]}),
    "Reshape": Case([act(2, 3, 8), iconst([2, 3, 2, 4])], [(2, 3, 2, 4)]),
    "Flatten": Case([X], [(6, 4)], {"axis": 2}),
    "Squeeze": Case([act(2, 1, 4), iconst([1])], [(2, 4)]),
    "Unsqueeze": Case([act(2, 4), iconst([1])], [(2, 1, 4)]),
    "Concat": Case([X, X], [(2, 3, 8)], {"axis": 2}),
    "Split": Case([act(2, 3, 6), iconst([2, 4])], [(2, 3, 2), (2, 3, 4)], {"axis": 2}),
    "Slice": Case([act(2, 3, 8), iconst([2]), iconst([6]), iconst([2])], [(2, 3, 4)]),
    "Gather": Case([w(10, 4), ids(2, 3)], [(2, 3, 4)]),
    "DequantizeLinear": Case([np.ones((10, 4), np.int8), w(4), np.zeros(4, np.int8)], [(10, 4)]),
    "QuantizeLinear": Case([act(10, 4), w(4), np.zeros(4, np.int8)], [(10, 4)]),
    "DynamicQuantizeLinear": Case([X], [(2, 3, 4), (), ()]),
    "MatMulInteger": Case([act(2, 3, 4), i8(4, 5), np.zeros(3, np.uint8), np.zeros(5, np.int8)], [(2, 3, 5)]),
    MS + "DynamicQuantizeMatMul": Case([X, i8(4, 5), w(5), np.zeros(5, np.int8), w(5)], [(2, 3, 5)]),
    MS + "MatMulIntegerToFloat": Case([act(2, 3, 4), i8(4, 5), w(4), w(5), np.zeros(4, np.uint8), np.zeros(5, np.int8),
                                       w(5)], [(2, 3, 5)]),
    "ArgMax": Case([X], [(2, 3)], {"axis": 2, "keepdims": 0}),
    "ArgMin": Case([X], [(2, 3)], {"axis": 2, "keepdims": 0}),
    "Conv": Case([act(2, 3, 8, 8), w(4, 3, 2, 2), w(4)], [(2, 4, 7, 7)]),
    "QLinearMatMul": Case([act(2, 3, 4), w(3), np.uint8(3), i8(4, 5), w(5), np.zeros(5, np.int8), np.float32(0.1),
                           np.uint8(128)], [(2, 3, 5)]),
    MS + "QGemm": Case([act(3, 4), np.float32(0.1), np.uint8(3), i8(5, 4), w(5), np.zeros(5, np.int8), w(5),
                        np.float32(0.1), np.uint8(128)], [(3, 5)], {"transB": 1}),
    MS + "QLinearAdd": Case([X, np.float32(0.1), np.uint8(3), act(1, 3, 4), np.float32(0.2), np.uint8(5),
                             np.float32(0.3), np.uint8(7)], [(2, 3, 4)]),
    MS + "QLinearMul": Case([X, np.float32(0.1), np.uint8(3), w(4), np.float32(0.2), np.uint8(5), np.float32(0.3),
                             np.uint8(7)], [(2, 3, 4)]),
    MS + "QLinearSoftmax": Case([X, np.float32(0.1), np.uint8(3), np.float32(0.2), np.uint8(0)], [(2, 3, 4)],
                                {"axis": -1, "opset": 13}),
    MS + "QLinearConcat": Case([np.float32(0.1), np.uint8(3), act(2, 3, 4), np.float32(0.2), np.uint8(1),
                                act(2, 5, 4), np.float32(0.3), np.uint8(2)], [(2, 8, 4)], {"axis": 1}),
    "ConstantOfShape": Case([iconst([2, 3, 4])], [(2, 3, 4)]),
    MS + "QLinearSigmoid": Case([X, np.float32(0.1), np.uint8(3), np.float32(0.2), np.uint8(0)], [(2, 3, 4)]),
    MS + "QLinearLeakyRelu": Case([X, np.float32(0.1), np.uint8(3), np.float32(0.2), np.uint8(0)], [(2, 3, 4)]),
    "ConvInteger": Case([act(2, 3, 8, 8), i8(4, 3, 2, 2), np.uint8(3), np.zeros(4, np.int8)], [(2, 4, 7, 7)]),
    "ConvTranspose": Case([act(2, 4, 3, 3), w(4, 2, 2, 2), w(2)], [(2, 2, 4, 4)]),
    "Resize": Case([act(2, 4, 3, 3), None, np.array([1, 1, 2, 2], np.float32)], [(2, 4, 6, 6)]),
    "Upsample": Case([act(2, 4, 3, 3), np.array([1, 1, 2, 2], np.float32)], [(2, 4, 6, 6)]),
    "GatherND": Case([act(3, 5, 4), ids(2, 2)], [(2, 4)]),
    "Shape": Case([X], [(3,)]),
    "Size": Case([X], [()]),
    "Einsum": Case([X, w(4, 5)], [(2, 3, 5)], {"equation": "bsd,de->bse"}),
    "Attention": Case([act(2, 2, 5, 4)] * 3, [(2, 2, 5, 4)]),
    MS + "MatMulNBits": Case([act(2, 3, 32), u8(4, 2, 8), w(4, 2), u8(4, 1), None, w(4)], [(2, 3, 4)],
                             {"K": 32, "N": 4, "bits": 4, "block_size": 16}),
    MS + "Attention": Case([act(2, 5, 8), w(8, 24), w(24), ids(2), None, act(1, 2, 5, 5)], [(2, 5, 8)],
                           {"num_heads": 2}),
    MS + "MultiHeadAttention": Case(
        [act(2, 5, 8), act(2, 5, 8), act(2, 5, 8), w(24), ids(2, 5), act(1, 2, 5, 7), act(2, 2, 2, 4),
         act(2, 2, 2, 4), ids(1)], [(2, 5, 8), (2, 2, 7, 4), (2, 2, 7, 4), (2, 2, 5, 7)], {"num_heads": 2}),
    MS + "GroupQueryAttention": Case(
        [act(2, 5, 8), act(2, 5, 4), act(2, 5, 4), act(2, 1, 3, 4), act(2, 1, 3, 4), ids(2), ids(), w(16, 2),
         w(16, 2), ids(2, 5), act(2, 2, 5, 8), w(2), None, None, w(4), w(4)],
        [(2, 5, 8), (2, 1, 8, 4), (2, 1, 8, 4), (2, 2, 5, 8)], {"num_heads": 2, "kv_num_heads": 1, "do_rotary": 1}),
    MS + "RotaryEmbedding": Case([act(2, 5, 8), ids(2, 5), w(16, 2), w(16, 2)], [(2, 5, 8)], {"num_heads": 2}),
    "RotaryEmbedding": Case([act(2, 2, 5, 4), w(16, 2), w(16, 2), ids(2, 5)], [(2, 2, 5, 4)]),
    MS + "EmbedLayerNormalization": Case(
        [ids(2, 5), ids(2, 5), w(10, 8), w(16, 8), w(2, 8), w(8), w(8), ids(2, 5), ids(2, 5)],
        [(2, 5, 8), (2,), (2, 5, 8)]),
})

# Further variants of the fused ops: other layouts, and uses the rules refuse (every axis must then be pinned).
VARIANTS: list[tuple[str, Case]] = [
    (MS + "Attention", Case([act(2, 5, 8), w(8, 20), w(20)], [(2, 5, 4)],
                            {"num_heads": 2, "qkv_hidden_sizes": [8, 8, 4], "unidirectional": 1})),
    (MS + "Attention", Case([act(2, 5, 8), w(8, 24), w(24), ids(2), act(2, 2, 2, 3, 4)], [(2, 5, 8), (2, 2, 2, 8, 4)],
                            {"num_heads": 2}, refused=True)),
    (MS + "Attention", Case([act(2, 5, 8), w(8, 24)], [(2, 5, 8)], {"num_heads": 2, "do_rotary": 1},
                            refused=True)),
    (MS + "MultiHeadAttention", Case([act(2, 5, 8), act(2, 2, 7, 4), act(2, 2, 7, 6)], [(2, 5, 12)],
                                     {"num_heads": 2})),
    (MS + "MultiHeadAttention", Case([act(2, 5, 2, 3, 4)], [(2, 5, 8)], {"num_heads": 2}, refused=True)),
    (MS + "GroupQueryAttention", Case(
        [act(2, 5, 16), None, None, act(2, 1, 3, 4), act(2, 1, 3, 4), ids(2), ids(), w(16, 2), w(16, 2)],
        [(2, 5, 8), (2, 1, 8, 4), (2, 1, 8, 4)],
        {"num_heads": 2, "kv_num_heads": 1, "do_rotary": 1, "rotary_interleaved": 1})),
    (MS + "GroupQueryAttention", Case(
        [act(2, 5, 8), act(2, 5, 4), act(2, 5, 4), None, None, ids(2), ids(), None, None, None, None, None, w(1),
         w(1)], [(2, 5, 8)], {"num_heads": 2, "kv_num_heads": 1}, refused=True)),
    (MS + "RotaryEmbedding", Case([act(2, 2, 5, 8), ids(2, 5), w(16, 2), w(16, 2)], [(2, 2, 5, 8)],
                                  {"interleaved": 1, "rotary_embedding_dim": 4})),
    (MS + "EmbedLayerNormalization", Case([ids(2, 5), None, w(10, 8), w(16, 8), None, w(8), w(8)], [(2, 5, 8)])),
    ("Tile", Case([act(3, 2, 4), ids(3)], [(3, 4, 8)])),  # repeats unknown: every axis pinned
    ("Pad", Case([X, iconst([1, 0]), None, iconst([1, 2])], [(2, 4, 4)], {"mode": "edge"})),  # opset 18 axes
    ("MatMulInteger", Case([act(2, 3, 4), i8(4, 5), np.uint8(3), np.zeros((1, 5), np.int8)], [(2, 3, 5)])),
    ("MatMulInteger", Case([act(2, 3, 4), i8(4, 5), None, np.zeros((2, 4, 5), np.int8)], [(2, 3, 5)], refused=True)),
    ("DequantizeLinear", Case([i8(10, 4), w(10, 4)], [(10, 4)], refused=True)),  # neither per tensor nor per axis
    ("QuantizeLinear", Case([act(10, 4), np.float32(0.1), np.int8(3)], [(10, 4)])),
    ("DequantizeLinear", Case([i8(32, 4), w(2, 4), np.zeros((2, 4), np.int8)], [(32, 4)],  # blocks of 16 along K
                              {"axis": 0, "block_size": 16})),
    ("QuantizeLinear", Case([act(4, 32), w(4, 2)], [(4, 32)], {"axis": 1, "block_size": 16})),
    (MS + "QLinearAdd", Case([X, w(4), np.uint8(3), X, np.float32(0.2), np.uint8(5), np.float32(0.3), np.uint8(7)],
                             [(2, 3, 4)], refused=True)),  # a per-channel scale: QLinearAdd requantizes per tensor
    ("QLinearMatMul", Case([act(3, 4), np.float32(0.1), np.uint8(3), i8(4, 5), w(5), np.zeros(5, np.int8), w(3),
                            np.zeros(3, np.uint8)], [(3, 5)])),  # y per row
    (MS + "FusedMatMul", Case([act(4, 3), w(4, 5)], [(3, 5)], {"transA": 1})),
    (MS + "FusedMatMul", Case([act(2, 3, 4), w(2, 4, 5)], [(3, 2, 5)], {"transBatchA": 1}, refused=True)),
    ("DequantizeLinear", Case([i8(24, 4), w(2, 4)], [(24, 4)], {"axis": 0, "block_size": 16}, refused=True)),
    (MS + "MatMulNBits", Case([act(2, 3, 32), u8(4 * 2 * 16), w(8), w(8)], [(2, 3, 4)],  # flat, 8 bits, float zp
                              {"K": 32, "N": 4, "bits": 8, "block_size": 16})),
    (MS + "MatMulNBits", Case([act(2, 3, 16), u8(4, 1, 8), w(4)], [(2, 3, 4)],  # one block: K permutes freely
                              {"K": 16, "N": 4, "bits": 4, "block_size": 16})),
    (MS + "MatMulNBits", Case([act(2, 3, 24), u8(4, 2, 8), w(4, 2)], [(2, 3, 4)],  # K=24 pads its last block
                              {"K": 24, "N": 4, "bits": 4, "block_size": 16}, refused=True)),
    (MS + "MatMulNBits", Case([act(2, 3, 32), u8(4, 2, 4), w(4, 2)], [(2, 3, 4)],
                              {"K": 32, "N": 4, "bits": 2, "block_size": 16}, refused=True)),
]

DTYPES = {"f": TensorProto.FLOAT, "i": TensorProto.INT64, "b": TensorProto.BOOL}


def one_node_graph(key: str, case: Case) -> Graph:
    domain, _, op = key.rpartition(":")
    names, constants, shapes, dtypes = [], {}, {}, {}
    for j, spec in enumerate(case.inputs):
        if spec is None:
            names.append("")
            continue
        name = f"in{j}"
        names.append(name)
        if isinstance(spec, tuple):
            shapes[name], dtypes[name] = list(spec[1]), DTYPES[spec[0]]
        else:
            value = np.asarray(spec)
            constants[name], shapes[name] = value, list(value.shape)
            dtypes[name] = helper.np_dtype_to_tensor_dtype(value.dtype)
    outs = [f"out{k}" for k in range(len(case.outputs))]
    for o, shape in zip(outs, case.outputs):
        shapes[o], dtypes[o] = list(shape), TensorProto.FLOAT
    node = helper.make_node(op, names, outs, name=f"{op}_node", domain=domain, **case.attrs)
    model = helper.make_model(helper.make_graph([node], "one", [], []))
    g = Graph(model=model, path=Path("table.onnx"), constants=constants, shapes=shapes, dtypes=dtypes)
    g.index()
    return g


def test_every_op_has_a_case():
    assert sorted(set(OPS) - set(CASES)) == [], "add a case for every op registered in passes/rules.py"
    assert sorted(set(CASES) - set(OPS)) == []


def related(sp, c: int, own: str) -> bool:
    """Is class c, or a class structure-linked to it, shared with an axis of another tensor of the node?"""
    parents: dict[int, list[int]] = {}
    for r in sp.roots():
        for part in sp.link_of(r) or ():
            parents.setdefault(part, []).append(r)
    seen, stack = set(), [sp.find(c)]
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if any(key != own for key, _ in sp.info(x).members):
            return True
        stack += list(sp.link_of(x) or ()) + parents.get(x, [])
    return False


@pytest.mark.parametrize("key,case", sorted(CASES.items()) + VARIANTS,
                         ids=[k for k in sorted(CASES)] + [f"{k}-variant{i}" for i, (k, _) in enumerate(VARIANTS)])
def test_rule_relates_every_input_axis(key, case):
    g = one_node_graph(key, case)
    solver = Solver(g)
    ctx = RuleContext(solver, 0)
    assert op_key(ctx.node) == key
    blocker = solver.apply(0)
    assert blocker is None or blocker.refused, blocker
    refused = blocker is not None
    assert refused == case.refused, blocker
    sp = solver.spaces
    reads = OPS[key].reads
    for j, x in enumerate(ctx.node.input):
        if not x or (reads and all(j not in reads.get(k, (j,)) for k in range(len(case.outputs)))):
            continue  # absent, or only its shape or dtype is used
        own = ctx.in_key(j)
        for a, d in enumerate(g.shapes[x]):
            if d == 1:
                continue
            if (j, a) in case.free:
                assert not refused and not (sp.has((own, a)) and sp.info(sp.id((own, a))).fixed), \
                    f"{key}: input {j} axis {a} should stay free"
                continue
            assert sp.has((own, a)), f"{key}: input {j} axis {a} never seen by the rule"
            info = sp.info(sp.id((own, a)))
            if refused:
                assert info.fixed, f"{key}: refused, but input {j} axis {a} is not pinned"
                continue
            assert info.fixed or related(sp, sp.id((own, a)), own), \
                f"{key}: input {j} axis {a} (size {d}) is ignored by the rule"


def test_a_rule_that_ignores_an_input_is_caught(monkeypatch):
    """The harness itself: the old FastGelu rule (the bias ignored) must fail it."""
    from stip.passes import rules

    def unary_only(ctx):
        rules.broadcast_into(ctx, 0)

    monkeypatch.setitem(OPS, MS + "FastGelu", rules.OpContract(unary_only))
    with pytest.raises(AssertionError, match="input 1 axis 0"):
        test_rule_relates_every_input_axis(MS + "FastGelu", CASES[MS + "FastGelu"])

