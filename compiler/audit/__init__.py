"""`stip audit`: how much the known attacks on permutation schemes recover from a compiled bundle.

The audit takes the server's view: the server graph and the traffic users would send (the client's pre run on
sample prompts). The developer key is read only to score each attack against the truth.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from stip.compiler.audit import vocab_matching, weight_matching
from stip.compiler.audit.exposure import attention_maps, linkability, logit_order, plaintext_inputs
from stip.compiler.audit.traffic import prompt_ids
from stip.compiler.audit.view import Layout, load_reference, load_view
from stip.passes.errors import StipError

Progress = Callable[[str, int | None], Callable[[], None]]
GROUND_TRUTH = ("developer/key.npz is read only to score each attack against the true permutations and tokens; "
                "the attacks themselves use only the server graph, the traffic and the reference")


def audit(bundle: str | Path, reference: str | Path | None = None, samples: int = 8, seq: int = 16,
          prompts: list[str] | None = None, layers: int = 1, progress: Progress | None = None,
          write_report: bool = True) -> dict:
    if samples < 1 or seq < 1:
        raise StipError(f"--samples {samples}: must be at least 1")
    step = progress or (lambda _label, _total: (lambda: None))
    view = load_view(bundle)
    if view.token_input is None and prompts:
        raise StipError(f"{bundle}: --prompt needs a token-id input among the private inputs")
    ids = prompt_ids(view, samples, seq, prompts) if view.token_input else None
    result: dict = {"bundle": str(bundle), "key_id": view.manifest.key_id, "ground_truth": GROUND_TRUTH,
                    "reference": str(reference) if reference else None,
                    "traffic": {"prompts": int(ids.shape[0]) if ids is not None else 0,
                                "tokens_each": int(ids.shape[1]) if ids is not None else 0,
                                "source": "--prompt texts" if prompts else "random token ids",
                                "vocabulary": view.vocab},
                    "attacks": []}
    if reference is not None:
        tick = step("loading the reference", None)
        ref = load_reference(reference, view)
        tick()
        result["attacks"].append(weight_matching.run(view, ref, step("weight matching", len(view.key))))
        if ids is not None:
            tick_v = step("vocabulary matching", layers + 1)
            result["attacks"].append(vocab_matching.run(view, ref, ids, layers, tick_v))
    tick = step("no-reference exposures", 4)
    for fn in (linkability, attention_maps, logit_order):
        if ids is not None:
            result["attacks"].append(fn(view, ids))
        tick()
    result["attacks"].append(plaintext_inputs(view))
    tick()
    result["verdict"] = overall(result)
    result["summary"] = summary(result)
    if write_report:
        update_report(Layout(Path(bundle)).report, result)
    return result


def overall(result: dict) -> str:
    if result["reference"] is None:
        return "private only while its weights are"
    if any(a["attack"] in ("weight matching", "vocabulary matching") and a["verdict"] in ("recovered", "leaks")
           for a in result["attacks"]):
        return "not private"
    return "private against this reference"


def summary(result: dict) -> str:
    """One plain sentence: when the bundle is private, and what it exposes anyway."""
    by = {a["attack"]: a for a in result["attacks"]}
    exposed = [a["attack"] for a in result["attacks"] if a["verdict"] == "exposed"]
    anyway = ("it exposes anyway: " + ", ".join(exposed)) if exposed else "nothing else was measured as exposed"
    if result["reference"] is None:
        return (f"Private only while its weights are: no reference was given, so weight and vocabulary matching "
                f"were not run; {anyway}.")
    wm, vm = by.get("weight matching"), by.get("vocabulary matching")
    broken = [a for a in (wm, vm) if a and a["verdict"] in ("recovered", "leaks")]
    if broken:
        parts = [f"{a['attack']} recovers {a['success']:.0%} (chance {a['chance']:.2%})" for a in broken]
        return (f"Not private against an attacker holding {Path(result['reference']).name}: "
                f"{'; '.join(parts)}; {anyway}.")
    return (f"Private against an attacker holding {Path(result['reference']).name} (every matching attack stays at "
            f"chance), as long as no closer copy of the weights is public; {anyway}.")


def update_report(path: Path, result: dict) -> None:
    """developer/report.json gets an "audit" entry, replaced atomically (temp file + rename)."""
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            raise StipError(f"{path}: not valid JSON; recompile the bundle") from None
    data["audit"] = result
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StipError(f"{path}: cannot update the report ({e.strerror})") from None
