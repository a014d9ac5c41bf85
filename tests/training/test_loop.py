from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from model.sasrec import SASRec, SASRecConfig
from training.loop import BEST, LAST, FitResult, TrainConfig, fit, load_checkpoint

WINDOWS = np.random.default_rng(0).integers(0, 20, size=(64, 6))


def batches(rng: np.random.Generator) -> Iterator[torch.Tensor]:
    order = rng.permutation(len(WINDOWS))
    for start in range(0, len(order), 16):
        yield torch.from_numpy(WINDOWS[order[start : start + 16]])


def new_model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(num_items=20, max_len=5, dim=8, heads=2, layers=1, dropout=0.3))


def run(
    model: SASRec,
    run_dir: Path,
    epochs: int,
    metric: list[float] | None = None,
    schedule: Literal["constant", "cosine"] = "constant",
) -> None:
    values = iter(metric or [])

    def validate() -> dict[str, float]:
        # a fixed metric schedule when given, else the training loss itself (falls as it learns)
        if metric is not None:
            return {"ndcg@10": next(values)}
        with torch.no_grad():
            return {"ndcg@10": -float(model.loss(torch.from_numpy(WINDOWS)))}

    fit(
        model,
        model_config=asdict(model.config),
        loss_fn=model.loss,
        batches=batches,
        validate=validate,
        config=TrainConfig(epochs=epochs, patience=2, seed=3, lr_schedule=schedule),
        run_dir=run_dir,
        meta={"kind": "test"},
        progress=False,
    )


def test_resume_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    straight = new_model()
    run(straight, tmp_path / "a", epochs=4)
    resumed = new_model()
    run(resumed, tmp_path / "b", epochs=2)
    run(resumed, tmp_path / "b", epochs=4)  # picks up last.pt at epoch 3
    a = load_checkpoint(tmp_path / "a" / LAST)
    b = load_checkpoint(tmp_path / "b" / LAST)
    assert a["epoch"] == b["epoch"] == 4
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_early_stopping_keeps_the_best_validation_state(tmp_path: Path) -> None:
    model = new_model()
    run(model, tmp_path, epochs=10, metric=[0.1, 0.3, 0.2, 0.25, 0.9])
    best = load_checkpoint(tmp_path / BEST)
    last = load_checkpoint(tmp_path / LAST)
    assert best["epoch"] == 2  # 0.3; then two evaluations without improvement stop the run
    assert last["epoch"] == 4
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, best["state_dict"][name])


def test_checkpoint_is_self_describing(tmp_path: Path) -> None:
    model = new_model()
    run(model, tmp_path, epochs=1)
    ckpt = load_checkpoint(tmp_path / BEST)
    rebuilt = SASRec(SASRecConfig(**ckpt["model_config"]))
    rebuilt.load_state_dict(ckpt["state_dict"])
    assert ckpt["meta"] == {"kind": "test"}
    assert ckpt["train_config"]["seed"] == 3


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    run(new_model(), tmp_path, epochs=1)
    other = SASRec(SASRecConfig(num_items=20, max_len=5, dim=16, heads=2, layers=1))
    with pytest.raises(ValueError, match="model config differs"):
        run(other, tmp_path, epochs=2)


def test_non_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a bbqrec checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


def test_cosine_schedule_decays_from_lr_to_nearly_zero() -> None:
    config = TrainConfig(epochs=4, lr=0.1, lr_schedule="cosine")
    factors = [config.lr_factor(e) for e in range(1, 5)]
    assert factors == pytest.approx([1.0, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2])
    assert TrainConfig(epochs=4).lr_factor(4) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")  # type: ignore[arg-type]


