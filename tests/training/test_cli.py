from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.training.test_data import make_dataset
from training.cli import app

runner = CliRunner()
# torch.backends.cpu.get_cpu_capability()'s documented values
CPU_CAPABILITIES = {"DEFAULT", "VSX", "Z VECTOR", "NO AVX", "AVX2", "AVX512", "SVE256"}


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    items = [f"i{n}" for n in range(12)]
    seqs = {f"u{u}": [items[(u + j) % 12] for j in range(5 + u % 3)] for u in range(30)}
    return make_dataset(tmp_path / "ds", seqs, items)


def test_data_stats_reports_counts(dataset_dir: Path) -> None:
    result = runner.invoke(app, ["data", "stats", str(dataset_dir)])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert (stats["users"], stats["items"]) == (30, 12)
    assert stats["eval_users"] == 30


def test_bad_dataset_fails_with_a_clear_message(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "stats", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "not a directory" in result.output


def tiny_sasrec(dataset_dir: Path, tmp_path: Path, epochs: int) -> tuple[list[str], Path]:
    """`train-sasrec` arguments for a tiny SASRec on the fixture dataset, and its run dir."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": {"dim": 8, "heads": 2, "layers": 1}, "train": {}}))
    out = tmp_path / "run"
    args = ["train-sasrec", "--dataset", str(dataset_dir), "--out", str(out), "--config"]
    return [*args, str(config), "--epochs", str(epochs), "--no-progress", "--device", "cpu"], out


def test_time_budget_option_stops_training_and_is_recorded(
    dataset_dir: Path, tmp_path: Path
) -> None:
    args, out = tiny_sasrec(dataset_dir, tmp_path, epochs=3)
    result = runner.invoke(app, [*args, "--time-budget", "1e-9"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "results.json").read_text())
    assert (recorded["epochs_run"], recorded["best_epoch"]) == (1, 1)
    assert recorded["stopped_by"] == "time budget"
    assert recorded["config"]["train"]["time_budget_s"] == 1e-9
    bad = runner.invoke(app, [*args, "--time-budget", "0"])
    assert bad.exit_code != 0
    assert "time_budget_s" in bad.output


def test_train_then_evaluate_reproduces_the_recorded_test_metrics(
    dataset_dir: Path, tmp_path: Path
) -> None:
    args, out = tiny_sasrec(dataset_dir, tmp_path, epochs=2)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "results.json").read_text())
    assert recorded["config"]["model"]["dim"] == 8
    assert (recorded["epochs_run"], recorded["stopped_by"]) == (2, "epochs")
    # the CPU model and SIMD level, so that results from two CPU families can be told apart
    assert recorded["hardware"]["cpu"]
    assert recorded["hardware"]["cpu_capability"] in CPU_CAPABILITIES

    result = runner.invoke(app, ["evaluate", "--run", str(out), "--split", "test"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == recorded["test"]
    # the list as served with k = 5: the same ranking, cut at 5
    result = runner.invoke(app, ["evaluate", "--run", str(out), "--split", "test", "--k", "5"])
    assert result.exit_code == 0, result.output
    cut = json.loads(result.output)
    assert cut == {
        key: recorded["test"][key] for key in ("recall@1", "recall@5", "ndcg@5", "users")
    }
    result = runner.invoke(app, ["evaluate", "--run", str(out), "--beam", "5"])
    assert result.exit_code != 0
    assert "not SASRec" in result.output
    # a diagnostic split: the same users, other histories and targets
    result = runner.invoke(app, ["evaluate", "--run", str(out), "--split", "test-skip-valid"])
    assert result.exit_code == 0, result.output
    probe = json.loads(result.output)
    assert probe["users"] == recorded["test"]["users"]
    assert probe != recorded["test"]
    result = runner.invoke(app, ["evaluate", "--run", str(out), "--split", "train"])
    assert result.exit_code != 0
    assert "train-last" in result.output


def test_unknown_config_field_is_refused(dataset_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": {"dimension": 8}}))
    result = runner.invoke(
        app,
        [
            "train-sasrec",
            "--dataset",
            str(dataset_dir),
            "--out",
            str(tmp_path / "r"),
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 2
    assert "unknown SASRecConfig field(s) ['dimension']" in result.output
