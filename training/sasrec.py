"""The SASRec stage: train on the training split with the generic loop, rank the full catalogue.

Its checkpoint is both our first baseline and the source of the behaviour embeddings
(`item_embeddings`) that the tokenizer initialises z_ID from; it has only ever seen the
training split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.sasrec import SASRec, SASRecConfig
from training.data import Dataset, leave_one_out, training_windows
from training.distributed import SINGLE, Distributed, global_batches
from training.evaluation import evaluate
from training.loop import BEST, FitResult, TrainConfig, fit, load_checkpoint, resolve_device

KIND = "sasrec"


class SASRecRanker:
    """Full-catalogue ranking with a SASRec model (numpy in, numpy out)."""

    def __init__(self, model: SASRec) -> None:
        self.model = model

    @torch.no_grad()
    def rank(self, histories: np.ndarray, k: int) -> np.ndarray:
        self.model.eval()
        device = next(self.model.parameters()).device
        scores = self.model.scores(torch.from_numpy(histories).to(device))  # (B, N)
        return scores.topk(min(k, scores.shape[1]), dim=-1).indices.cpu().numpy()


def _window_batches(
    windows: np.ndarray, batch_size: int, device: torch.device, dist: Distributed
) -> Any:
    """Epochs of (this rank's windows, `Shard.scale`); the loss averages over real positions, so
    a rank's share of a global batch is counted in positions."""
    positions = ((windows[:, :-1] >= 0) & (windows[:, 1:] >= 0)).sum(axis=1)

    def epoch(rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, float]]:
        for rows in global_batches(rng, len(windows), batch_size):
            part = dist.shard(rows, positions)
            yield torch.from_numpy(windows[part.rows]).to(device), part.scale

    return epoch


def train_sasrec(
    dataset: Dataset,
    model_config: SASRecConfig,
    train_config: TrainConfig,
    run_dir: Path,
    *,
    device: str = "auto",
    progress: bool = True,
    dist: Distributed = SINGLE,
) -> tuple[SASRec, FitResult, dict[str, float]]:
    """Train, select on validation NDCG@10, then report test metrics of the selected model
    (data-parallel over torchrun's processes when `dist` is enabled, as `train_generative`)."""
    if model_config.num_items != dataset.num_items:
        raise ValueError("model_config.num_items does not match the dataset")
    if train_config.group_by_length:
        raise ValueError("group_by_length is for the generative stage: SASRec's windows are full")
    dev = dist.device(resolve_device(device))
    split = leave_one_out(dataset, model_config.max_len)
    windows = training_windows(split.train, model_config.max_len)
    torch.manual_seed(train_config.seed)
    model = SASRec(model_config).to(dev)

    def loss_fn(batch: tuple[torch.Tensor, float]) -> torch.Tensor:
        return model.loss(batch[0]) * batch[1]

    result = fit(
        model,
        model_config=asdict(model_config),
        loss_fn=loss_fn,
        batches=_window_batches(windows, train_config.batch_size, dev, dist),
        validate=lambda: evaluate(SASRecRanker(model), split.valid, seed=train_config.seed),
        config=train_config,
        run_dir=run_dir,
        meta={
            "kind": KIND,
            "dataset": str(dataset.root),
            "dataset_name": dataset.name,
            "num_items": dataset.num_items,
            "device": str(dev),
        },
        progress=progress,
        dist=dist,
    )
    ranker = SASRecRanker(model)
    test = dist.broadcast(
        evaluate(ranker, split.test, seed=train_config.seed) if dist.is_main else {}
    )
    return model, result, test


def load_sasrec(run_dir: Path, device: str = "cpu") -> tuple[SASRec, dict[str, Any]]:
    """Rebuild the selected (best-on-validation) SASRec of a run from its checkpoint alone."""
    ckpt = load_checkpoint(run_dir / BEST, map_location=device)
    if ckpt["meta"].get("kind") != KIND:
        raise ValueError(f"{run_dir}: not a SASRec run (kind={ckpt['meta'].get('kind')!r})")
    model = SASRec(SASRecConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


def item_embeddings(model: SASRec) -> np.ndarray:
    """(N, D) learned item embeddings, row i = dataset item i (the tokenizer's z_ID init)."""
    return model.item_weights().detach().cpu().numpy().astype(np.float32)
