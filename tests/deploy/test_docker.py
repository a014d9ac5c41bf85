"""The Dockerfile, statically (no Docker engine here): hadolint, the stage layout the images
rely on, the dependency lists it installs, and a serving path that needs no torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.helpers import DEPLOY, ROOT, load_script

DOCKERFILE = ROOT / "Dockerfile"
REQUIREMENTS = DEPLOY / "docker/requirements.py"


def stages() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (its base, its instructions with continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, tuple[str, list[str]]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if match := re.fullmatch(r"FROM (\S+) AS (\S+)", line):
            current = []
            out[match.group(2)] = (match.group(1), current)
        elif line and not line.startswith("#") and out:
            current.append(line)
    return out


def requirement_names(extra: str) -> set[str]:
    module = load_script(REQUIREMENTS)
    return {
        module.requirement_name(r) for r in module.requirements(ROOT / "pyproject.toml", extra, [])
    }


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    config = DEPLOY / "docker/hadolint.yaml"
    result = subprocess.run(
        [str(hadolint), "--config", str(config), str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_and_gpu_targets_install_the_right_onnxruntime_and_no_torch() -> None:
    serve, gpu = requirement_names("serve"), requirement_names("gpu")
    assert "onnxruntime" in serve
    assert "onnxruntime-gpu" not in serve
    assert "onnxruntime-gpu" in gpu
    assert "onnxruntime" not in gpu  # both write the same package folder
    assert "torch" not in serve | gpu
    assert {"fastapi", "uvicorn", "redis", "numpy"} <= serve & gpu


def test_requirements_script_picks_single_packages_and_refuses_unknown_ones() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(REQUIREMENTS), str(ROOT / "pyproject.toml"), *args]
        return subprocess.run(command, capture_output=True, text=True)

    picked = run("dev", "locust")
    assert picked.returncode == 0
    assert picked.stdout.split() == [r for r in picked.stdout.split() if r.startswith("locust")]
    assert run("dev", "no-such-package").returncode != 0
    assert run("no-such-extra").returncode != 0


def test_dependencies_are_installed_before_any_source_is_copied() -> None:
    all_stages = stages()
    for name in ("cpu-deps", "gpu-deps"):
        _, steps = all_stages[name]
        copies = [s for s in steps if s.startswith("COPY")]
        assert copies == ["COPY pyproject.toml deploy/docker/requirements.py /build/"], name
        install = next(i for i, s in enumerate(steps) if "pip install -r" in s)
        assert steps.index(copies[0]) < install
    base, steps = all_stages["wheel"]
    assert base == "cpu-deps"
    assert any(s.startswith("COPY service") for s in steps)


@pytest.mark.parametrize(("target", "deps"), [("cpu", "cpu-deps"), ("gpu", "gpu-deps")])
def test_runtime_targets_run_as_non_root_with_a_healthcheck(target: str, deps: str) -> None:
    base, steps = stages()[target]
    assert base == deps
    assert "USER 10001:10001" in steps
    (health,) = [s for s in steps if s.startswith("HEALTHCHECK")]
    assert "http://127.0.0.1:8000/healthz" in health
    (cmd,) = [s for s in steps if s.startswith("CMD")]
    assert '"bbqrec", "serve", "--bundle", "/bundle"' in cmd
    assert any(s.startswith("COPY --from=bundle") for s in steps)  # mounted over, or baked in
    assert not any("[train]" in s or "torch" in s for s in steps)


def test_the_gpu_base_has_cuda_and_cudnn_and_the_bundle_is_a_build_arg() -> None:
    text = DOCKERFILE.read_text()
    (cuda,) = re.findall(r"^ARG CUDA_IMAGE=(\S+)$", text, flags=re.M)
    assert cuda.startswith("nvidia/cuda:")
    assert "cudnn" in cuda
    assert stages()["gpu-deps"][0] == "${CUDA_IMAGE}"
    (bundle,) = re.findall(r"^ARG BUNDLE=(\S+)$", text, flags=re.M)
    assert (ROOT / bundle / "README.md").is_file()
    assert "COPY ${BUNDLE}/ /bundle/" in stages()["bundle"][1]


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    kept = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    copied = {
        src
        for _, steps in stages().values()
        for step in steps
        if step.startswith("COPY ") and "--from=" not in step
        for src in step.split()[1:-1]
        if not src.startswith("$")
    }
    assert copied
    for src in copied:
        assert any(src == k or src.startswith(k + "/") for k in kept), src


def test_the_serving_path_imports_no_torch(exported: tuple[Path, Path]) -> None:
    """What the cpu image runs (`bbqrec serve`, the bundle loader), with torch made unimportable."""
    _, bundle = exported
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from typer.testing import CliRunner
from training.cli import app
from service.app import create_app
from service.bundle import Bundle
assert CliRunner().invoke(app, ["serve", "--help"]).exit_code == 0
Bundle(__import__("pathlib").Path({str(bundle)!r}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
