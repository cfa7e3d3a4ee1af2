"""compile checks its own output: a wrong bundle is refused with nothing written; --no-check skips the check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from graphs import embed_then, ints, save, weight
from onnx import helper

from stip.compiler import cli
from stip.compiler.pipeline import compile_model
from stip.passes import rules
from stip.passes.errors import StipError
from stip.runtime.verify import verify


@pytest.fixture
def bias_rule_bug(monkeypatch):
    """The BiasGelu bug in small: LayerNormalization's rule ignores its bias (beta), so beta gets a permutation
    of its own while the activation it is added to carries the hidden permutation."""

    def norm_ignoring_beta(ctx):
        rules.broadcast_into(ctx, 0)
        rules.broadcast_into(ctx, 1)

    for op in ("LayerNormalization",):
        monkeypatch.setitem(rules.RULES, op, norm_ignoring_beta)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if "stip" in p.name or p.name == "out")


@pytest.mark.parametrize("family,output", [("bert", "last_hidden_state"), ("gpt2-cache", "logits")])
def test_wrong_bundle_is_refused_and_nothing_written(zoo, tmp_path, bias_rule_bug, family, output):
    out = tmp_path / "out"
    with pytest.raises(StipError, match=f"self-check failed: output '{output}'.*max abs") as e:
        compile_model(zoo.get(family), out)
    assert "nothing was written" in str(e.value)
    assert _leftovers(tmp_path) == []


def test_cli_refuses_wrong_bundle_with_one_line(zoo, tmp_path, bias_rule_bug, capsys):
    out = tmp_path / "out"
    assert cli.main(["compile", str(zoo.get("bert")), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "self-check failed: output 'last_hidden_state'" in err[0], err
    assert _leftovers(tmp_path) == []


def test_no_check_writes_the_wrong_bundle_that_verify_then_catches(zoo, tmp_path, bias_rule_bug):
    """--no-check really skips the check: the same broken compile is written, and only `verify` sees it."""
    model, out = zoo.get("bert"), tmp_path / "out"
    report = compile_model(model, out, check=False)
    assert report["self_check"] == "skipped (--no-check)"
    checks = verify(out, model, batch=2, seq=5)
    assert not all(c.ok for c in checks) and max(c.max_abs for c in checks) > 1e-2


@pytest.mark.parametrize("family", ["bert", "gpt2-cache"])
def test_normal_compile_passes_the_check(zoo, tmp_path, family, capsys):
    model, out = zoo.get(family), tmp_path / "out"
    assert cli.main(["compile", str(model), "-o", str(out), "-q"]) == 0
    assert "checked: pre -> server -> post matches the original" in capsys.readouterr().out
    chk = json.loads((out / "developer" / "report.json").read_text())["self_check"]
    assert chk["outputs"] and all(0 <= r["max_abs"] <= r["tolerance"] <= 1e-3 for r in chk["outputs"])
    assert np.isfinite([r["max_abs"] for r in chk["outputs"]]).all()


def _refused_models(tmp_path):
    """(model, extra flags): each is refused by compile at a different stage of the shared analysis."""
    leak = [helper.make_node("MatMul", ["h", "w"], ["m"]), helper.make_node("Cast", ["ids"], ["idf"], to=1),
            helper.make_node("Unsqueeze", ["idf", "ax"], ["idu"]),
            helper.make_node("Add", ["m", "idu"], ["y"], name="leaky_add")]
    cumsum = [helper.make_node("CumSum", ["h", "axis"], ["cs"], name="odd_cumsum"),
              helper.make_node("MatMul", ["cs", "w"], ["y"])]
    return {
        "partition": (save(embed_then(leak, ["B", "S", 4], [weight("w", 8, 4), ints("ax", [2])]),
                           tmp_path / "leak.onnx"), []),
        "no private input": (save(embed_then([helper.make_node("MatMul", ["h", "w"], ["y"])], ["B", "S", 4],
                                             [weight("w", 8, 4)]), tmp_path / "plain.onnx"), ["--public", "ids"]),
        "solver": (save(embed_then(cumsum, ["B", "S", 4], [ints("axis", 2), weight("w", 8, 4)]),
                        tmp_path / "cumsum.onnx"), []),
    }


@pytest.mark.parametrize("stage", ["partition", "no private input", "solver"])
def test_inspect_shows_the_blocker_compile_refuses_with(tmp_path, capsys, stage):
    model, flags = _refused_models(tmp_path)[stage]
    assert cli.main(["compile", str(model), "-o", str(tmp_path / "out"), "-q", *flags]) == 2
    refusal = capsys.readouterr().err.strip().removeprefix("stip compile: error: ")
    assert cli.main(["inspect", str(model), "--json", *flags]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["compiles"] is False and rep["blockers"]
    assert refusal.split(" (and ")[0] == rep["blockers"][0]
    assert cli.main(["inspect", str(model), *flags]) == 0
    text = capsys.readouterr().out
    assert "every node placed" not in text and "stip compile would refuse this model" in text
    assert rep["blockers"][0] in text


def test_inspect_of_a_compilable_model_says_so(zoo, capsys):
    assert cli.main(["inspect", str(zoo.get("bert"))]) == 0
    assert "every node placed: no blockers" in capsys.readouterr().out
    assert cli.main(["inspect", str(zoo.get("bert")), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["compiles"] is True and rep["blockers"] == []
