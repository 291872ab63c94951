"""``deploy/kubernetes.yaml`` and ``bentofile.yaml`` against the service they deploy.

The manifest is parsed (PyYAML) and its ports, probes, metrics annotations, GPU request, secrets and
shared label volume are compared with what the service really serves: BentoML's default port (the
image's ``bentoml serve`` and ``make run``), the routes of ``FaCTService.to_asgi()``, the probe paths
the service never sheds, and the settings parser (every FACT_* value in the manifest must parse).
The Bento side: every project module the service can import is packed by ``bentofile.yaml``, and
every third-party package it imports is pinned there (or comes with a pinned one or with BentoML).
The slow test GETs the probe and metrics paths from a real ``bentoml serve`` with the manifest's
worker setting.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
from pathlib import Path
from typing import Any

import bentoml
import pytest
import yaml

from service import settings as settings_module
from service.limits import PROBES
from service.settings import Settings
from tests._support.server import REPO, http, metrics_text_of, running_server

MANIFEST = REPO / "deploy" / "kubernetes.yaml"
BENTOFILE = REPO / "bentofile.yaml"
PACKAGES = ("fact_model", "kernels", "service")
NOT_SERVED = {"onnx": "imported only inside fact_model.onnx_export.export_onnx (`fact export-onnx`)"}
"""Third-party modules that modules of the service import, but only in code the service never runs."""


def _documents() -> dict[str, dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


@pytest.fixture(scope="module")
def manifest() -> dict[str, dict[str, Any]]:
    return _documents()


@pytest.fixture(scope="module")
def container(manifest) -> dict[str, Any]:
    (only,) = manifest["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def _port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a named container port) as a number."""
    if isinstance(port, int):
        return port
    (named,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return named


def _served_port() -> int:
    """BentoML's default HTTP port, which the containerized Bento serves on; ``make run`` uses it too."""
    defaults = Path(bentoml.__file__).parent / "_internal" / "configuration" / "v2" / "default_configuration.yaml"
    port = yaml.safe_load(defaults.read_text())["services"]["http"]["port"]
    make_port = re.search(r"^PORT \?= (\d+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert make_port is not None and int(make_port.group(1)) == port
    return port


def _route_paths(app: Any, prefix: str = "") -> set[str]:
    paths = set()
    for route in getattr(app, "routes", []):
        path = prefix + getattr(route, "path", "")
        paths |= _route_paths(route, path) if getattr(route, "routes", None) else {path}
    return paths


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container["env"]}


def test_container_port_is_the_port_the_service_serves_on(manifest, container):
    port = _served_port()
    assert [p["containerPort"] for p in container["ports"]] == [port]
    (service_port,) = manifest["Service"]["spec"]["ports"]
    assert _port(container, service_port["targetPort"]) == port
    pod_labels = manifest["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert manifest["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert manifest["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert manifest["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_probes_use_the_services_health_routes(container):
    from service.service import FaCTService

    routes = _route_paths(FaCTService.to_asgi())
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes, (probe, get["path"])
        assert get["path"] in PROBES, f"{probe}: {get['path']} must never be shed as busy (service.limits.PROBES)"
        assert _port(container, get["port"]) == _served_port()
    assert "/metrics" in routes and "/metrics" in PROBES


def test_prometheus_annotations_point_at_metrics_on_the_served_port(manifest, container):
    annotations = manifest["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == _served_port()
    assert "annotations" not in manifest["Service"]["metadata"], "scraped per pod, not once more per Service"


def test_one_gpu_per_pod_and_two_replicas(manifest, container):
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert manifest["Deployment"]["spec"]["replicas"] == 2


def test_admin_token_comes_from_a_secret(container):
    token = _env(container)["FACT_ADMIN_TOKEN"]
    assert "value" not in token
    assert token["valueFrom"]["secretKeyRef"]["name"] and token["valueFrom"]["secretKeyRef"]["key"]
    assert "FACT_ADMIN_TOKEN=" not in MANIFEST.read_text()


def test_labels_file_is_on_a_shared_volume(manifest, container):
    path = Path(_env(container)["FACT_LABELS_PATH"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    assert not mount.get("readOnly", False)
    (volume,) = [v for v in manifest["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    claim = manifest["PersistentVolumeClaim"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # several pods, on several nodes, write it


def test_every_setting_in_the_manifest_is_one_the_service_reads(container, monkeypatch):
    documented = set(re.findall(r"``(FACT_[A-Z_]+)``", settings_module.__doc__ or ""))
    env = _env(container)
    assert env.keys() <= documented, env.keys() - documented
    assert env["FACT_DEVICE"]["value"] == "cuda"
    for name in [n for n in os.environ if n.startswith("FACT_")]:
        monkeypatch.delenv(name)
    for name, item in env.items():
        monkeypatch.setenv(name, item.get("value", "a-token-from-the-secret-of-32-chars"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-of-the-pod")  # what the device plugin gives: one GPU
    settings = Settings.from_env()
    assert settings.workers == 1 and settings.device == "cuda"


# ----------------------------------------------------------------------------- the Bento
def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports_of_the_service() -> tuple[set[Path], dict[str, set[str]]]:
    """Project files reachable by imports (at any depth, in any function) from ``service.service``,
    and the third-party top-level modules they import (→ the modules importing them)."""
    files: set[Path] = set()
    third_party: dict[str, set[str]] = {}
    seen: set[str] = set()
    stack = ["service.service"]
    while stack:
        module = stack.pop()
        if module in seen or (path := _module_file(module)) is None:
            continue
        seen.add(module)
        files.add(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES:
                    stack.append(name)
                elif top not in sys.stdlib_module_names:
                    third_party.setdefault(top, set()).add(module)
    return files, third_party


def _requirement_closure(names: set[str]) -> set[str]:
    """``names`` and every distribution they require (installed ones, markers evaluated), normalised."""
    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    closure, stack = set(), [norm(n) for n in names]
    while stack:
        name = stack.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                stack.append(norm(requirement.name))
    return closure


def test_bentofile_packs_every_project_module_the_service_imports():
    from bentoml._internal.bento.build_config import BentoPathSpec

    bentofile = yaml.safe_load(BENTOFILE.read_text())
    spec = BentoPathSpec(bentofile["include"], bentofile["exclude"], str(REPO))  # what `bentoml build` copies
    files, _ = _imports_of_the_service()
    files |= {path for path in (REPO / "service" / "static").iterdir() if path.is_file()}  # the explorer page
    relative = {str(path.relative_to(REPO)) for path in files}
    assert {path.split("/")[0] for path in relative} == set(PACKAGES)
    assert "service/placement.py" in relative
    assert not [path for path in sorted(relative) if not spec.includes(path)]


def test_bentofile_pins_every_package_the_service_imports():
    bentofile = yaml.safe_load(BENTOFILE.read_text())
    pinned = dict(p.split("==") for p in bentofile["python"]["packages"])
    for name, version in pinned.items():
        assert importlib.metadata.version(name) == version, f"{name}: bentofile pins {version}"
    available = _requirement_closure({*pinned, "bentoml"})  # the Bento installs BentoML itself
    distributions = importlib.metadata.packages_distributions()
    _, third_party = _imports_of_the_service()
    for module, importers in sorted(third_party.items()):
        if module in NOT_SERVED:
            continue
        provided = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(module, [])}
        assert provided & available, f"{module} (imported by {sorted(importers)}) comes with no bentofile package"


# ----------------------------------------------------------------------------- a real server
@pytest.mark.slow
def test_probe_and_metrics_paths_answer_on_a_real_server(tmp_path, container):
    env = {name: item["value"] for name, item in _env(container).items() if "value" in item}
    env["FACT_DEVICE"] = "cpu"  # no GPU here; FACT_WORKERS=per-gpu then starts one worker
    env["FACT_LABELS_PATH"] = str(tmp_path / "labels" / "concept_labels.json")
    (tmp_path / "labels").mkdir()
    with running_server(tmp_path, env=env) as url:
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert http("GET", url + container[probe]["httpGet"]["path"])[0] == 200, probe
        assert "fact_model_info" in metrics_text_of(url)
