"""Fixtures shared across test modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny tokenizer (no z_ID), generative run and its bundle on the embedded dataset."""
    runner = CliRunner()
    root = tmp_path_factory.mktemp("export")
    tok_cfg = root / "tok.json"
    tok_cfg.write_text(
        json.dumps({"tokenizer": {"code_dim": 8, "hidden": 32, "levels": 2, "codebook_size": 64}})
    )
    gen_cfg = root / "gen.json"
    gen_cfg.write_text(
        json.dumps(
            {
                "model": {
                    "d_model": 16,
                    "heads": 2,
                    "d_kv": 8,
                    "d_ff": 32,
                    "encoder_layers": 1,
                    "decoder_layers": 1,
                }
            }
        )
    )
    for args in (
        [
            "tokenize",
            "--out",
            str(root / "tok"),
            "--variant",
            "no-id",
            "--config",
            str(tok_cfg),
            "--modalities",
            "clip_vitb32_image,clip_vitb32_text",
            "--epochs",
            "2",
        ],
        [
            "train",
            "--out",
            str(root / "run"),
            "--tokenizer",
            str(root / "tok"),
            "--config",
            str(gen_cfg),
            "--epochs",
            "1",
        ],
        ["export", "--run", str(root / "run"), "--out", str(root / "bundle")],
    ):
        result = runner.invoke(app, [*args, "--no-progress"] if args[0] != "export" else args)
        assert result.exit_code == 0, result.output
    return root / "run", root / "bundle"
