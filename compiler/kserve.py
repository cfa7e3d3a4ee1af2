"""`stip export-kserve`: a KServe InferenceService (Triton runtime) for a bundle's server graph.

Why: operators on Kubernetes run the server graph under KServe, with Triton as its serving runtime; clients of
`stip serve` (RemoteClient, tritonclient, HTTP or gRPC) work unchanged against it. What it writes:

    DIR/model-repository/<model>/...   the Triton model repository, by export-triton's writer (no key material);
                                       upload it to --storage-uri (KServe downloads it to /mnt/models)
    DIR/inferenceservice.yaml          serving.kserve.io/v1beta1 InferenceService: modelFormat triton, the storage
                                       URI, resource requests/limits, replicas, protocol v2 (HTTP, or gRPC)
    DIR/destinationrule.yaml           decoders with --replicas > 1 only: sequence affinity (below)

Sequence affinity: a decoder keeps each sequence's KV cache in the replica that served its first step, so every
request of a sequence must reach that replica. KServe itself offers no session affinity. The export therefore uses
one replica for decoders by default (correct by construction). With --replicas N > 1 it switches the predictor to
KServe's RawDeployment mode (a plain Deployment and Service; Knative's activator would not honour a hash) and
writes an Istio DestinationRule that hashes on the `x-stip-sequence` header, which stip's RemoteServer sends with
every sequence request (header over HTTP, metadata over gRPC). That needs Istio sidecars on the client path; other
clients must send the header themselves. Encoders are stateless: any replica serves any request.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from stip.runtime.bundle_format import SERVER_MODEL, find_server_dir, model_key_id, pair_cache
from stip.runtime.errors import StipError
from stip.runtime.remote import SEQUENCE_HEADER

MANIFEST = "inferenceservice.yaml"
AFFINITY = "destinationrule.yaml"
REPOSITORY = "model-repository"
KEY_ID_ANNOTATION = "stip.dev/key-id"
GRPC_PORT = 9000                   # the port KServe's Triton runtime serves gRPC on (h2c)
STORAGE_SCHEMES = ("gs", "s3", "pvc", "https", "http", "hdfs", "webhdfs", "oci", "hf", "azure")
NAME = re.compile(r"^[a-z]([-a-z0-9]{0,43}[a-z0-9])?$")   # DNS-1035 label; KServe adds suffixes to 63
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def to_yaml(v) -> str:
    """Block-style YAML for dicts, lists and scalars; strings JSON-quoted (valid YAML, nothing ambiguous)."""

    def scalar(x) -> str:
        if isinstance(x, bool):
            return "true" if x else "false"
        if isinstance(x, (int, float)):
            return str(x)
        if isinstance(x, (dict, list)):
            return "{}" if isinstance(x, dict) else "[]"
        return json.dumps(str(x))

    def emit(x, ind: str) -> list[str]:
        lines: list[str] = []
        if isinstance(x, dict):
            for k, val in x.items():
                if isinstance(val, (dict, list)) and val:
                    lines += [f"{ind}{k}:", *emit(val, ind + "  ")]
                else:
                    lines.append(f"{ind}{k}: {scalar(val)}")
        else:
            for item in x:
                if isinstance(item, dict) and item:
                    sub = emit(item, ind + "  ")
                    lines += [ind + "- " + sub[0][len(ind) + 2:], *sub[1:]]
                else:
                    lines.append(f"{ind}- {scalar(item)}")
        return lines

    return "\n".join(emit(v, "")) + "\n"


def check_quantity(flag: str, value: str | None) -> None:
    if value is not None and not QUANTITY.match(value):
        raise StipError(f"{flag} {value!r}: not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")


def manifest(name: str, model_name: str, storage_uri: str, key_id: str, stateful: bool, *, namespace: str | None,
             replicas: int, cpu: str, memory: str, cpu_limit: str | None, memory_limit: str | None, gpus: int,
             grpc: bool, runtime: str | None) -> tuple[dict, dict | None]:
    """The InferenceService, and the Istio DestinationRule when a decoder runs on several replicas."""
    meta: dict = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    sticky = stateful and replicas > 1
    annotations = {KEY_ID_ANNOTATION: key_id, "stip.dev/model-name": model_name}
    if sticky:
        annotations["serving.kserve.io/deploymentMode"] = "RawDeployment"
    meta["annotations"] = annotations
    limits = {"cpu": cpu_limit or cpu, "memory": memory_limit or memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    model: dict = {"modelFormat": {"name": "triton"}}
    if runtime:
        model["runtime"] = runtime
    model["protocolVersion"] = "grpc-v2" if grpc else "v2"
    model["storageUri"] = storage_uri
    model["resources"] = {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}
    if grpc:
        model["ports"] = [{"name": "h2c", "protocol": "TCP", "containerPort": GRPC_PORT}]
    predictor = {"minReplicas": 1, "maxReplicas": replicas if not stateful or sticky else 1, "model": model}
    isvc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": meta,
            "spec": {"predictor": predictor}}
    rule = None
    if sticky:
        host = f"{name}-predictor" + (f".{namespace}.svc.cluster.local" if namespace else "")
        rule = {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
                "metadata": {"name": f"{name}-sequence-affinity", **({"namespace": namespace} if namespace else {})},
                "spec": {"host": host, "trafficPolicy": {"loadBalancer": {
                    "consistentHash": {"httpHeaderName": SEQUENCE_HEADER}}}}}
    return isvc, rule


def export_kserve(bundle: str | Path, out_dir: str | Path, storage_uri: str, *, name: str = "stip",
                  model_name: str = "stip", namespace: str | None = None, replicas: int = 1, cpu: str = "1",
                  memory: str = "2Gi", cpu_limit: str | None = None, memory_limit: str | None = None, gpus: int = 0,
                  grpc: bool = False, runtime: str | None = None, force: bool = False,
                  max_batch_size: int | None = None, sequence_timeout: float = 300.0,
                  max_sequences: int = 64) -> Path:
    """Write DIR (see the module docstring) atomically; returns DIR. Nothing is left behind on failure."""
    from stip.compiler.triton import export_triton, graph_tensors

    if not NAME.match(name):
        raise StipError(f"--name {name!r}: an InferenceService name is lowercase letters, digits and '-', starts "
                        "with a letter, at most 45 characters")
    if namespace is not None and not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", namespace):
        raise StipError(f"--namespace {namespace!r}: not a Kubernetes namespace name")
    scheme = storage_uri.split("://", 1)[0] if "://" in storage_uri else ""
    if scheme not in STORAGE_SCHEMES or storage_uri.endswith("://"):
        raise StipError(f"--storage-uri {storage_uri!r}: expected a URI KServe can download, e.g. "
                        "s3://bucket/path, gs://bucket/path or pvc://claim/path")
    if replicas < 1:
        raise StipError(f"--replicas {replicas}: expected 1 or more")
    if gpus < 0:
        raise StipError(f"--gpus {gpus}: expected 0 or more")
    for flag, v in (("--cpu", cpu), ("--memory", memory), ("--cpu-limit", cpu_limit),
                    ("--memory-limit", memory_limit)):
        check_quantity(flag, v)
    src = find_server_dir(bundle)
    key_id = model_key_id(src / SERVER_MODEL)
    ins, outs = graph_tensors(src / SERVER_MODEL)
    stateful = bool(pair_cache([t.name for t in ins], [t.name for t in outs], str(src / SERVER_MODEL)))
    isvc, rule = manifest(name, model_name, storage_uri, key_id, stateful, namespace=namespace, replicas=replicas,
                          cpu=cpu, memory=memory, cpu_limit=cpu_limit, memory_limit=memory_limit, gpus=gpus,
                          grpc=grpc, runtime=runtime)
    validate(isvc)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StipError(f"{out}: exists and is not a directory")
    ours = out.is_dir() and (out / MANIFEST).is_file() and (out / REPOSITORY).is_dir()
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise StipError(f"{out}: already exists and is not empty; pass --force to replace an earlier "
                            "export-kserve output")
        if not ours:
            raise StipError(f"{out}: not written by stip export-kserve (no {MANIFEST} and {REPOSITORY}/); "
                            "--force replaces only those: choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".stip-tmp", dir=out.parent))
    try:
        export_triton(src, tmp / REPOSITORY, name=model_name, max_batch_size=max_batch_size,
                      sequence_timeout=sequence_timeout, max_sequences=max_sequences)
        (tmp / MANIFEST).write_text(to_yaml(isvc))
        if rule is not None:
            (tmp / AFFINITY).write_text(to_yaml(rule))
        tmp.chmod(0o755)
        old = out.parent / f".{out.name}.stip-old"
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# The fields this export writes, with their types, as KServe v1beta1 (0.21) and Kubernetes core v1 define them.
# tests/test_kserve.py checks this table against the generated OpenAPI models that the kserve and kubernetes
# wheels ship (they hold no CRD file); validate() checks each manifest against it before anything is written.
SCHEMA: dict = {
    "InferenceService": {"apiVersion": str, "kind": str, "metadata": "ObjectMeta", "spec": "InferenceServiceSpec"},
    "ObjectMeta": {"name": str, "namespace": str, "annotations": {str: str}},
    "InferenceServiceSpec": {"predictor": "PredictorSpec"},
    "PredictorSpec": {"minReplicas": int, "maxReplicas": int, "model": "ModelSpec"},
    "ModelSpec": {"modelFormat": "ModelFormat", "runtime": str, "protocolVersion": str, "storageUri": str,
                  "resources": "ResourceRequirements", "ports": ["ContainerPort"]},
    "ModelFormat": {"name": str, "version": str},
    "ResourceRequirements": {"requests": {str: str}, "limits": {str: str}},
    "ContainerPort": {"name": str, "protocol": str, "containerPort": int},
}
REQUIRED = {"ModelSpec": {"modelFormat"}, "ModelFormat": {"name"}, "ContainerPort": {"containerPort"},
            "PredictorSpec": {"model"}, "InferenceService": {"apiVersion", "kind", "metadata", "spec"}}


def validate(obj: dict, kind: str = "InferenceService", where: str = "") -> None:
    """Structural validation against SCHEMA: known fields only, the right types, the required fields present."""
    fields = SCHEMA[kind]
    for req in REQUIRED.get(kind, ()):
        if req not in obj:
            raise StipError(f"manifest{where}: {kind} needs '{req}' (a bug in stip export-kserve)")
    for k, v in obj.items():
        if k not in fields:
            raise StipError(f"manifest{where}.{k}: not a field of KServe's {kind} (a bug in stip export-kserve)")
        _check(v, fields[k], f"{where}.{k}")


def _check(v, t, where: str) -> None:
    bad = StipError(f"manifest{where}: {v!r:.60} is not a {t!r:.40} (a bug in stip export-kserve)")
    if isinstance(t, str):
        if not isinstance(v, dict):
            raise bad
        validate(v, t, where)
    elif isinstance(t, list):
        if not isinstance(v, list):
            raise bad
        for n, x in enumerate(v):
            _check(x, t[0], f"{where}[{n}]")
    elif isinstance(t, dict):
        if not isinstance(v, dict) or not all(isinstance(a, str) and isinstance(b, str) for a, b in v.items()):
            raise bad
    elif t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad
    elif not isinstance(v, t):
        raise bad
