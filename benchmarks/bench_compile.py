"""Wall time and peak RSS of `stip compile`, one fresh process per compile.

Why a fresh process each time: peak RSS is a high-water mark, so a compile sharing a process with an earlier one
(or with the exporter) would report the larger of the two. The parent reaps each child with os.wait4, which
returns that child's own ru_maxrss. Wall time is the child's whole life (interpreter start and imports
included), because that is what a developer waiting on `stip compile` sees. The child also reports where the
time and memory went, phase by phase, using compile_model's progress hook.

Goals (BERT-base on 2 cores): wall <= 10 s; peak RSS <= 3x the model file.

    python benchmarks/bench_compile.py [--models minilm,bert-base] [--reps 3] [--quick] [--json] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

WALL_GOAL_S = 10.0
RSS_GOAL_X = 3.0
MIB = 2**20


def _maxrss_bytes(ru: resource.struct_rusage) -> int:
    return ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB, macOS bytes


def child(model: str, out: str, profile: str | None) -> None:
    """Runs inside the fresh process: one compile, phase timings and running peak RSS as JSON on stdout."""
    t_start = time.perf_counter()
    from stip.compiler.pipeline import compile_model

    t_stip = time.perf_counter()
    # Loaded lazily by load_graph anyway (from its file, so onnxruntime/tools/__init__.py and its torch import
    # are skipped); done here so its cost shows as its own row instead of inflating "analysing graph".
    from stip.passes.graph import _symbolic_shape_inference

    _symbolic_shape_inference()

    t_import = time.perf_counter()
    phases: list[dict] = [
        {"phase": "(import stip)", "start": t_start, "end": t_stip, "peak_mib": None},
        {"phase": "(load ORT symbolic shape inference)", "start": t_stip, "end": t_import, "peak_mib": None},
    ]

    def step(label: str, total: int | None):
        phases.append({"phase": label, "start": time.perf_counter(), "end": None, "peak_mib": None})
        rec = phases[-1]

        def tick() -> None:
            rec["end"] = time.perf_counter()
            rec["peak_mib"] = _maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF)) / MIB

        return tick

    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.runcall(compile_model, model, out, progress=step)
        prof.dump_stats(profile)
    else:
        compile_model(model, out, progress=step)
    t_end = time.perf_counter()
    # Gaps between hooked phases (key drawing, reports, shape inference imports) get their own rows.
    rows, prev = [], t_start
    for p in phases:
        if p["start"] - prev > 0.05:
            rows.append({"phase": f"(untracked, before {p['phase']})", "seconds": p["start"] - prev,
                         "peak_mib": None})
        rows.append({"phase": p["phase"], "seconds": (p["end"] or t_end) - p["start"], "peak_mib": p["peak_mib"]})
        prev = p["end"] or t_end
    if t_end - prev > 0.05:
        rows.append({"phase": "(after last phase)", "seconds": t_end - prev, "peak_mib": None})
    # Nothing in stip needs torch; if it shows up, an import path regressed (onnxruntime.tools imports it).
    print(json.dumps({"import_s": t_import - t_start, "compile_s": t_end - t_import, "phases": rows,
                      "torch_imported": "torch" in sys.modules}))


def _spawn(args: list[str]) -> tuple[float, int, str]:
    """Run a child; returns (wall seconds, its own peak RSS in bytes, its stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed with exit code {proc.returncode}")
    return wall, _maxrss_bytes(ru), out


def baseline_rss() -> int:
    """Peak RSS of a process that only imports what compile imports: the floor under every compile."""
    code = ("import stip.compiler.pipeline, stip.runtime.bundle; "
            "from stip.passes.graph import _symbolic_shape_inference as f; f()")
    return _spawn([sys.executable, "-c", code])[1]


def model_bytes(path: Path) -> int:
    """The .onnx file plus its external data, if the exporter wrote any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def bench_model(name: str, reps: int, profile: bool) -> dict:
    src = models.model_path(name)
    size = model_bytes(src)
    walls, rsss, runs = [], [], []
    for r in range(reps):
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", suffix=".compile", dir=models.CACHE))
        try:
            wall, rss, out = _spawn([sys.executable, __file__, "--child", str(src), str(tmp / "bundle")])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        info = json.loads(out.strip().splitlines()[-1])
        walls.append(wall)
        rsss.append(rss)
        runs.append(info)
        print(f"[{name}] run {r + 1}/{reps}: {wall:.2f} s wall, peak RSS {rss / MIB:.0f} MiB", file=sys.stderr,
              flush=True)
    best = runs[walls.index(statistics.median_low(walls))]
    result = {
        "model": name,
        "file_mib": size / MIB,
        "reps": reps,
        "wall_s": statistics.median(walls),
        "wall_s_all": walls,
        "import_s": statistics.median(r["import_s"] for r in runs),
        "compile_s": statistics.median(r["compile_s"] for r in runs),
        "peak_rss_mib": statistics.median(rsss) / MIB,
        "peak_rss_x": statistics.median(rsss) / size,
        "phases": best["phases"],
        "torch_imported": any(r["torch_imported"] for r in runs),
    }
    if profile:
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}.", suffix=".profile", dir=models.CACHE))
        try:
            stats = tmp / "compile.pstats"
            _spawn([sys.executable, __file__, "--child", str(src), str(tmp / "bundle"), "--profile-to", str(stats)])
            result["profile"] = _top(stats)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _top(stats_path: Path, n: int = 25) -> list[dict]:
    """The n functions with the most own time (tottime): where the seconds are actually spent."""
    import pstats

    st = pstats.Stats(str(stats_path))
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": nc, "tottime": tt, "cumtime": ct})
    rows.sort(key=lambda r: r["tottime"], reverse=True)
    return rows[:n]


def render(results: list[dict], floor: int) -> str:
    head = (f"{'model':10} {'file MiB':>9} {'wall s':>7} {'(import':>8} {'compile)':>9} {'peak RSS MiB':>13} "
            f"{'x file':>7} {'x file net':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        net = (r["peak_rss_mib"] * MIB - floor) / (r["file_mib"] * MIB)
        lines.append(f"{r['model']:10} {r['file_mib']:9.1f} {r['wall_s']:7.2f} {r['import_s']:8.2f} "
                     f"{r['compile_s']:9.2f} {r['peak_rss_mib']:13.0f} {r['peak_rss_x']:7.2f} {net:10.2f}")
    lines.append(f"(medians of {results[0]['reps'] if results else 0} fresh processes; 'net' subtracts the "
                 f"{floor / MIB:.0f} MiB an import-only process peaks at)")
    lines.append("")
    lines.append(f"goals: wall <= {WALL_GOAL_S:.0f} s (BERT-base, 2 cores), peak RSS <= {RSS_GOAL_X:.0f}x the model "
                 "file")
    for r in results:
        wall_ok = "ok" if r["wall_s"] <= WALL_GOAL_S else "MISSED"
        rss_ok = "ok" if r["peak_rss_x"] <= RSS_GOAL_X else "MISSED"
        lines.append(f"  {r['model']:10} wall {wall_ok:6}  RSS {rss_ok:6}  all walls: "
                     + ", ".join(f"{w:.2f}" for w in r["wall_s_all"]))
    for r in results:
        lines.append("")
        if r["torch_imported"]:
            lines.append(f"{r['model']}: note: torch was imported during the compile")
        lines.append(f"{r['model']}: phases of the median run, in-process seconds (peak = high-water mark at phase "
                     "end)")
        for p in r["phases"]:
            peak = f"{p['peak_mib']:8.0f} MiB" if p["peak_mib"] is not None else ""
            lines.append(f"  {p['phase']:52} {p['seconds']:6.2f} s  {peak}")
        if "profile" in r:
            lines.append(f"{r['model']}: cProfile, top functions by own time (separate profiled run)")
            for p in r["profile"]:
                lines.append(f"  {p['tottime']:6.2f} s own {p['cumtime']:6.2f} s cum {p['calls']:6d}x  {p['function']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm,bert-base", help="comma-separated: minilm, bert-base")
    ap.add_argument("--reps", type=int, default=3, help="fresh-process compiles per model (default 3)")
    ap.add_argument("--quick", action="store_true", help="one compile per model")
    ap.add_argument("--profile", action="store_true", help="also run one compile under cProfile, show the top")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--profile-to", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], a.child[1], a.profile_to)
        return 0
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    for n in names:
        models.model_path(n)  # export outside the timed children
    floor = baseline_rss()
    results = [bench_model(n, 1 if a.quick else a.reps, a.profile) for n in names]
    if a.json:
        print(json.dumps({"import_only_peak_rss_mib": floor / MIB, "results": results}, indent=2))
    else:
        print(render(results, floor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
