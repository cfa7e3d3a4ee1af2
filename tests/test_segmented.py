"""verify and the self-check on large models: the graph runs in segments of bounded weight, one session at a time.

The threshold is lowered so that a tiny Llama (with its KV cache) runs in many segments; the segmented run must
equal a whole-model session, the self-check must pass through it, and a corrupted server weight must be caught.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from test_llm_scale import external_copy

from stip.compiler.pipeline import compile_model
from stip.runtime import segmented
from stip.runtime.bundle_format import Layout
from stip.runtime.cache import CachedSession
from stip.runtime.sessions import make_session
from stip.runtime.verify import random_feeds, verify


def test_segments_equal_the_whole_model_through_the_cache(zoo, tmp_path):
    model = external_copy(zoo.get("llama-cache"), tmp_path / "src")
    seg = segmented.SegmentedSession(model, segment_bytes=20_000)
    assert len(seg.segments) >= 4
    whole = make_session(model, "cpu")
    assert [(i.name, i.type, i.shape) for i in seg.get_inputs()] == \
        [(i.name, i.type, i.shape) for i in whole.get_inputs()]
    a, b = CachedSession(whole, 2), CachedSession(seg, 2)
    for step, (length, past) in enumerate(((3, 0), (4, 3))):  # prefill, then new tokens after the cache
        feeds = random_feeds(model, batch=2, seq=length, past=past, seed=step, session=whole)
        feeds = {k: v for k, v in feeds.items() if k in a.inputs}
        want, got = a.run(feeds), b.run(feeds)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    for p in a.past:  # the caches that each side keeps agree too
        np.testing.assert_allclose(b.past[p], a.past[p], rtol=1e-5, atol=1e-5)


def test_self_check_and_verify_run_in_segments_and_catch_a_wrong_weight(zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(segmented, "SEGMENT_BYTES", 20_000)
    made = []
    real = segmented.SegmentedSession

    def spy(*args, **kw):
        made.append(real(*args, **kw))
        return made[-1]

    monkeypatch.setattr(segmented, "SegmentedSession", spy)
    model = external_copy(zoo.get("llama-cache"), tmp_path / "src")
    out = tmp_path / "out"
    report = compile_model(model, out, external_data="always")
    assert report["self_check"]["outputs"]
    assert len(made) == 2 and all(len(s.segments) >= 4 for s in made)  # the original, then the server graph
    assert all(c.ok for c in verify(out, model, past=3, seq=4, device="cpu"))

    # Flip one float of the largest server weight: the segmented check must see it.
    server = onnx.load(str(Layout(out).server_model), load_external_data=False)
    t = max((t for t in server.graph.initializer if t.data_location == TensorProto.EXTERNAL),
            key=lambda t: int(np.prod(t.dims)))
    info = {e.key: e.value for e in t.external_data}
    data = Layout(out).server_dir / info["location"]
    words = np.memmap(data, dtype=np.float32, mode="r+", offset=int(info["offset"]), shape=(int(np.prod(t.dims)),))
    words[:64] += 4.0
    words.flush()
    del words
    assert not all(c.ok for c in verify(out, model, past=3, seq=4, device="cpu"))


@pytest.mark.parametrize("segment_bytes, expect", [(10**12, "whole"), (20_000, "segments")])
def test_session_for_picks_by_weight_size(zoo, tmp_path, segment_bytes, expect):
    model = external_copy(zoo.get("llama-cache"), tmp_path / "src")
    s = segmented.session_for(model, "cpu", segment_bytes)
    assert isinstance(s, segmented.SegmentedSession) == (expect == "segments")
