from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from tests.conftest import TINY_GENERATIVE
from training.cli import app
from training.data import left_pad
from training.distributed import SINGLE
from training.generative import Batch, CatalogueTables

CPU = torch.device("cpu")

runner = CliRunner()


def test_tables_gather_histories_with_padding() -> None:
    tables = CatalogueTables(
        sids=np.array([[0, 1, 0], [2, 3, 0]]),
        view_codes=np.array([[[0, 1]], [[2, 3]]]),
        item_repr=np.zeros((2, 4), dtype=np.float32),
    )
    sids, codes = tables.gather(np.array([[-1, 1, 0]]))
    assert sids.tolist() == [[[-1, -1, -1], [2, 3, 0], [0, 1, 0]]]
    assert codes.tolist() == [[[[-1, -1]], [[2, 3]], [[0, 1]]]]


def test_a_batch_is_cut_to_its_longest_history() -> None:
    tables = CatalogueTables(
        sids=np.array([[0, 1], [2, 3], [1, 1]]),
        view_codes=np.zeros((3, 1, 2), dtype=np.int64),
        item_repr=np.zeros((3, 4), dtype=np.float32),
    )
    histories = left_pad([np.array([0]), np.array([1, 2]), np.array([2, 0, 1])], 5)
    rows = np.array([0, 1])
    batch = Batch.of(tables, histories, np.array([1, 0, 2]), rows, SINGLE.shard(rows), CPU)
    assert batch.sids.tolist() == [[[-1, -1], [0, 1]], [[2, 3], [1, 1]]]
    assert batch.codes.shape == (2, 2, 1, 2)


def test_length_grouped_training_is_recorded_in_the_run(
    tiny_tokenizer: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "gen.json"
    cfg.write_text(json.dumps(TINY_GENERATIVE | {"train": {"group_by_length": True}}))
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            *("train", "--out", str(out), "--tokenizer", str(tiny_tokenizer)),
            *("--config", str(cfg), "--epochs", "1", "--no-progress", "--device", "cpu"),
        ],
    )
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "results.json").read_text())
    assert recorded["config"]["train"]["group_by_length"] is True
    assert 0.0 <= recorded["test"]["ndcg@10"] <= recorded["test"]["recall@10"] <= 1.0


def test_train_then_evaluate_reproduces_the_recorded_metrics(
    exported: tuple[Path, Path],
) -> None:
    out = exported[0]  # `bbqrec train` on the tiny tokenizer, run by the shared fixture
    recorded = json.loads((out / "results.json").read_text())
    assert (out / "curves.png").exists()
    assert recorded["config"]["model"]["num_views"] == 2  # image and text behaviour views
    assert recorded["config"]["model"]["sid_levels"] == 3
    assert 0.0 <= recorded["test"]["ndcg@10"] <= recorded["test"]["recall@10"] <= 1.0

    result = runner.invoke(app, ["evaluate", "--run", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == recorded["test"]


def test_unknown_profile_is_refused(tiny_tokenizer: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["train", "--out", str(tmp_path), "--tokenizer", str(tiny_tokenizer), "--profile", "huge"],
    )
    assert result.exit_code == 2
    assert "unknown profile" in result.output
