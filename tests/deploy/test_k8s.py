"""Kubernetes manifests: every document validated against the Kubernetes API schemas (strict,
offline, kubernetes-validate), then checked for what the deployment promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.helpers import DEPLOY, assert_valid_settings

K8S = DEPLOY / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml")) + sorted((K8S / "gpu").glob("*.yaml"))
KUBERNETES = kubernetes_validate.latest_version()


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def find(kind: str, name: str) -> dict[str, Any]:
    (found,) = [
        d
        for path in MANIFESTS
        for d in documents(path)
        if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (api,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(api, dict)
    return api


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_schema_check_refuses_a_wrong_field() -> None:
    bad = find("Deployment", "bbqrec-api")
    bad = {**bad, "spec": {**bad["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


@pytest.mark.parametrize("name", ["bbqrec-api", "bbqrec-api-gpu"])
def test_deployment_probes_the_health_routes(name: str) -> None:
    api = container(find("Deployment", name))
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[api[probe]["httpGet"]["port"]] == 8000


@pytest.mark.parametrize("name", ["bbqrec-api", "bbqrec-api-gpu"])
def test_deployment_is_non_root_and_takes_settings_from_config_and_secret(name: str) -> None:
    deployment = find("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's USER
    api = container(deployment)
    assert api["securityContext"]["allowPrivilegeEscalation"] is False
    (config,) = api["envFrom"]
    find("ConfigMap", config["configMapRef"]["name"])
    key = next(e for e in api["env"] if e["name"] == "BBQREC_API_KEY")
    assert key["valueFrom"]["secretKeyRef"]["name"] == "bbqrec-api-key"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_settings_are_real_service_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = find("ConfigMap", "bbqrec-config")["data"]
    assert all(isinstance(v, str) for v in config.values())
    settings = assert_valid_settings(config, monkeypatch, tmp_path)
    assert settings.redis_url is not None
    gpu_env = {
        e["name"]: e["value"]
        for e in container(find("Deployment", "bbqrec-api-gpu"))["env"]
        if "value" in e
    }
    gpu = assert_valid_settings({**config, **gpu_env}, monkeypatch, tmp_path)
    assert gpu.provider == "cuda"


def test_the_gpu_variant_requests_an_nvidia_gpu() -> None:
    gpu = find("Deployment", "bbqrec-api-gpu")
    api = container(gpu)
    assert api["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert api["image"].endswith(":gpu")
    tolerations = gpu["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    assert "nvidia.com/gpu" not in str(container(find("Deployment", "bbqrec-api")))


def test_service_reaches_every_api_pod() -> None:
    service = find("Service", "bbqrec-api")
    selector = service["spec"]["selector"].items()
    for name in ("bbqrec-api", "bbqrec-api-gpu"):
        deployment = find("Deployment", name)
        assert selector <= deployment["spec"]["template"]["metadata"]["labels"].items()
        ports = {p["name"] for p in container(deployment)["ports"]}
        assert service["spec"]["ports"][0]["targetPort"] in ports


@pytest.mark.parametrize(
    ("hpa", "deployment"), [("bbqrec-api", "bbqrec-api"), ("bbqrec-api-gpu", "bbqrec-api-gpu")]
)
def test_autoscaler_targets_its_deployment_on_requested_cpu(hpa: str, deployment: str) -> None:
    spec = find("HorizontalPodAutoscaler", hpa)["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment,
    }
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
    (metric,) = spec["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # Utilisation is relative to the request: without a CPU request the HPA cannot scale.
    assert "cpu" in container(find("Deployment", deployment))["resources"]["requests"]


def test_disruption_budget_selects_the_cpu_pods() -> None:
    pdb = find("PodDisruptionBudget", "bbqrec-api")
    labels = find("Deployment", "bbqrec-api")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
