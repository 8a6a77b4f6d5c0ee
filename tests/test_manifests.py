"""The cluster manifests validate offline (Ray's launcher schema, the vendored KubeRay CRD schemas, Ray Serve's
config schema), a typo'd key fails, and the install commands inside them install this package."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from ga_ray.manifests import validate_document, validate_manifest

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "cluster").glob("*.yaml"))


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def test_there_are_manifests():
    names = {p.name for p in MANIFESTS}
    assert {"gpu-cluster.yaml", "rayjob.yaml", "rayservice.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(path: Path):
    assert validate_manifest(path) == []


def _set(doc: dict, dotted: str, value) -> None:
    node = doc
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[parts[-1]] = value


TYPOS = [
    ("gpu-cluster.yaml", "setup_command", [], "setup_command"),  # launcher top level
    ("gpu-cluster.yaml", "available_node_types.gpu_worker.max_worker", 3, "max_worker"),
    ("rayjob.yaml", "spec.entryPoint", "python x.py", "entryPoint"),
    ("rayjob.yaml", "spec.rayClusterSpec.workerGroupSpecs.0.replica", 2, "replica"),
    ("rayjob.yaml", "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.imagePullPolicyy", "Always", "imagePullPolicyy"),
    ("rayservice.yaml", "spec.rayClusterConfig.workerGroupSpecs.0.template.spec.volumez", [], "volumez"),
    ("rayservice.yaml", "spec.serviceUnhealthySecondThresholdd", 5, "serviceUnhealthySecondThresholdd"),
]


@pytest.mark.parametrize("name,dotted,value,key", TYPOS, ids=[t[1] for t in TYPOS])
def test_typod_key_fails(name: str, dotted: str, value, key: str):
    doc = copy.deepcopy(_load(name))
    _set(doc, dotted, value)
    problems = validate_document(doc)
    assert problems and any(key in p for p in problems), problems


def test_wrong_type_fails():
    doc = _load("rayjob.yaml")
    doc["spec"]["shutdownAfterJobFinishes"] = "yes please"
    assert any("shutdownAfterJobFinishes" in p for p in validate_document(doc))


def test_serve_config_inside_rayservice_is_checked():
    doc = _load("rayservice.yaml")
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("route_prefix", "route_prefx")
    assert any("route_prefx" in p for p in validate_document(doc))
    doc = _load("rayservice.yaml")
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace("ga_ray.serve.app", "ga_ray.serve.nope")
    assert any("no module 'ga_ray.serve.nope'" in p for p in validate_document(doc))


def test_wrong_kind_and_api_version():
    doc = _load("rayjob.yaml")
    doc["apiVersion"] = "ray.io/v1alpha2"
    assert any("apiVersion" in p for p in validate_document(doc))
    doc["kind"] = "RayJobs"
    assert any("kind" in p for p in validate_document(doc))


def test_launcher_installs_this_checkout():
    """file_mounts copies the checkout `ray up` runs from; setup_commands pip-install exactly that folder."""
    cfg = _load("gpu-cluster.yaml")
    mounts = cfg["file_mounts"]
    (remote, local), = mounts.items()
    assert (ROOT / local).resolve() == ROOT  # `ray up cluster/gpu-cluster.yaml` runs from the checkout's root
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert name == "ga-ray"
    remote_home = remote.replace("~", "$HOME")
    installs = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert installs and any(remote_home in c for c in installs), installs
    # Ray is started from the same environment that ga-ray was installed into (a job's `python` is that one)
    env_bins = {m.group(1) for c in installs for m in [re.match(r"(\S+)/pip install", c)] if m}
    assert env_bins
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert any(cmd.startswith(f"{b}/ray ") for b in env_bins), cmd


def test_kuberay_image_installs_this_checkout():
    """The manifests' image is built by cluster/Dockerfile, which copies the checkout and pip-installs it."""
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    copy_line = next(line for line in docker.splitlines() if line.startswith("COPY"))
    dest = copy_line.split()[-1]
    assert copy_line.split()[-2] == "."
    assert re.search(rf'pip install[^\n]*"{re.escape(dest)}(\[[a-z,]+\])?"', docker)
    image = re.search(r"-t (\S+)", docker).group(1)
    for name in ("rayjob.yaml", "rayservice.yaml"):
        text = (ROOT / "cluster" / name).read_text()
        assert f"image: {image}" in text
