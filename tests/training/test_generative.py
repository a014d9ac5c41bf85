from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from training.cli import app
from training.generative import CatalogueTables

runner = CliRunner()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    cfg = root / "tok.json"
    cfg.write_text(
        json.dumps({"tokenizer": {"code_dim": 8, "hidden": 32, "levels": 2, "codebook_size": 64}})
    )
    out = root / "tok"
    result = runner.invoke(
        app,
        [
            "tokenize",
            "--out",
            str(out),
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
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_tables_gather_histories_with_padding() -> None:
    tables = CatalogueTables(
        sids=np.array([[0, 1, 0], [2, 3, 0]]),
        view_codes=np.array([[[0, 1]], [[2, 3]]]),
        item_repr=np.zeros((2, 4), dtype=np.float32),
    )
    sids, codes = tables.gather(np.array([[-1, 1, 0]]))
    assert sids.tolist() == [[[-1, -1, -1], [2, 3, 0], [0, 1, 0]]]
    assert codes.tolist() == [[[[-1, -1]], [[2, 3]], [[0, 1]]]]


def test_train_then_evaluate_reproduces_the_recorded_metrics(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "gen.json"
    cfg.write_text(
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
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--out",
            str(out),
            "--tokenizer",
            str(tokenizer_dir),
            "--config",
            str(cfg),
            "--epochs",
            "1",
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "results.json").read_text())
    assert (out / "curves.png").exists()
    assert recorded["config"]["model"]["num_views"] == 2  # image and text behaviour views
    assert recorded["config"]["model"]["sid_levels"] == 3
    assert 0.0 <= recorded["test"]["ndcg@10"] <= recorded["test"]["recall@10"] <= 1.0

    result = runner.invoke(app, ["evaluate", "--run", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == recorded["test"]


def test_unknown_profile_is_refused(tokenizer_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["train", "--out", str(tmp_path), "--tokenizer", str(tokenizer_dir), "--profile", "huge"],
    )
    assert result.exit_code == 2
    assert "unknown profile" in result.output
