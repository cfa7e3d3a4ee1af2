"""KServe's own schema for an InferenceService, from the generated OpenAPI models that the kserve and kubernetes
wheels ship (neither wheel holds the CRD file itself). The wheels are fetched once (`pip download --no-deps`) into
~/.cache/stip/kserve-schema (or $STIP_KSERVE_SCHEMA) and read as source text with `ast`: nothing is imported or
installed, so the project's environment does not change."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from functools import cache
from pathlib import Path

# kubernetes 33: the last client whose models are the classic generated classes (37 moved to pydantic)
WHEELS = ("kserve==0.21.0", "kubernetes==33.1.0")
CACHE = Path(os.environ.get("STIP_KSERVE_SCHEMA") or Path.home() / ".cache" / "stip" / "kserve-schema")


def wheels() -> list[Path] | str:
    """The two wheels, downloaded on first use; a reason string when they cannot be had."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = [next(iter(sorted(CACHE.glob(f"{w.split('==')[0]}-{w.split('==')[1]}-*.whl"))), None) for w in WHEELS]
    if all(found):
        return found
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), *WHEELS],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return f"cannot download {', '.join(WHEELS)}: {r.stderr.strip().splitlines()[-1:]}"
    return wheels()


@cache
def classes() -> dict[str, tuple[dict, dict, set]]:
    """class name -> (openapi_types, attribute_map, required python names), for every generated model."""
    out: dict = {}
    ws = wheels()
    assert not isinstance(ws, str), ws
    for whl in ws:
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                if not re.match(r"^(kserve/models|kubernetes/client/models)/v\w+\.py$", name):
                    continue
                src = z.read(name).decode()
                for node in ast.parse(src).body:
                    if not isinstance(node, ast.ClassDef):
                        continue
                    attrs = {t.targets[0].id: ast.literal_eval(t.value) for t in node.body
                             if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name)
                             and t.targets[0].id in ("openapi_types", "attribute_map")}
                    required = set(re.findall(r"Invalid value for `(\w+)`, must not be `None`", src))
                    out[node.name] = (attrs.get("openapi_types", {}), attrs.get("attribute_map", {}), required)
    return out


def validate(obj, type_name: str = "V1beta1InferenceService", where: str = "") -> list[str]:
    """Every problem of `obj` against the generated model `type_name`: unknown fields, wrong types, missing
    required fields. An empty list means valid."""
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        if not isinstance(obj, list):
            return [f"{where}: expected a list"]
        return [p for n, x in enumerate(obj) for p in validate(x, m.group(1), f"{where}[{n}]")]
    m = re.fullmatch(r"dict\((\w+), (.+)\)", type_name)
    if m:
        if not isinstance(obj, dict):
            return [f"{where}: expected a map"]
        return [p for k, x in obj.items() for p in validate(x, m.group(2), f"{where}.{k}")]
    prim = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if type_name in prim:
        ok = isinstance(obj, prim[type_name]) and not (type_name == "int" and isinstance(obj, bool))
        return [] if ok else [f"{where}: {obj!r} is not {type_name}"]
    types, amap, required = classes()[type_name]
    if not isinstance(obj, dict):
        return [f"{where}: expected an object ({type_name})"]
    by_json = {v: k for k, v in amap.items()}
    problems = [f"{where}.{amap[r]}: required by {type_name}" for r in required if amap[r] not in obj]
    for k, v in obj.items():
        if k not in by_json:
            problems.append(f"{where}.{k}: not a field of {type_name}")
        else:
            problems += validate(v, types[by_json[k]], f"{where}.{k}")
    return problems
