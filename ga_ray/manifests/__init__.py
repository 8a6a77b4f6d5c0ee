"""Offline validation of the cluster manifests under `cluster/`.

- Ray cluster-launcher YAML (`cluster/gpu-cluster.yaml`): Ray's own schema, the `ray/autoscaler/ray-schema.json`
  that the Ray wheel ships (the one `ray up` checks), so a typo'd top-level key fails here before a cluster starts.
- KubeRay `RayJob` / `RayService` (`cluster/rayjob.yaml`, `cluster/rayservice.yaml`): the `openAPIV3Schema` of the
  KubeRay CRDs (v1), vendored in `schemas/` (Apache-2.0; source and commit in `schemas/SOURCE.md`). Kubernetes
  silently prunes unknown fields, so a typo such as `entryPoint` would be dropped at apply time; we make every object
  that lists its properties closed (`additionalProperties: false`) unless the CRD says it keeps unknown fields.

`validate_manifest(path)` returns the problems as readable strings (empty: valid); `ga-ray validate-manifests`
prints them.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

SCHEMAS = Path(__file__).parent / "schemas"
KUBERAY_KINDS = {"RayJob": "rayjob.v1.openapi.json.gz", "RayService": "rayservice.v1.openapi.json.gz"}


def closed(schema: Any) -> Any:
    """A copy of an OpenAPI schema in which objects with listed properties reject unknown keys."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def kuberay_schema(kind: str) -> dict[str, Any]:
    schema = json.loads(gzip.decompress((SCHEMAS / KUBERAY_KINDS[kind]).read_bytes()))
    schema = closed(schema)
    # the CRD leaves the top-level `metadata` open (Kubernetes validates it); name/namespace/labels are what users set
    schema["properties"]["metadata"] = {"type": "object"}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


@lru_cache(maxsize=None)
def ray_launcher_schema() -> dict[str, Any]:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    out = []
    for err in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        msg = err.message
        if err.validator == "additionalProperties":
            msg = msg.replace("Additional properties are not allowed", "unknown key(s)")
        out.append(f"{where}: {msg}")
    return out


def _unknown_keys(obj: Any, model: Any, where: str) -> list[str]:
    if not isinstance(obj, dict):
        return []
    unknown = sorted(set(obj) - set(model.model_fields))
    return [f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(model.model_fields))}"] if unknown else []


def validate_serve_config(config: Any, where: str = "(top level)") -> list[str]:
    """Problems of a Ray Serve config (`serve deploy`/`serve run` file, or a RayService's serveConfigV2), checked by
    Ray Serve's own `ServeDeploySchema`; a `ga_ray.` import path must name a module of this package."""
    import importlib.util

    from pydantic import ValidationError as PydanticV2Error
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    try:
        parsed = ServeDeploySchema.parse_obj(config)
    except Exception as exc:  # pydantic v1 or v2 ValidationError, as Ray's schema module uses either
        if not isinstance(exc, (PydanticV2Error, ValueError, TypeError)):
            raise
        return [f"{where}: {line}" for line in str(exc).splitlines() if line.strip()]
    # Serve's schema ignores unknown keys (a typo'd `route_prefx` would be dropped): check them against its fields
    problems = _unknown_keys(config, ServeDeploySchema, where)
    for i, app_cfg in enumerate(config.get("applications") or []):
        problems += _unknown_keys(app_cfg, ServeApplicationSchema, f"{where}: applications.{i}")
        for j, dep in enumerate(app_cfg.get("deployments") or []):
            problems += _unknown_keys(dep, DeploymentSchema, f"{where}: applications.{i}.deployments.{j}")
    for app in parsed.applications:
        module = app.import_path.replace(":", ".").rsplit(".", 1)[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a missing parent package
            found = False
        if module.startswith("ga_ray.") and not found:
            problems.append(f"{where}: application {app.name!r}: import_path {app.import_path!r}: no module {module!r}")
    return problems


def validate_document(doc: Any) -> list[str]:
    """Problems of one parsed manifest: a KubeRay RayJob/RayService, a Ray Serve config, or a Ray cluster-launcher
    config."""
    if not isinstance(doc, dict):
        return [f"(top level): expected a mapping, got {type(doc).__name__}"]
    if "applications" in doc and "kind" not in doc:
        return validate_serve_config(doc)
    kind = doc.get("kind")
    if kind is not None or "apiVersion" in doc:
        if kind not in KUBERAY_KINDS:
            return [f"kind: {kind!r} is not one of {', '.join(KUBERAY_KINDS)}"]
        problems = []
        if doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"apiVersion: expected 'ray.io/v1', got {doc.get('apiVersion')!r}")
        problems += _errors(doc, kuberay_schema(kind))
        serve_text = (doc.get("spec") or {}).get("serveConfigV2") if kind == "RayService" else None
        if isinstance(serve_text, str):
            try:
                problems += validate_serve_config(yaml.safe_load(serve_text), "spec.serveConfigV2")
            except yaml.YAMLError as exc:
                problems.append(f"spec.serveConfigV2: not valid YAML: {exc}")
        return problems
    return _errors(doc, ray_launcher_schema())


def validate_manifest(path: str | Path) -> list[str]:
    """Problems of every YAML document in `path`, each prefixed with the file name."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        return [f"{path}: not valid YAML: {exc}"]
    except OSError as exc:
        return [f"{path}: cannot read: {exc.strerror}"]
    if not docs:
        return [f"{path}: empty"]
    return [f"{path}: {p}" for doc in docs for p in validate_document(doc)]
