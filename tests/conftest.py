"""Fixtures shared across test modules: one tiny pipeline on the embedded dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app

# A generative model small enough to train for an epoch in seconds.
TINY_GENERATIVE = {
    "model": {
        "d_model": 16,
        "heads": 2,
        "d_kv": 8,
        "d_ff": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
    }
}


def invoke(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 x 64 no-z_ID tokenizer over the CLIP features, trained for 2 epochs."""
    root = tmp_path_factory.mktemp("tok")
    cfg = root / "tok.json"
    cfg.write_text(
        json.dumps({"tokenizer": {"code_dim": 8, "hidden": 32, "levels": 2, "codebook_size": 64}})
    )
    invoke(
        "tokenize",
        "--out",
        str(root / "tok"),
        "--variant",
        "no-id",
        "--config",
        str(cfg),
        "--modalities",
        "clip_vitb32_image,clip_vitb32_text",
        "--epochs",
        "2",
        "--no-progress",
        "--device",
        "cpu",
    )
    return root / "tok"


@pytest.fixture(scope="session")
def exported(tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-epoch generative run on the tiny tokenizer, and its bundle."""
    root = tmp_path_factory.mktemp("export")
    cfg = root / "gen.json"
    cfg.write_text(json.dumps(TINY_GENERATIVE))
    invoke(
        "train",
        "--out",
        str(root / "run"),
        "--tokenizer",
        str(tiny_tokenizer),
        "--config",
        str(cfg),
        "--epochs",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    )
    invoke("export", "--run", str(root / "run"), "--out", str(root / "bundle"))
    return root / "run", root / "bundle"
