"""Helpers shared by tests: compile in-process and compare original vs pre -> server -> post."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from stip.passes.build import build
from stip.passes.graph import load_graph
from stip.passes.partition import detect_private, partition
from stip.passes.permute import draw
from stip.passes.solve import solve
from stip.runtime.sessions import make_session


def run_model(model: onnx.ModelProto | Path, feeds: dict) -> dict:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = make_session(src, "cpu")
    names = [i.name for i in sess.get_inputs()]
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {n: feeds[n] for n in names})))


def compile_in_memory(path: Path, seed: int = 1, private=None, head: str = "server"):
    g = load_graph(path)
    sol = solve(g)
    priv = detect_private(g, sol, private)
    part = partition(g, sol, priv, head)
    perms = draw(sol, np.random.default_rng(seed).permutation)
    return g, sol, part, perms, build(g, sol, perms, part, "test-key")


def run_three(bundle, feeds: dict) -> dict:
    pre = run_model(bundle.pre, feeds)
    server = run_model(bundle.server, {**feeds, **pre})
    return run_model(bundle.post, {**pre, **server})


def assert_equivalent(ref: dict, got: dict, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    assert set(ref) == set(got)
    for k in ref:
        assert ref[k].shape == got[k].shape, k
        np.testing.assert_allclose(got[k], ref[k], atol=atol, rtol=rtol, err_msg=k)
        if ref[k].ndim and ref[k].shape[-1] > 1:
            assert (ref[k].argmax(-1) == got[k].argmax(-1)).all(), f"argmax differs on {k}"
