"""Compiles that lose nothing: --force replaces only a bundle, a killed compile is repaired by the next one,
SIGTERM cleans up like Ctrl-C, modes do not depend on the umask, and `-o .` is one clear line."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import _assert_user_error, stip

import stip.compiler.output as output
from stip.compiler.keys import read_key
from stip.compiler.pipeline import compile_model
from stip.passes.errors import StipError
from stip.runtime.bundle import LocalDeployment
from stip.runtime.bundle_format import Layout, Manifest, model_key_id

pytestmark = pytest.mark.filterwarnings("ignore")


def key_id_of_complete_bundle(out: Path) -> str:
    """The bundle's key id, after checking that every part is there and agrees (graphs, manifest, key)."""
    lay = Layout(out)
    key_id = Manifest.read(lay.manifest).key_id
    assert read_key(lay.key)[0] == key_id
    assert model_key_id(lay.server_model) == key_id
    LocalDeployment(out, device="cpu")  # loads all three graphs and checks their key ids
    return key_id


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def old_bundle(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("old") / "o"
    report = compile_model(zoo.get("bert"), out)
    return out, report["key_id"]


def fresh_copy(old_bundle, tmp_path) -> tuple[Path, str]:
    src, key_id = old_bundle
    out = tmp_path / "o"
    shutil.copytree(src, out)
    return out, key_id


# ---- --force and -o ----

def test_force_refuses_the_current_directory_and_keeps_its_files(zoo, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = stip("compile", zoo.get("bert"), "-o", ".", "--force", "-q", cwd=tmp_path)
    _assert_user_error(r, "-o .", "current directory")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_dot_output_is_one_line_not_a_traceback(zoo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_user_error(stip("compile", zoo.get("bert"), "-o", ".", "-q", cwd=empty), "-o .", "name one")
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("stray", ["notes.txt", "models/big.onnx"])
def test_force_replaces_only_a_stip_bundle(zoo, old_bundle, tmp_path, stray):
    out, key_id = fresh_copy(old_bundle, tmp_path)
    path = out / stray
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("mine")
    r = stip("compile", zoo.get("bert"), "-o", out, "--force", "-q")
    _assert_user_error(r, str(out), "not a stip bundle", Path(stray).parts[0], "--force")
    assert path.read_text() == "mine" and key_id_of_complete_bundle(out) == key_id
    assert leftovers(tmp_path) == []


def test_force_refuses_a_directory_with_a_damaged_manifest(zoo, tmp_path):
    out = tmp_path / "o"
    (out / "client").mkdir(parents=True)
    (out / "client" / "stip.json").write_text("{not json")
    r = stip("compile", zoo.get("bert"), "-o", out, "--force", "-q")
    _assert_user_error(r, "stip.json", "not valid JSON", "not a stip bundle")
    assert (out / "client" / "stip.json").read_text() == "{not json"


def test_force_replaces_a_bundle(zoo, old_bundle, tmp_path):
    out, key_id = fresh_copy(old_bundle, tmp_path)
    new = compile_model(zoo.get("bert"), out, force=True)["key_id"]
    assert new != key_id and key_id_of_complete_bundle(out) == new
    assert leftovers(tmp_path) == []


def test_negative_max_context_is_refused_before_compiling(zoo, tmp_path):
    _assert_user_error(stip("compile", zoo.get("bert"), "-o", tmp_path / "o", "--max-context", "-3", "-q"),
                       "--max-context -3", "at least 1")
    assert list(tmp_path.iterdir()) == []


# ---- modes ----

def test_modes_do_not_depend_on_the_umask(zoo, tmp_path):
    tok = tmp_path / "tok"
    previous = os.umask(0)
    try:
        tok.mkdir()
        (tok / "tokenizer.json").write_text("{}")
        assert stat.S_IMODE(tok.stat().st_mode) == 0o777
        compile_model(zoo.get("bert"), tmp_path / "o", tokenizer=tok)
    finally:
        os.umask(previous)
    out = tmp_path / "o"
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    want = {"": 0o755, "server": 0o755, "client": 0o755, "client/tokenizer": 0o755, "developer": 0o700,
            "developer/key.npz": 0o600}
    for rel, m in want.items():
        assert mode(out / rel) == m, (rel, oct(mode(out / rel)))
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "key.npz"]
    assert len(files) >= 5 and all(mode(p) == 0o644 for p in files), [(str(p), oct(mode(p))) for p in files]


# ---- killed compiles ----

KILLER = r"""
import os, signal, sys
import stip.compiler.output as o
import stip.compiler.pipeline as p

model, out, point = sys.argv[1:4]


def die(*_a, **_k):
    os.kill(os.getpid(), signal.SIGKILL)


def then_die(real):
    def run(*a, **k):
        real(*a, **k)
        die()
    return run


if point == "server graph written":
    p._save = then_die(p._save)
elif point == "key written":
    p.write_key = then_die(p.write_key)
elif point == "before the swap":
    p.swap_into_place = die
elif point == "between the two renames":  # the fallback without RENAME_EXCHANGE
    o._exchange = lambda a, b: False
    real, calls = os.rename, []

    def rename(a, b):
        calls.append(a)
        if len(calls) == 2:  # out -> backup done, tmp -> out not yet
            die()
        real(a, b)
    os.rename = rename
elif point == "after the exchange":
    o.shutil.rmtree = die
p.compile_model(model, out, force=True)
"""

BEFORE_SWAP = ["server graph written", "key written", "before the swap"]


def kill_compile(model: Path, out: Path, point: str) -> None:
    r = subprocess.run([sys.executable, "-c", KILLER, str(model), str(out), point], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


@pytest.mark.parametrize("point", [*BEFORE_SWAP, "between the two renames", "after the exchange"])
def test_killed_compile_keeps_a_complete_bundle_and_the_next_one_cleans_up(zoo, old_bundle, tmp_path, point):
    out, old_key = fresh_copy(old_bundle, tmp_path)
    kill_compile(zoo.get("bert"), out, point)
    assert leftovers(tmp_path), "the killed compile left its temp directory behind"
    if point == "between the two renames":
        assert not out.exists() and output.backup_path(out).is_dir()
        with pytest.raises(StipError, match="already exists"):  # the next compile first puts the old one back
            compile_model(zoo.get("bert"), out)
        assert key_id_of_complete_bundle(out) == old_key
    elif point == "after the exchange":
        assert key_id_of_complete_bundle(out) != old_key
    else:
        assert key_id_of_complete_bundle(out) == old_key
    new_key = compile_model(zoo.get("bert"), out, force=True)["key_id"]
    assert key_id_of_complete_bundle(out) == new_key
    assert leftovers(tmp_path) == []


def test_killed_first_compile_leaves_no_key_behind_after_the_next(zoo, tmp_path):
    out = tmp_path / "o"
    kill_compile(zoo.get("bert"), out, "key written")
    assert not out.exists()
    (tmp,) = [p for p in tmp_path.iterdir() if p.name.endswith(".stip-tmp")]
    assert (tmp / "developer" / "key.npz").is_file()
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o700  # nobody else can look inside meanwhile
    compile_model(zoo.get("bert"), out)
    assert leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["o"]


def test_temp_directories_of_a_live_writer_are_not_touched(zoo, tmp_path):
    out = tmp_path / "o"
    with output.locked(out):
        live = output.new_temp(out)
        (live / "developer").mkdir()
        with pytest.raises(StipError, match=r"another stip compile \(pid \d+\) is writing it"):
            compile_model(zoo.get("bert"), out)
        assert live.is_dir() and not out.exists()
    other = tmp_path / ".o.abcdefgh.stip-tmp"  # a name like ours holding something that is not a bundle
    (other / "1").mkdir(parents=True)
    unrelated = tmp_path / ".o.b.0123456789abcdef.stip-tmp"  # the temp directory of an output named "o.b"
    (unrelated / "developer").mkdir(parents=True)
    legacy = tmp_path / ".o.k2_xq9za.stip-tmp"  # mkdtemp's name, from a compile before this module
    (legacy / "developer").mkdir(parents=True)
    compile_model(zoo.get("bert"), out)
    assert not live.exists() and not legacy.exists()
    assert other.is_dir() and unrelated.is_dir()
    assert leftovers(tmp_path) == sorted([other.name, unrelated.name])


# ---- SIGTERM ----

SLOW = r"""
import sys, time
from pathlib import Path
import stip.compiler.pipeline as p
from stip.compiler.cli import main

ready = Path(sys.argv[1])
real = p._save


def save(*a, **k):
    real(*a, **k)
    ready.write_text("writing")
    time.sleep(120)


p._save = save
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_cleans_up_like_ctrl_c(zoo, old_bundle, tmp_path):
    out, old_key = fresh_copy(old_bundle, tmp_path)
    ready = tmp_path.parent / f"{tmp_path.name}.ready"
    proc = subprocess.Popen([sys.executable, "-c", SLOW, str(ready), "compile", str(zoo.get("bert")), "-o",
                             str(out), "--force", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 240
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    assert any(p.name.endswith(".stip-tmp") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "stip: terminated"
    assert leftovers(tmp_path) == [] and key_id_of_complete_bundle(out) == old_key
