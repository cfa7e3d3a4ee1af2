"""Readable `stip audit` output with rich, as `stip inspect` prints."""

from __future__ import annotations

from io import StringIO


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}" if x >= 0.001 or x == 0 else f"{x:.2e}"


def render(result: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    buf = StringIO()
    con = Console(file=buf, width=120, force_terminal=False, color_system=None)
    t = result["traffic"]
    con.print(f"[b]STIP audit[/b] {result['bundle']}  key id {result['key_id']}  reference: "
              f"{result['reference'] or 'none'}")
    if t["prompts"]:
        con.print(f"server's view: the server graph + {t['prompts']} prompts x {t['tokens_each']} tokens "
                  f"({t['source']}, vocabulary {t['vocabulary']}) through the client's pre")
    else:
        con.print("server's view: the server graph only (no token-id input, so no sample traffic: the vocabulary "
                  "and encoding attacks need one)")
    con.print(f"ground truth: {result['ground_truth']}")
    s = Table("attack", "precondition", "success", "chance", "verdict", title="Attacks")
    for a in result["attacks"]:
        s.add_row(a["attack"], a["precondition"], _pct(a["success"]), _pct(a["chance"]), a["verdict"])
    con.print(s)
    for a in result["attacks"]:
        if a["attack"] == "weight matching":
            w = Table("space", "size", "recovered", "chance", "verdict", title="Weight matching per space")
            for r in a["spaces"]:
                w.add_row(r["space"], str(r["size"]), _pct(r["recovered"]), _pct(r["chance"]), r["verdict"])
            con.print(w)
        elif a["attack"] == "vocabulary matching" and a.get("stages"):
            v = Table("activation", "candidates", "sorted L1", "norm", "chance", title="Vocabulary matching")
            for r in a["stages"]:
                v.add_row(r["stage"], r["candidates"], _pct(r["sorted_l1"]), _pct(r["norm"]), _pct(r["chance"]))
            con.print(v)
        elif a.get("detail"):
            con.print(f"{a['attack']}: {a['detail']}")
    con.print(f"[b]Verdict: {result['verdict']}[/b]. {result['summary']}")
    return buf.getvalue()
