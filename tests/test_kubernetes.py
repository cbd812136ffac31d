"""The Kubernetes manifests (docker/kubernetes/), checked offline: core kinds against the Kubernetes API schemas
(kubernetes-validate, strict: an unknown field fails), KubeRay's RayService and KServe's InferenceService against
their vendored CRD schemas (docker/kubernetes/schemas) with the same strictness, and every Caveat setting they name
against service.settings."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.metrics import Metrics
from service.ray_serve import build
from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "docker" / "kubernetes"
KUBERNETES_VERSION = "1.33"
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): "rayservice-ray.io-v1.json.gz",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving.kserve.io-v1beta1.json.gz",
}


def documents() -> Iterator[tuple[str, dict]]:
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            yield f"{path.name}#{index} {document['kind']}", document


def crd_schema(api_version: str, kind: str) -> dict:
    return json.loads(gzip.decompress((MANIFESTS / "schemas" / CRD_SCHEMAS[api_version, kind]).read_bytes()))


def unknown_fields(value: object, schema: dict, where: str = "") -> list[str]:
    """Fields the schema does not declare (the API server would prune them silently: a typo goes unnoticed)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{where}.{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{where}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += unknown_fields(item, schema["additionalProperties"], f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{where}[{index}]")
    return found


@pytest.mark.parametrize(("name", "document"), list(documents()), ids=[n for n, _ in documents()])
def test_each_manifest_validates_against_its_schema(name: str, document: dict) -> None:
    key = (document["apiVersion"], document["kind"])
    if key in CRD_SCHEMAS:
        schema = crd_schema(*key)
        jsonschema.validate(document, schema)
        assert not unknown_fields(document, schema), name
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_checks_catch_a_misspelt_field() -> None:
    _, ray_service = next((n, d) for n, d in documents() if d["kind"] == "RayService")
    ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 8
    assert unknown_fields(ray_service, crd_schema("ray.io/v1", "RayService")) == [
        ".spec.rayClusterConfig.workerGroupSpecs[0].maxReplica"
    ]
    _, deployment = next((n, d) for n, d in documents() if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def caveat_variables() -> Iterator[tuple[str, str]]:
    for name, document in documents():
        if document["kind"] == "ConfigMap":
            yield from ((f"{name} {key}", key) for key in document["data"])
        for container in _containers(document):
            yield from ((f"{name} {e['name']}", e["name"]) for e in container.get("env", []))


def _containers(document: dict) -> list[dict]:
    spec = document.get("spec", {})
    if document["kind"] == "InferenceService":
        return spec["predictor"]["containers"]
    template = spec.get("template", {}).get("spec", {})
    return template.get("containers", [])


def test_every_caveat_variable_names_a_setting() -> None:
    names = [(where, key) for where, key in caveat_variables() if key.startswith(ENV_PREFIX)]
    assert len(names) >= 10
    for where, key in names:
        assert key[len(ENV_PREFIX) :].lower() in Settings.model_fields, where


def test_the_ray_service_application_builds_from_its_arguments(tmp_path: Path) -> None:
    _, ray_service = next((n, d) for n, d in documents() if d["kind"] == "RayService")
    (application,) = yaml.safe_load(ray_service["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == "service.ray_serve:build"
    token = tmp_path / "token"
    token.write_text("secret")
    args = {**application["args"], "admin_token_file": str(token)}  # the Secret's mount, here a file
    built = build(args)
    assert built is not None


def test_the_autoscaler_scales_on_a_series_the_server_exports() -> None:
    _, hpa = next((n, d) for n, d in documents() if d["kind"] == "HorizontalPodAutoscaler")
    exported = {metric.name for metric in Metrics().registry.collect()}
    for metric in hpa["spec"]["metrics"]:
        assert metric["pods"]["metric"]["name"] in exported
