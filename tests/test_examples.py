"""The README's examples, run exactly as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_minilm(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "examples/quickstart_minilm.py", "--workdir", str(tmp_path / "qs")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "PASS" in r.stdout and "0.755" in r.stdout
    bundle = tmp_path / "qs" / "bundle"
    assert (bundle / "server" / "model.onnx").exists() and (bundle / "client" / "pre.onnx").exists()


def test_quickstart_minilm_over_http(tmp_path):
    """The same example with the server graph in its own `stip serve` process, over KServe v2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "examples/quickstart_minilm.py", "--workdir", str(tmp_path / "qs"),
                        "--serve"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "over HTTP" in r.stdout and "PASS" in r.stdout and "0.755" in r.stdout


def test_export_script_cli(tmp_path):
    out = tmp_path / "vit.onnx"
    r = subprocess.run([sys.executable, "examples/export_models.py", "vit", "-o", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.exists()


def test_readme_several_files_block_runs_as_written(tmp_path):
    """The README's "several files" commands, line by line (all but the long-running `stip serve`), in a fresh
    directory: export a tiny T5 with optimum, inspect, compile, generate, verify."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "export_multifile.py t5" in b)
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("stip serve")]
    assert len(lines) >= 5 and lines[0].startswith("python examples/export_multifile.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    for ln in lines:
        argv = shlex.split(ln)
        if argv[0] == "python":
            argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
        else:
            assert argv[0] == "stip", ln
            argv = [sys.executable, "-m", "stip.compiler.cli", *argv[1:]]
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, f"{ln}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        if argv[3:4] == ["verify"]:
            assert "PASS" in r.stdout
