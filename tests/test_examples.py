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
