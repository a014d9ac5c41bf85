"""The one generic training loop, shared by every model.

A model brings a `loss(batch) -> Tensor` callable, an epoch's batches and a `validate()` that
returns metrics; the loop owns the optimiser, progress bar, gradient clipping, evaluation
schedule, early stopping on one validation metric, checkpoints and resume.

Checkpoints are self-describing (`model_config`, `train_config` and a free `meta` dict travel in
the file), so `load_checkpoint` can rebuild a model without being told any hyperparameter.
Files are written atomically: a crash mid-write never replaces a good checkpoint.

Under DDP (`training.distributed`) the same loop runs on every rank: rank 0 alone validates and
writes files, and broadcasts what every rank must agree on (a resumed checkpoint, validation
metrics, the selected weights).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from training.distributed import SINGLE, Distributed, env_world_size

log = logging.getLogger(__name__)

BEST = "best.pt"
LAST = "last.pt"
HISTORY = "history.json"
CURVES = "curves.png"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    grad_clip: float = 1.0
    eval_every: int = 1  # epochs between validations
    patience: int = 5  # validations without improvement before stopping
    monitor: str = "ndcg@10"
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA; ignored on the CPU
    # Batches of similar history length, each cut to its longest history: the generative stage
    # only (`training.distributed.global_batches`); SASRec's windows are all full length.
    group_by_length: bool = False
    # "cosine": epoch e trains at lr * (1 + cos(pi * (e - 1) / epochs)) / 2, from lr down to
    # nearly 0 at the last planned epoch (`lr_factor`); "constant" keeps lr throughout.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Wall-clock budget of the training loop in seconds (None: none). The epoch that crosses it
    # is validated and is the last one, so a run given a fixed budget (a GPU reserved for
    # minutes, a comparison "at equal budget") always ends selected on validation and ready to
    # test. The budget counts from the first epoch, across resumes.
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError(f"invalid TrainConfig {self}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 or None, got {self.time_budget_s}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )

    def lr_factor(self, epoch: int) -> float:
        """The learning rate of `epoch` (1-based) over `lr`. A function of the epoch alone, so a
        resumed run continues the schedule; it is planned over `epochs` as configured now."""
        if self.lr_schedule == "constant":
            return 1.0
        return (1 + math.cos(math.pi * (epoch - 1) / self.epochs)) / 2


StopReason = Literal["epochs", "patience", "time budget"]


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int
    wall_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    # why training ended: "epochs" (all configured epochs ran), "patience" (early stopping) or
    # "time budget" (`TrainConfig.time_budget_s`)
    stopped_by: StopReason = "epochs"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint")
    ckpt: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=False)
    for key in ("model_config", "state_dict", "train_config", "meta"):
        if key not in ckpt:
            raise ValueError(f"{path}: not a bbqrec checkpoint (missing {key!r})")
    return ckpt


def plot_history(history: list[dict[str, float]], path: Path, monitor: str) -> None:
    """Training loss and the monitored validation metric per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    left.plot([r["epoch"] for r in history], [r["loss"] for r in history])
    left.set(title="training loss", xlabel="epoch")
    evals = [r for r in history if f"valid_{monitor}" in r]
    right.plot([r["epoch"] for r in evals], [r[f"valid_{monitor}"] for r in evals], marker="o")
    right.set(title=f"validation {monitor}", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(ckpt: dict[str, Any], dist: Distributed, device: torch.device) -> None:
    """This rank's torch RNG streams as saved; a checkpoint from another world size has none for
    the new ranks, which keep their fresh `seed + rank` stream (dropout only: the data order
    does not depend on the world size)."""
    states: list[dict[str, Tensor]] = ckpt.get("rank_rng") or [{"torch": ckpt["torch_rng"]}]
    if len(states) != dist.world_size:
        log.warning("resuming a %d-process run on %d processes", len(states), dist.world_size)
    if dist.rank < len(states):
        torch.set_rng_state(states[dist.rank]["torch"])
        if "cuda" in states[dist.rank] and device.type == "cuda":
            torch.cuda.set_rng_state(states[dist.rank]["cuda"], device)


def fit(
    model: nn.Module,
    *,
    model_config: dict[str, Any],
    loss_fn: Callable[[Any], Tensor],
    batches: Callable[[np.random.Generator], Iterable[Any]],
    validate: Callable[[], dict[str, float]],
    config: TrainConfig,
    run_dir: Path,
    meta: dict[str, Any],
    parameters: Iterable[nn.Parameter] | None = None,
    on_epoch_end: Callable[[int], dict[str, float]] | None = None,
    resume: bool = True,
    progress: bool = True,
    dist: Distributed = SINGLE,
) -> FitResult:
    """Train `model` until `config.epochs` or early stopping; the best state is left in `model`.

    `batches(rng)` yields one epoch of batches (already on the model's device); `loss_fn(batch)`
    returns the scalar loss; `validate()` returns metrics that include `config.monitor`.
    `model_config` rebuilds the model (stored in every checkpoint, compared on resume); `meta`
    (dataset, model kind, anything a later stage needs) is stored in every checkpoint too.
    `parameters` limits what the loop's optimiser updates (default: all of `model`), for models
    that step a part of themselves with their own optimiser inside `loss_fn` (e.g. a CLUB
    estimator). `on_epoch_end(epoch)` runs after each epoch's updates (e.g. dead-code re-seeding)
    and may return figures to record in the history.
    With `resume`, an existing `last.pt` in `run_dir` is continued from its next epoch.

    With `dist` enabled every rank calls `fit` with the same arguments; `batches(rng)` yields this
    rank's share of each global batch (`Distributed.shard`) and `loss_fn` returns its mean loss
    times `Shard.scale`, so that the mean over ranks is the global batch's loss. `run_dir` need
    only exist on rank 0's filesystem.
    """
    if not dist.enabled and env_world_size() > 1:
        raise RuntimeError(
            f"launched with WORLD_SIZE={env_world_size()}, but this stage trains in one "
            "process; run it without torchrun"
        )
    if dist.enabled and parameters is not None:
        raise ValueError(
            "distributed training steps the whole model; `parameters` is not supported"
        )
    # the earliest early stop is at validation patience + 1; it ends the run before the last
    # planned epoch when it comes earlier (every eval_every epochs, and the last epoch)
    cut_short = (config.patience + 1) * config.eval_every < config.epochs
    if dist.is_main and config.lr_schedule == "cosine" and cut_short:
        # early stopping can end a cosine run while its rate is still high: measured on
        # Scientific-mm (docs/RESULTS.md), a quick BBQRec seed stopped at epoch 18 of 30 scored
        # .0609 test NDCG@10, and .0674 run to the end
        log.warning(
            "cosine schedule over %d epochs, but early stopping after %d validations of %d "
            "epochs can end the run before the rate decays; set train.patience >= %d to run "
            "the schedule out (the best validated epoch is kept either way)",
            config.epochs,
            config.patience,
            config.eval_every,
            math.ceil(config.epochs / config.eval_every) - 1,
        )
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(
        model.parameters() if parameters is None else parameters,
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    seed_everything(config.seed + dist.rank)  # dropout; rank 0 draws single-process's stream
    rng = np.random.default_rng(config.seed)  # batch order: the same on every rank

    start_epoch, best_epoch, bad_evals = 1, 0, 0
    best_metrics: dict[str, float] = {}
    best_value = -math.inf
    history: list[dict[str, float]] = []
    elapsed_before = 0.0
    found = dist.is_main and resume and (run_dir / LAST).exists()
    ckpt = dist.broadcast(load_checkpoint(run_dir / LAST) if found else None)
    if ckpt is not None:
        if ckpt["model_config"] != model_config:
            raise ValueError(f"{run_dir / LAST}: model config differs from this run; not resuming")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rng.bit_generator.state = ckpt["rng"]
        _restore_rng(ckpt, dist, device)
        start_epoch = ckpt["epoch"] + 1
        best_epoch, best_value = ckpt["best_epoch"], ckpt["best_value"]
        bad_evals = ckpt["bad_evals"]
        best_metrics, history = ckpt["best_metrics"], ckpt["history"]
        elapsed_before = ckpt["wall_seconds"]
        log.info("resuming %s at epoch %d", run_dir, start_epoch)

    def checkpoint(epoch: int, wall: float, rank_rng: list[dict[str, Tensor]]) -> dict[str, Any]:
        return {
            "model_config": model_config,
            "train_config": asdict(config),
            "meta": meta,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng.bit_generator.state,
            "torch_rng": rank_rng[0]["torch"],
            "rank_rng": rank_rng,  # every rank's torch (and CUDA) RNG, for an exact DDP resume
            "epoch": epoch,
            "best_epoch": best_epoch,
            "best_value": best_value,
            "best_metrics": best_metrics,
            "bad_evals": bad_evals,
            "history": history,
            "wall_seconds": wall,
        }

    use_amp = config.amp and device.type == "cuda"
    step = dist.wrap(model, loss_fn)
    progress = progress and dist.is_main
    t0 = time.perf_counter()
    epochs_run = start_epoch - 1
    stopped_by: StopReason = "epochs"

    def over_budget() -> bool:
        budget = config.time_budget_s
        return budget is not None and elapsed_before + time.perf_counter() - t0 >= budget

    for epoch in range(start_epoch, config.epochs + 1):
        if bad_evals >= config.patience:  # a resumed run that had already stopped early
            stopped_by = "patience"
            break
        if config.time_budget_s is not None and elapsed_before >= config.time_budget_s:
            # a resumed run that had already spent its budget
            stopped_by = "time budget"
            break
        model.train()
        lr = config.lr * config.lr_factor(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total, count = 0.0, 0
        bar = tqdm(batches(rng), desc=f"epoch {epoch}", leave=False, disable=not progress)
        for batch in bar:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = step(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            total += loss.item()
            count += 1
            bar.set_postfix(loss=f"{total / count:.4f}")
        # every rank ran the same number of global batches; the mean of the ranks' scaled losses
        # is the global batch's loss
        record: dict[str, float] = {
            "epoch": float(epoch),
            "loss": dist.mean(total) / max(count, 1),
            "lr": lr,
        }
        if on_epoch_end is not None:
            record |= on_epoch_end(epoch)
        metrics: dict[str, float] | None = None
        # every rank must take the same decision: rank 0's clock decides (no collective without
        # a budget)
        last_in_budget = config.time_budget_s is not None and dist.broadcast(over_budget())
        if epoch % config.eval_every == 0 or epoch == config.epochs or last_in_budget:
            if dist.is_main:
                model.eval()
                with torch.no_grad():
                    metrics = validate()
                if config.monitor not in metrics:
                    raise KeyError(f"validate() returned no {config.monitor!r}: {sorted(metrics)}")
            metrics = dist.broadcast(metrics)  # every rank takes the same decisions
        rank_rng = dist.gather(_rng_state(device))
        if metrics is not None:
            record |= {f"valid_{k}": v for k, v in metrics.items()}
            if metrics[config.monitor] > best_value:
                best_value, best_epoch, best_metrics, bad_evals = (
                    metrics[config.monitor],
                    epoch,
                    metrics,
                    0,
                )
                if dist.is_main:
                    wall = elapsed_before + time.perf_counter() - t0
                    _atomic_save(checkpoint(epoch, wall, rank_rng), run_dir / BEST)
            else:
                bad_evals += 1
        history.append(record)
        epochs_run = epoch
        if dist.is_main:
            wall = elapsed_before + time.perf_counter() - t0
            _atomic_save(checkpoint(epoch, wall, rank_rng), run_dir / LAST)
            (run_dir / HISTORY).write_text(json.dumps(history, indent=1))
            plot_history(history, run_dir / CURVES, config.monitor)
        if progress:
            shown = {k: round(v, 4) for k, v in record.items() if k != "epoch"}
            tqdm.write(f"epoch {epoch}: {shown}")
        if bad_evals >= config.patience:
            stopped_by = "patience"
            break
        if last_in_budget and epoch < config.epochs:
            log.info("%s: time budget spent after epoch %d", run_dir, epoch)
            stopped_by = "time budget"
            break

    if dist.is_main and (run_dir / BEST).exists():
        model.load_state_dict(load_checkpoint(run_dir / BEST, map_location=device)["state_dict"])
    dist.broadcast_module(model)
    return FitResult(
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        epochs_run=epochs_run,
        wall_seconds=elapsed_before + time.perf_counter() - t0,
        history=history,
        stopped_by=stopped_by,
    )
