"""The generative stage: train the encoder-decoder on a tokenizer's semantic IDs with the generic
loop, and rank the full catalogue by trie-constrained beam search.

Catalogue tables (item -> SID, item -> per-view codes, item -> quantized representation) come
from the tokenizer artifact and travel with every checkpoint, so a run is self-describing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from model.generative import GenerativeRecommender, GenRecConfig, Trie, beam_search
from training.data import (
    Dataset,
    history_lengths,
    leave_one_out,
    training_prefixes,
    trim_padding,
)
from training.distributed import SINGLE, Distributed, Shard, global_batches
from training.evaluation import evaluate
from training.loop import BEST, FitResult, TrainConfig, fit, load_checkpoint, resolve_device
from training.tokenize import Tokenizer, normalised_modalities

KIND = "generative"


@dataclass(frozen=True)
class CatalogueTables:
    """Everything the model needs to know about items, as arrays in catalogue order."""

    sids: np.ndarray  # (N, D) int64
    view_codes: np.ndarray  # (N, V, L) int64
    item_repr: np.ndarray  # (N, item_dim) float32

    @staticmethod
    def from_tokenizer(tokenizer: Tokenizer, dataset: Dataset) -> CatalogueTables:
        if list(dataset.item_ids) != tokenizer.item_ids:
            raise ValueError("the tokenizer was trained on another catalogue")
        mods = normalised_modalities(dataset, list(tokenizer.meta["modalities"]))
        return CatalogueTables(
            sids=tokenizer.table.sids,
            view_codes=tokenizer.view_codes(mods).astype(np.int64),
            item_repr=tokenizer.item_representations(),
        )

    def gather(self, histories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, M) item indices (PAD = -1) -> SIDs (B, M, D) and view codes (B, M, V, L), -1 on
        padding."""
        real = histories >= 0
        rows = np.where(real, histories, 0)
        sids = np.where(real[..., None], self.sids[rows], -1)
        codes = np.where(real[..., None, None], self.view_codes[rows], -1)
        return sids, codes


class GenerativeRanker:
    """Full-catalogue ranking by beam search: items outside the beam count as misses."""

    def __init__(self, model: GenerativeRecommender, tables: CatalogueTables, beam: int) -> None:
        self.model, self.tables, self.beam = model, tables, beam
        device = next(model.parameters()).device
        self.trie = Trie.from_sids(tables.sids, model.config.codebook_size).to(device)

    @torch.no_grad()
    def rank(self, histories: np.ndarray, k: int) -> np.ndarray:
        self.model.eval()
        device = next(self.model.parameters()).device
        sids, codes = self.tables.gather(trim_padding(histories))
        result = beam_search(
            self.model,
            torch.from_numpy(sids).to(device),
            torch.from_numpy(codes).to(device),
            self.trie.children,
            k=k,
            beam=self.beam,  # the search keeps max(beam, k)
        )
        return result.items.cpu().numpy()


class Batch(NamedTuple):
    """This process's rows of a global batch, with the whole global batch's targets: they are
    the s2i loss's negatives, the same on every process as in single-process training."""

    sids: Tensor  # (b, M, D) history SIDs, -1 on padding
    codes: Tensor  # (b, M, V, L) history view codes, -1 on padding
    target_sids: Tensor  # (b, D) SIDs of this process's targets
    target_repr: Tensor  # (B, item_dim) the global batch's target representations
    targets: Tensor  # (B,) the global batch's target items; ours are offset .. offset + b - 1
    offset: int
    scale: float  # `Shard.scale`: 1.0 in single-process training

    @staticmethod
    def of(
        tables: CatalogueTables,
        histories: np.ndarray,
        targets: np.ndarray,
        rows: np.ndarray,
        part: Shard,
        device: torch.device,
    ) -> Batch:
        """The batch of training examples `rows` (a global batch) that `part` gives this rank."""
        sids, codes = tables.gather(trim_padding(histories[part.rows]))
        return Batch(
            sids=torch.from_numpy(sids).to(device),
            codes=torch.from_numpy(codes).to(device),
            target_sids=torch.from_numpy(tables.sids[targets[part.rows]]).to(device),
            target_repr=torch.from_numpy(tables.item_repr[targets[rows]]).to(device),
            targets=torch.from_numpy(targets[rows]).to(device),
            offset=part.offset,
            scale=part.scale,
        )

    def loss(self, model: GenerativeRecommender) -> Tensor:
        """This rank's mean loss times its scale: the mean over ranks is the global batch's."""
        out = model(
            self.sids,
            self.codes,
            self.target_sids,
            self.target_repr,
            self.targets,
            s2i_offset=self.offset,
        )
        loss: Tensor = out.loss * self.scale
        return loss


def train_generative(
    dataset: Dataset,
    tables: CatalogueTables,
    model_config: GenRecConfig,
    train_config: TrainConfig,
    run_dir: Path,
    *,
    beam: int = 20,
    meta: dict[str, Any],
    device: str = "auto",
    progress: bool = True,
    dist: Distributed = SINGLE,
) -> tuple[GenerativeRecommender, FitResult, dict[str, float]]:
    """Train on all prefixes of the training split, select on validation NDCG@10, then test.

    With `dist` enabled (one call per torchrun process) each process trains on its share of every
    global batch of `train_config.batch_size` rows; rank 0 validates, writes the run and
    computes the test metrics, which every rank returns."""
    dev = dist.device(resolve_device(device))
    split = leave_one_out(dataset, model_config.max_items)
    histories, targets = training_prefixes(split.train, model_config.max_items)
    torch.manual_seed(train_config.seed)
    model = GenerativeRecommender(model_config).to(dev)

    lengths = history_lengths(histories) if train_config.group_by_length else None

    def batches(rng: np.random.Generator) -> Iterator[Batch]:
        for rows in global_batches(rng, len(targets), train_config.batch_size, lengths):
            yield Batch.of(tables, histories, targets, rows, dist.shard(rows), dev)

    def loss_fn(batch: Batch) -> Tensor:
        return batch.loss(model)

    ranker = GenerativeRanker(model, tables, beam)
    result = fit(
        model,
        model_config=asdict(model_config),
        loss_fn=loss_fn,
        batches=batches,
        validate=lambda: evaluate(ranker, split.valid, seed=train_config.seed),
        config=train_config,
        run_dir=run_dir,
        meta={
            "kind": KIND,
            "dataset": str(dataset.root),
            "num_items": dataset.num_items,
            "beam": beam,
            "tables": asdict(tables),
            **meta,
        },
        progress=progress,
        dist=dist,
    )
    test = dist.broadcast(
        evaluate(ranker, split.test, seed=train_config.seed) if dist.is_main else {}
    )
    return model, result, test


def load_generative(
    run_dir: Path, device: str = "cpu"
) -> tuple[GenerativeRecommender, CatalogueTables, dict[str, Any]]:
    """Rebuild the selected model and its catalogue tables from a run's checkpoint alone."""
    ckpt = load_checkpoint(run_dir / BEST, map_location=device)
    if ckpt["meta"].get("kind") != KIND:
        raise ValueError(f"{run_dir}: not a generative run (kind={ckpt['meta'].get('kind')!r})")
    model = GenerativeRecommender(GenRecConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    tables = CatalogueTables(**ckpt["meta"]["tables"])
    return model.to(device).eval(), tables, ckpt
