"""`stip export-kserve`: the InferenceService is valid against KServe's own schema (the generated OpenAPI models in
the kserve 0.21 and kubernetes wheels, see tests/kserve_schema.py), points Triton at the storage URI with the
requested resources, keeps a decoder's sequences on one replica (one replica, or RawDeployment and an Istio
consistent hash on x-stip-sequence), ships export-triton's repository unchanged and nothing of the key; CLI errors
are one line with exit 2, and --force replaces only an earlier export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kserve_schema
import pytest
import yaml

from stip.compiler.kserve import SCHEMA, export_kserve
from stip.compiler.pipeline import compile_model
from stip.compiler.triton import export_triton
from stip.runtime.bundle_format import model_key_id

CLI = [sys.executable, "-m", "stip.compiler.cli"]


@pytest.fixture(scope="module")
def bundles(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("kserve-bundles")
    out = {"bert": root / "bert", "gpt2": root / "gpt2"}
    compile_model(zoo.get("bert"), out["bert"])
    compile_model(zoo.get("gpt2-cache"), out["gpt2"], max_context=32)
    return out


@pytest.fixture(scope="module")
def schema():
    ws = kserve_schema.wheels()
    if isinstance(ws, str):
        pytest.skip(ws)
    return kserve_schema


def test_schema_table_matches_kserve(schema):
    """The field table that export-kserve validates against names real KServe/Kubernetes fields of those types."""
    classes = {"InferenceService": "V1beta1InferenceService", "ObjectMeta": "V1ObjectMeta",
               "InferenceServiceSpec": "V1beta1InferenceServiceSpec", "PredictorSpec": "V1beta1PredictorSpec",
               "ModelSpec": "V1beta1ModelSpec", "ModelFormat": "V1beta1ModelFormat",
               "ResourceRequirements": "V1ResourceRequirements", "ContainerPort": "V1ContainerPort"}
    prim = {str: "str", int: "int"}
    for kind, fields in SCHEMA.items():
        types, amap, _ = schema.classes()[classes[kind]]
        by_json = {v: k for k, v in amap.items()}
        for f, t in fields.items():
            if isinstance(t, str):
                want = classes[t]
            elif isinstance(t, list):
                want = f"list[{classes[t[0]]}]"
            elif isinstance(t, dict):
                want = "dict(str, str)"
            else:
                want = prim[t]
            assert types[by_json[f]] == want, (kind, f)


def test_encoder_manifest(schema, bundles, tmp_path):
    out = export_kserve(bundles["bert"], tmp_path / "isvc", "s3://models/stip-bert", name="bert-stip",
                        model_name="bert", namespace="ml", replicas=4, cpu="500m", memory="1Gi", memory_limit="2Gi",
                        gpus=1)
    isvc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert schema.validate(isvc) == []
    model = isvc["spec"]["predictor"]["model"]
    assert isvc["kind"] == "InferenceService" and isvc["metadata"] == {
        "name": "bert-stip", "namespace": "ml", "annotations": {
            "stip.dev/key-id": model_key_id(bundles["bert"] / "server" / "model.onnx"), "stip.dev/model-name": "bert"}}
    assert model["modelFormat"] == {"name": "triton"} and model["storageUri"] == "s3://models/stip-bert"
    assert model["protocolVersion"] == "v2" and "ports" not in model
    assert model["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"},
                                  "limits": {"cpu": "500m", "memory": "2Gi", "nvidia.com/gpu": "1"}}
    assert isvc["spec"]["predictor"]["maxReplicas"] == 4  # stateless: any replica
    assert not (out / "destinationrule.yaml").exists()
    # the repository is export-triton's, byte for byte
    ref = export_triton(bundles["bert"], tmp_path / "ref", name="bert")
    got = out / "model-repository" / "bert"
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file())
    for f in files:
        assert (ref / f).read_bytes() == (got / f).read_bytes(), f
    assert not list((out.parent).glob(".*stip-tmp")) and not list(out.parent.glob(".*stip-old"))


def test_decoder_sequence_affinity(schema, bundles, tmp_path):
    one = export_kserve(bundles["gpt2"], tmp_path / "one", "gs://b/gpt2")
    isvc = yaml.safe_load((one / "inferenceservice.yaml").read_text())
    assert schema.validate(isvc) == []
    assert isvc["spec"]["predictor"]["maxReplicas"] == 1 and not (one / "destinationrule.yaml").exists()
    assert (one / "model-repository" / "stip" / "1" / "model.py").is_file()  # the Python backend model
    many = export_kserve(bundles["gpt2"], tmp_path / "many", "gs://b/gpt2", name="gpt2", replicas=3, grpc=True)
    isvc = yaml.safe_load((many / "inferenceservice.yaml").read_text())
    assert schema.validate(isvc) == []
    pred = isvc["spec"]["predictor"]
    assert pred["maxReplicas"] == 3 and isvc["metadata"]["annotations"][
        "serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert pred["model"]["protocolVersion"] == "grpc-v2"
    assert pred["model"]["ports"] == [{"name": "h2c", "protocol": "TCP", "containerPort": 9000}]
    rule = yaml.safe_load((many / "destinationrule.yaml").read_text())
    assert rule["spec"] == {"host": "gpt2-predictor", "trafficPolicy": {"loadBalancer": {
        "consistentHash": {"httpHeaderName": "x-stip-sequence"}}}}


def test_no_key_material(bundles, tmp_path):
    from test_triton import _needles

    for name in ("bert", "gpt2"):
        out = export_kserve(bundles[name], tmp_path / name, "s3://b/p", replicas=2)
        needles = _needles(bundles[name])
        assert needles
        for f in out.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                assert not any(n in data for n in needles.values()), f


def test_cli(bundles, tmp_path):
    def run(*args):
        return subprocess.run([*CLI, "export-kserve", *map(str, args)], capture_output=True, text=True, timeout=120)

    r = run("--help")
    assert r.returncode == 0 and "--storage-uri" in r.stdout and "x-stip-sequence" in r.stdout
    out = tmp_path / "isvc"
    r = run(bundles["bert"], "-o", out, "--storage-uri", "s3://b/bert")
    assert r.returncode == 0 and "kubectl apply" in r.stdout, r.stderr
    stamp = (out / "inferenceservice.yaml").read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    for args, needle in (((bundles["bert"], "-o", tmp_path / "x", "--storage-uri", "/local/path"), "--storage-uri"),
                         ((bundles["bert"], "-o", tmp_path / "x", "--storage-uri", "s3://b", "--name", "Bad_Name"),
                          "--name"),
                         ((bundles["bert"], "-o", tmp_path / "x", "--storage-uri", "s3://b", "--memory", "lots"),
                          "--memory"),
                         ((bundles["bert"], "-o", tmp_path / "x", "--storage-uri", "s3://b", "--replicas", "0"),
                          "--replicas"),
                         ((tmp_path / "nope", "-o", tmp_path / "x", "--storage-uri", "s3://b"), "nope"),
                         ((bundles["bert"], "-o", out, "--storage-uri", "s3://b"), "--force"),
                         ((bundles["bert"], "-o", other, "--storage-uri", "s3://b", "--force"), "not written by")):
        r = run(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists() and (other / "precious.txt").read_text() == "keep me"
    assert (out / "inferenceservice.yaml").read_text() == stamp
    r = run(bundles["gpt2"], "-o", out, "--storage-uri", "s3://b/gpt2", "--force", "--replicas", "2")
    assert r.returncode == 0, r.stderr
    assert "s3://b/gpt2" in (out / "inferenceservice.yaml").read_text() and (out / "destinationrule.yaml").exists()
    assert (out / "model-repository" / "stip" / "1" / "model.py").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert Path(out).is_dir()
