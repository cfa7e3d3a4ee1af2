"""The bundle format has one home (stip.runtime.bundle_format), its manifest is validated with errors that name
the file and the field, and a client or server process loads only the runtime, never the compiler or the passes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_equivalent, run_model
from test_cli import _assert_user_error, stip

from stip.runtime.bundle import Client
from stip.runtime.bundle_format import Layout, Manifest, find_client_dir, find_server_dir, not_a_bundle
from stip.runtime.errors import StipError
from stip.runtime.verify import random_feeds

CLIENT_SIDE = r"""
import json, sys
import numpy as np
from stip.runtime import bundle_format, launch, serve
from stip.runtime.bundle import LocalDeployment
from stip.runtime.generate import StipGenerator
from stip.runtime.remote import RemoteClient, RemoteServer

root, feeds, result = sys.argv[1:4]
with np.load(feeds) as z:
    out = LocalDeployment(root, "cpu").run({k: z[k] for k in z.files})
np.savez(result, **out)
StipGenerator(root + "/client", device="cpu")
model = serve.Model("stip", root, device="cpu")
config = model.config()
assert config["parameters"][bundle_format.KEY_ID_PARAMETER]["string_value"] == model.key_id
print(json.dumps(sorted(m for m in sys.modules if m.startswith("stip."))))
"""

CLI = r"""
import json, sys
from stip.compiler.cli import main
rc = main(sys.argv[1:])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("stip."))))
sys.exit(rc)
"""


def _python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_client_and_server_processes_load_only_the_runtime(bert_bundle, tmp_path):
    model, out = bert_bundle
    feeds = random_feeds(model, batch=2, seq=7, seed=3)
    np.savez(tmp_path / "feeds.npz", **feeds)
    r = _python(CLIENT_SIDE, out, tmp_path / "feeds.npz", tmp_path / "result.npz")
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert "stip.runtime.serve" in loaded and "stip.runtime.triton_config" in loaded
    assert [m for m in loaded if not m.startswith("stip.runtime")] == [], loaded
    with np.load(tmp_path / "result.npz") as z:
        assert_equivalent(run_model(model, feeds), {k: z[k] for k in z.files})


def test_stip_run_loads_only_the_command_line_and_the_runtime(bert_bundle, tmp_path):
    model, out = bert_bundle
    feeds = random_feeds(model, batch=1, seq=5, seed=4)
    np.savez(tmp_path / "feeds.npz", **feeds)
    r = _python(CLI, "run", out, "--inputs", tmp_path / "feeds.npz", "-o", tmp_path / "result.npz", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if not m.startswith("stip.runtime")] == ["stip.compiler", "stip.compiler.cli"]
    with np.load(tmp_path / "result.npz") as z:
        assert_equivalent(run_model(model, feeds), {k: z[k] for k in z.files})


# ---- the manifest ----

def _manifest_dict(bert_bundle) -> dict:
    return json.loads(Layout(bert_bundle[1]).manifest.read_text())


def test_manifest_round_trip_keeps_fields_it_does_not_know(bert_bundle, tmp_path):
    d = _manifest_dict(bert_bundle) | {"from_a_newer_stip": {"x": 1}}
    m = Manifest.from_dict(d)
    assert m.extra == {"from_a_newer_stip": {"x": 1}} and m["from_a_newer_stip"] == {"x": 1}
    assert m["inputs"] == m.inputs and m.get("cache") == [] and m.get("nothing", 5) == 5
    m.write(tmp_path / "stip.json")
    assert json.loads((tmp_path / "stip.json").read_text()) == d


@pytest.mark.parametrize("field,value,needle", [
    ("key_id", None, "field 'key_id' is missing"),
    ("inputs", "input_ids", "field 'inputs' must be a list of input names"),
    ("cache", [["past_key_values.0.key"]], "field 'cache' must be a list of [cache input, cache output] pairs"),
    ("head", "cloud", "field 'head' must be 'server' or 'client'"),
    ("tokenizer", "../../etc", "field 'tokenizer' must be null or the name of a directory inside client/"),
    ("max_context", -3, "field 'max_context' must be a positive integer or null"),
])
def test_a_damaged_manifest_is_one_error_naming_file_and_field(bert_bundle, tmp_path, field, value, needle):
    root = tmp_path / "b"
    shutil.copytree(bert_bundle[1], root)
    d = _manifest_dict(bert_bundle)
    if value is None:
        del d[field]
    else:
        d[field] = value
    path = Layout(root).manifest
    path.write_text(json.dumps(d))
    with pytest.raises(StipError) as e:
        Client(root / "client")
    assert str(e.value).startswith(f"{path}: {needle}")
    assert not_a_bundle(root) == str(e.value)  # and --force will not replace it
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, **random_feeds(bert_bundle[0], batch=1, seq=4))
    _assert_user_error(stip("run", root, "--inputs", feeds, "--device", "cpu"), "stip.json", f"'{field}'")


def test_manifest_that_is_not_json_or_not_an_object(tmp_path):
    p = tmp_path / "stip.json"
    p.write_text("[1, 2]")
    with pytest.raises(StipError, match=r"stip.json: expected a JSON object, got list"):
        Manifest.read(p)
    p.write_text("{")
    with pytest.raises(StipError, match=r"stip.json: not valid JSON"):
        Manifest.read(p)
    with pytest.raises(StipError, match=r"nope.json: cannot read the bundle manifest"):
        Manifest.read(tmp_path / "nope.json")


def test_locating_parts_of_a_bundle(bert_bundle, tmp_path):
    root = bert_bundle[1]
    assert find_client_dir(root) == find_client_dir(root / "client") == root / "client"
    assert find_server_dir(root) == find_server_dir(root / "server") == root / "server"
    with pytest.raises(StipError, match="no client/stip.json"):
        find_client_dir(root / "server")
    with pytest.raises(StipError, match="not a stip server bundle"):
        find_server_dir(tmp_path)
    assert not_a_bundle(root) is None
