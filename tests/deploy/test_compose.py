"""docker-compose.yml and the GPU override, resolved by the Compose v2 binary itself
(`docker compose config`: schema, interpolation, references), then checked for what the
deployment promises."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import compose
import pytest

from tests.deploy.helpers import ROOT, assert_valid_settings

COMPOSE = Path(compose.__file__).resolve().parent / "docker-compose"
BASE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
KEY = "a-test-key"


def config(*files: Path, profiles: tuple[str, ...] = (), key: str | None = KEY) -> Any:
    command = [str(COMPOSE), "--project-directory", str(ROOT)]
    for f in files:
        command += ["-f", str(f)]
    for p in profiles:
        command += ["--profile", p]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    if key is not None:
        env["BBQREC_API_KEY"] = key
    result = subprocess.run(
        [*command, "config", "--format", "json"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def stack() -> Any:
    return config(BASE, profiles=("loadtest",))


def test_compose_refuses_an_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text(
        "services:\n  api:\n    image: x\n    depends_on: {redis: {condition: service_healthy}}\n"
    )
    result = subprocess.run(
        [str(COMPOSE), "-f", str(bad), "config", "-q"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "redis" in result.stderr


def test_the_stack_has_its_services_and_locust_only_behind_a_profile(stack: Any) -> None:
    assert set(stack["services"]) == {"api", "redis", "prometheus", "grafana", "locust"}
    assert stack["services"]["locust"]["profiles"] == ["loadtest"]
    assert set(config(BASE)["services"]) == {"api", "redis", "prometheus", "grafana"}


def test_an_api_key_is_required() -> None:
    result = subprocess.run(
        [str(COMPOSE), "-f", str(BASE), "config", "-q"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "BBQREC_API_KEY" in result.stderr


def test_redis_is_durable_healthchecked_and_not_published(stack: Any) -> None:
    redis = stack["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync always" in command
    assert "ports" not in redis
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])


def test_api_waits_for_a_healthy_redis_and_serves_the_mounted_bundle(stack: Any) -> None:
    api = stack["services"]["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["build"]["target"] == "cpu"
    assert api["environment"]["BBQREC_REDIS_URL"].startswith("redis://redis:6379/")
    assert api["environment"]["BBQREC_API_KEY"] == KEY
    bundle = next(v for v in api["volumes"] if v["target"] == "/bundle")
    assert bundle["read_only"] is True
    assert [p["target"] for p in api["ports"]] == [8000]


def test_api_environment_is_valid_service_settings(
    stack: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = assert_valid_settings(stack["services"]["api"]["environment"], monkeypatch, tmp_path)
    assert settings.provider == "cpu"
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == KEY


def test_prometheus_and_grafana_read_their_config_from_deploy(stack: Any) -> None:
    prom = {v["target"]: v["source"] for v in stack["services"]["prometheus"]["volumes"]}
    assert prom["/etc/prometheus/prometheus.yml"] == str(ROOT / "deploy/prometheus/prometheus.yml")
    graf = {v["target"]: v["source"] for v in stack["services"]["grafana"]["volumes"]}
    assert graf["/etc/grafana/provisioning"] == str(ROOT / "deploy/grafana/provisioning")
    assert graf["/var/lib/grafana/dashboards"] == str(ROOT / "deploy/grafana/dashboards")
    for service in ("prometheus", "grafana"):  # dashboards only on the host's loopback
        assert all(p["host_ip"] == "127.0.0.1" for p in stack["services"][service]["ports"])


def test_locust_runs_the_slo_gate_against_the_api(stack: Any) -> None:
    locust = stack["services"]["locust"]
    assert locust["build"]["target"] == "loadtest"
    assert locust["depends_on"]["api"]["condition"] == "service_healthy"
    assert locust["entrypoint"][-2:] == ["/mnt/loadtest/run_slo.py", "run"]
    assert "--host=http://api:8000" in locust["command"]
    mounts = {v["target"]: v["source"] for v in locust["volumes"]}
    assert mounts["/mnt/loadtest"] == str(ROOT / "deploy/loadtest")


def test_the_gpu_override_requests_an_nvidia_device_and_the_cuda_image(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api = config(BASE, GPU)["services"]["api"]
    assert api["build"]["target"] == "gpu"
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    settings = assert_valid_settings(api["environment"], monkeypatch, tmp_path)
    assert settings.provider == "cuda"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"  # the base still applies