def test_a_cosine_run_that_early_stopping_could_cut_short_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def cosine(patience: int) -> TrainConfig:
        return TrainConfig(epochs=7, eval_every=2, patience=patience, lr_schedule="cosine")

    with caplog.at_level(logging.WARNING, logger="training.loop"):
        fit_flat(tmp_path / "a", TrainConfig(epochs=7, eval_every=2, patience=2))
        assert not caplog.records  # constant rate: stopping on a plateau is what it is for
        # validations at epochs 2, 4, 6 and 7 (the last): patience 3 can stop only at epoch 7
        assert fit_flat(tmp_path / "b", cosine(3)).epochs_run == 7
        assert not caplog.records
        stopped = fit_flat(tmp_path / "c", cosine(2))
    assert (stopped.epochs_run, stopped.stopped_by) == (6, "patience")
    assert [r.getMessage() for r in caplog.records] == [
        "cosine schedule over 7 epochs, but early stopping after 2 validations of 2 epochs can "
        "end the run before the rate decays; set train.patience >= 3 to run the schedule out "
        "(the best validated epoch is kept either way)"
    ]


def test_the_optimiser_follows_the_schedule_and_a_resume_continues_it(tmp_path: Path) -> None:
    """Each epoch trains at its scheduled rate (recorded in the history); a run that dies in
    its third epoch and is resumed ends bit-equal to a straight one."""
    straight = new_model()
    run(straight, tmp_path / "a", epochs=4, metric=[1, 2, 3, 4], schedule="cosine")
    a = load_checkpoint(tmp_path / "a" / LAST)
    config = TrainConfig(epochs=4, lr_schedule="cosine")
    lrs = [h["lr"] for h in a["history"]]
    assert lrs == pytest.approx([1e-3 * config.lr_factor(e) for e in (1, 2, 3, 4)])
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lrs[-1])

    resumed = new_model()
    with pytest.raises(StopIteration):  # no metric left for epoch 3's validation: a crash
        run(resumed, tmp_path / "b", epochs=4, metric=[1, 2], schedule="cosine")
    assert load_checkpoint(tmp_path / "b" / LAST)["epoch"] == 2
    run(new_model(), tmp_path / "b", epochs=4, metric=[3, 4], schedule="cosine")
    b = load_checkpoint(tmp_path / "b" / LAST)
    assert [h["lr"] for h in b["history"]] == lrs
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


def fit_flat(run_dir: Path, config: TrainConfig) -> FitResult:
    """`fit` with a validation metric that never improves after its first value."""
    model = new_model()
    return fit(
        model,
        model_config=asdict(model.config),
        loss_fn=model.loss,
        batches=batches,
        validate=lambda: {"ndcg@10": 0.5},
        config=config,
        run_dir=run_dir,
        meta={"kind": "test"},
        progress=False,
    )


def budgeted(epochs: int, budget: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, eval_every=3, patience=5, time_budget_s=budget)


def test_time_budget_ends_on_a_validated_epoch_and_a_resume_trains_no_further(
    tmp_path: Path,
) -> None:
    """Any epoch outlasts a 1 ns budget: epoch 1 is validated although eval_every is 3, it is
    the last, and the run is selected on it; resuming the spent run trains nothing."""
    result = fit_flat(tmp_path, budgeted(6, 1e-9))
    assert (result.epochs_run, result.best_epoch, result.stopped_by) == (1, 1, "time budget")
    assert load_checkpoint(tmp_path / BEST)["epoch"] == 1
    assert [h["epoch"] for h in result.history] == [1.0]
    assert "valid_ndcg@10" in result.history[0]
    again = fit_flat(tmp_path, budgeted(6, 1e-9))
    assert (again.epochs_run, again.stopped_by) == (1, "time budget")
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 1


def test_time_budget_must_be_positive() -> None:
    assert TrainConfig().time_budget_s is None
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainConfig(time_budget_s=0)


def test_without_budget_pressure_every_epoch_runs_or_patience_stops(tmp_path: Path) -> None:
    result = fit_flat(tmp_path / "a", budgeted(4, 1e9))
    assert (result.epochs_run, result.stopped_by) == (4, "epochs")
    # the last planned epoch ran: that, not the budget it also crossed, ended the run
    last = fit_flat(tmp_path / "c", budgeted(1, 1e-9))
    assert (last.epochs_run, last.stopped_by) == (1, "epochs")
    stopped = fit_flat(tmp_path / "b", TrainConfig(epochs=10, patience=2))
    assert (stopped.epochs_run, stopped.stopped_by) == (3, "patience")
