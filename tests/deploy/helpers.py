"""Shared by the deploy tests: load a deploy/ script as a module, and check that environment
variables given to the service are real, valid fields of `service.settings.Settings`."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def load_script(path: Path) -> ModuleType:
    name = f"deploy_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def assert_valid_settings(
    env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Settings:
    """Every BBQREC_* name is a Settings field, and the service would accept the values."""
    fields = {f"BBQREC_{name.upper()}" for name in Settings.model_fields}
    ours = {k: v for k, v in env.items() if k.startswith("BBQREC_")}
    assert ours, "no BBQREC_* settings at all"
    assert set(ours) <= fields, f"not settings of the service: {sorted(set(ours) - fields)}"
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text("{}")  # the field validator only wants the file
    for name in fields:
        monkeypatch.delenv(name, raising=False)
    for name, value in ours.items():
        monkeypatch.setenv(name, value)
    return Settings(bundle_path=bundle)  # the image passes it as `bbqrec serve --bundle`
