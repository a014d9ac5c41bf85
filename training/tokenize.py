"""The tokenize stage: train the tokenizer, assign collision-free semantic IDs, write the artifact.

Artifact directory (`bbqrec tokenize --out DIR`):

- `tokenizer.pt`: config, state dict (codebooks, encoders, extra level), meta (dataset, modalities)
- `sids.npy`: (N, L + 1) int64, row i is item i's semantic ID (L codes + the extra ID level)
- `item_ids.txt`: line i = item id of row i
- `sid_index.npz`: the reverse table, SIDs sorted lexicographically and the item of each
- `metrics.json`: per-level utilisation and perplexity, collisions before/after the extra
  level, quantization error, per-epoch loss parts (reconstruction, CLUB, alignment, anchor)
  and the CLUB diagnostics (`train_club_raw`, the unclamped estimate; `train_club_clamped`, the
  share of batches and modalities where the clamp at zero was active)
- `code_usage.png`, `losses.png`: per-level code usage; loss curves
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.tokenizer import FUSED_VIEW, BBQTokenizer, TokenizerConfig
from model.trie import next_free_extra
from training.data import Dataset, leave_one_out
from training.features import DEFAULT_CACHE_DIR, load_modalities
from training.loop import TrainConfig, fit, resolve_device

KIND = "tokenizer"
ARTIFACT = "tokenizer.pt"


def normalised_modalities(
    dataset: Dataset, names: list[str], cache_dir: Path = DEFAULT_CACHE_DIR
) -> dict[str, np.ndarray]:
    """Requested modality matrices, each row L2-normalised (CLIP and MiniLM differ in scale)."""
    mods = load_modalities(dataset, names, cache_dir=cache_dir)
    return {m: normalise_rows(x) for m, x in mods.items()}


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = (x / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


def successors(train: tuple[np.ndarray, ...], num_items: int) -> list[np.ndarray]:
    """For each item, the items that directly follow it in training sequences (with repeats)."""
    follow: list[list[int]] = [[] for _ in range(num_items)]
    for seq in train:
        for a, b in itertools.pairwise(seq):
            if a != b:
                follow[int(a)].append(int(b))
    return [np.array(f, dtype=np.int64) for f in follow]


# ---------------------------------------------------------------------------------------------
# Semantic IDs
# ---------------------------------------------------------------------------------------------


def add_extra_level(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """Append a level that numbers the items sharing the same L codes 0, 1, ... in item order.

    Deterministic, and unique by construction; a group larger than the codebook cannot be told
    apart and raises (use more levels or a larger codebook).
    """
    n = len(codes)
    extra = np.zeros(n, dtype=np.int64)
    groups: dict[tuple[int, ...], int] = {}
    for i in range(n):
        key = tuple(int(c) for c in codes[i])
        extra[i] = groups.get(key, 0)
        groups[key] = extra[i] + 1
    largest = max(groups.values())
    if largest > codebook_size:
        raise ValueError(
            f"{largest} items share one code prefix, more than the extra level's "
            f"{codebook_size} slots: raise levels or codebook_size"
        )
    return np.concatenate([codes, extra[:, None]], axis=1)


def collision_rate(codes: np.ndarray) -> float:
    """Share of items whose code tuple is shared with at least one other item."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.reshape(-1)] > 1).mean())


def level_stats(codes: np.ndarray, codebook_size: int) -> list[dict[str, float]]:
    """Per level: share of codes used and perplexity exp(H) of the code distribution."""
    stats = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        stats.append(
            {
                "utilisation": float((counts > 0).mean()),
                "perplexity": float(math.exp(-(p * np.log(p)).sum())),
            }
        )
    return stats


class SemanticIds:
    """Item <-> semantic ID tables, both ways, plus cold-start allocation of the extra level."""

    def __init__(self, sids: np.ndarray) -> None:
        self.sids = sids.astype(np.int64)  # (N, L + 1)
        self._by_sid = {tuple(int(c) for c in row): i for i, row in enumerate(self.sids)}
        if len(self._by_sid) != len(self.sids):
            raise ValueError("semantic IDs are not unique")

    def item(self, sid: tuple[int, ...]) -> int | None:
        return self._by_sid.get(sid)

    def sorted_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted SIDs (N, L+1), item of each row): the reverse table as arrays."""
        order = np.lexsort(self.sids.T[::-1])
        return self.sids[order], order.astype(np.int64)

    def next_extra(self, codes: tuple[int, ...], codebook_size: int) -> int:
        """Smallest free extra-level index for a new item with these L codes."""
        return next_free_extra(self.sids, np.array(codes), codebook_size)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _to(mods: dict[str, np.ndarray], rows: np.ndarray, device: torch.device) -> dict[str, Tensor]:
    return {m: torch.from_numpy(x[rows]).to(device) for m, x in mods.items()}


@torch.no_grad()
def all_views(
    model: BBQTokenizer, mods: dict[str, np.ndarray], *, with_id: bool, batch: int = 2048
) -> dict[str, Tensor]:
    """Every item's behaviour views and fused view, (N, code_dim) each on the CPU; `with_id`
    False gives the content-only views a new item would have."""
    model.eval()
    device = next(model.parameters()).device
    n = len(next(iter(mods.values())))
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        items = torch.from_numpy(rows).to(device) if with_id else None
        views = model.behaviour_views(_to(mods, rows, device), items)
        views.setdefault(FUSED_VIEW, model.fuse(views))
        for name, v in views.items():
            parts.setdefault(name, []).append(v.cpu())
    return {name: torch.cat(v) for name, v in parts.items()}


@torch.no_grad()
def assign_sids(model: BBQTokenizer, mods: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N, L) before the extra level, sids (N, L+1)); fits the extra-level embedding to the
    residual the L codes leave, averaged over the items holding each extra index."""
    fused = all_views(model, mods, with_id=bool(model.config.id_dim))[FUSED_VIEW]
    device = next(model.parameters()).device
    rq = model.quantizer(FUSED_VIEW)
    codes = rq(fused.to(device)).codes.cpu().numpy()
    sids = add_extra_level(codes, model.config.codebook_size)
    residual = fused.to(device) - rq.decode(torch.from_numpy(codes).to(device))
    extra = torch.from_numpy(sids[:, -1]).to(device)
    k = model.config.codebook_size
    sums = torch.zeros(k, residual.shape[1], device=device).index_add_(0, extra, residual)
    counts = torch.bincount(extra, minlength=k).clamp(min=1).unsqueeze(1)
    model.extra_level.weight.copy_(sums / counts)
    return codes, sids


def train_tokenizer(
    dataset: Dataset,
    config: TokenizerConfig,
    train_config: TrainConfig,
    out: Path,
    *,
    modality_names: list[str],
    id_init: np.ndarray | None = None,
    variant: str = "bbqrec",
    max_len: int = 20,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    device: str = "auto",
    progress: bool = True,
) -> tuple[BBQTokenizer, dict[str, Any]]:
    """Train the tokenizer on all items (behaviour from the training split only) and write the
    artifact to `out`. Returns the model and the metrics written to `metrics.json`."""
    if train_config.group_by_length:
        raise ValueError("group_by_length is for the generative stage: the tokenizer batches items")
    dev = resolve_device(device)
    mods = normalised_modalities(dataset, modality_names, cache_dir)
    split = leave_one_out(dataset, max_len)
    follow = successors(split.train, dataset.num_items)
    torch.manual_seed(train_config.seed)
    model = BBQTokenizer(config).to(dev)
    if config.id_dim:
        if id_init is None or id_init.shape != (dataset.num_items, config.id_dim):
            raise ValueError(f"z_ID needs a ({dataset.num_items}, {config.id_dim}) initialisation")
        with torch.no_grad():
            model.id_emb.weight.copy_(torch.from_numpy(id_init))
    gen = torch.Generator().manual_seed(train_config.seed)
    all_rows = np.arange(dataset.num_items)

    def views_of_all() -> dict[str, Tensor]:
        return all_views(model, mods, with_id=bool(config.id_dim))

    # k-means initialisation of every codebook on the untrained encoders' outputs.
    def quantizer_data(views: dict[str, Tensor], key: str) -> Tensor:
        # a shared codebook serves every view, so it is fitted to all of them
        return torch.cat(list(views.values())) if config.shared_codebook else views[key]

    initial = views_of_all()
    for key in model.quantizers:
        model.quantizer(key).init_kmeans(quantizer_data(initial, key), generator=gen)
    model.to(dev)

    estimator_params = model.estimator_parameters()
    estimator_opt = (
        torch.optim.Adam(estimator_params, lr=train_config.lr) if estimator_params else None
    )
    history_parts: list[dict[str, float]] = []
    epoch_parts: dict[str, list[float]] = {}

    def batches(rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = rng.permutation(dataset.num_items)
        for start in range(0, len(order), train_config.batch_size):
            rows = order[start : start + train_config.batch_size]
            nxt = np.array(
                [follow[i][rng.integers(len(follow[i]))] if len(follow[i]) else -1 for i in rows],
                dtype=np.int64,
            )
            yield rows, nxt

    def loss_fn(batch: tuple[np.ndarray, np.ndarray]) -> Tensor:
        rows, nxt = batch
        feats = _to(mods, rows, dev)
        if estimator_opt is not None:  # the CLUB estimator's own maximum-likelihood step
            estimator_opt.zero_grad(set_to_none=True)
            model.estimator_loss(feats).backward()
            estimator_opt.step()
            estimator_opt.zero_grad(set_to_none=True)
        nxt_rows = np.where(nxt >= 0, nxt, 0)
        out = model(
            feats,
            torch.from_numpy(rows).to(dev),
            _to(mods, nxt_rows, dev),
            torch.from_numpy(nxt).to(dev),
        )
        for name, value in out.parts.items():
            epoch_parts.setdefault(name, []).append(float(value.detach()))
        loss: Tensor = out.loss
        return loss

    def on_epoch_end(epoch: int) -> dict[str, float]:
        views = views_of_all()
        reseeded = 0
        for key in model.quantizers:
            data = quantizer_data(views, key).to(dev)
            reseeded += model.quantizer(key).reseed_dead_codes(data, generator=gen)
        record = {f"train_{k}": float(np.mean(v)) for k, v in epoch_parts.items()}
        record["reseeded_codes"] = float(reseeded)
        epoch_parts.clear()
        history_parts.append(record)
        return record

    def validate() -> dict[str, float]:
        codes = model.quantizer(FUSED_VIEW)(views_of_all()[FUSED_VIEW].to(dev)).codes.cpu().numpy()
        stats = level_stats(codes, config.codebook_size)
        total = 0.0
        for start in range(0, dataset.num_items, 1024):
            rows = all_rows[start : start + 1024]
            total += float(model(_to(mods, rows, dev), torch.from_numpy(rows).to(dev)).loss) * len(
                rows
            )
        return {
            "neg_loss": -total / dataset.num_items,
            "collision_rate": collision_rate(codes),
            **{f"perplexity_l{i}": s["perplexity"] for i, s in enumerate(stats)},
        }

    result = fit(
        model,
        model_config=asdict(config),
        parameters=model.main_parameters(),
        loss_fn=loss_fn,
        batches=batches,
        validate=validate,
        on_epoch_end=on_epoch_end,
        config=train_config,
        run_dir=out / "checkpoints",
        meta={"kind": KIND, "dataset": str(dataset.root), "modalities": modality_names},
        progress=progress,
    )
    model.eval()
    codes, sids = assign_sids(model, mods)
    metrics = tokenizer_metrics(model, mods, codes, sids, result.history)
    metrics["best_epoch"] = result.best_epoch
    metrics["train_wall_seconds"] = round(result.wall_seconds, 1)
    write_artifact(out, model, dataset, modality_names, variant, sids, metrics)
    return model, metrics


@torch.no_grad()
def tokenizer_metrics(
    model: BBQTokenizer,
    mods: dict[str, np.ndarray],
    codes: np.ndarray,
    sids: np.ndarray,
    history: list[dict[str, float]],
) -> dict[str, Any]:
    c = model.config
    device = next(model.parameters()).device
    fused = all_views(model, mods, with_id=bool(c.id_dim))[FUSED_VIEW].to(device)
    recon_sid = model.decode_sid(torch.from_numpy(sids).to(device))
    recon_codes = model.quantizer(FUSED_VIEW).decode(torch.from_numpy(codes).to(device))
    recon_se = dict.fromkeys(model.names, 0.0)
    n = len(sids)
    for start in range(0, n, 2048):
        rows = np.arange(start, min(start + 2048, n))
        items = torch.from_numpy(rows).to(device) if c.id_dim else None
        feats = _to(mods, rows, device)
        for m, recon in model.reconstruct(feats, items).items():
            recon_se[m] += float(((recon - feats[m]) ** 2).sum())
    return {
        "items": n,
        # squared error per item on the L2-normalised features (0 = perfect, 2 = orthogonal-ish)
        "reconstruction_error": {m: se / n for m, se in recon_se.items()},
        "levels": level_stats(codes, c.codebook_size),
        "collision_rate_before_extra_level": collision_rate(codes),
        "collision_rate_after_extra_level": collision_rate(sids),
        "max_extra_level": int(sids[:, -1].max()),
        "quantization_mse": float(F.mse_loss(recon_codes, fused)),
        "quantization_mse_with_extra_level": float(F.mse_loss(recon_sid, fused)),
        "curves": history,
    }


def write_artifact(
    out: Path,
    model: BBQTokenizer,
    dataset: Dataset,
    modality_names: list[str],
    variant: str,
    sids: np.ndarray,
    metrics: dict[str, Any],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model_config": asdict(model.config),
            "state_dict": model.state_dict(),
            "meta": {
                "kind": KIND,
                "dataset": str(dataset.root),
                "dataset_name": dataset.name,
                "modalities": modality_names,
                "variant": variant,
                "feature_normalisation": "l2",
            },
        },
        out / ARTIFACT,
    )
    np.save(out / "sids.npy", sids)
    (out / "item_ids.txt").write_text("\n".join(dataset.item_ids) + "\n")
    sorted_sids, items = SemanticIds(sids).sorted_table()
    np.savez(out / "sid_index.npz", sids=sorted_sids, items=items)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_tokenizer(out, sids, model.config.codebook_size, metrics["curves"])


def plot_tokenizer(
    out: Path, sids: np.ndarray, codebook_size: int, curves: list[dict[str, float]]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sids.shape[1] - 1
    fig, axes = plt.subplots(1, levels, figsize=(4 * levels, 3), squeeze=False)
    for level in range(levels):
        counts = np.sort(np.bincount(sids[:, level], minlength=codebook_size))[::-1]
        axes[0, level].bar(np.arange(codebook_size), counts, width=1.0)
        axes[0, level].set_title(f"level {level}: {(counts > 0).sum()}/{codebook_size} used")
        axes[0, level].set_xlabel("code (sorted by use)")
    axes[0, 0].set_ylabel("items")
    fig.tight_layout()
    fig.savefig(out / "code_usage.png", dpi=80)
    plt.close(fig)

    keys = sorted({k for r in curves for k in r if k.startswith("train_")})
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            ax.plot([r.get(key, np.nan) for r in curves])
            ax.set_title(key.removeprefix("train_"))
            ax.set_xlabel("epoch")
        fig.tight_layout()
        fig.savefig(out / "losses.png", dpi=80)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Loading, and SIDs for new items
# ---------------------------------------------------------------------------------------------


def config_from_dict(values: dict[str, Any]) -> TokenizerConfig:
    modalities = tuple((str(name), int(dim)) for name, dim in values["modalities"])
    return TokenizerConfig(**{**values, "modalities": modalities})


class Tokenizer:
    """A trained tokenizer artifact: the item <-> SID tables and cold-start SIDs."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        if not (path / ARTIFACT).exists():
            raise FileNotFoundError(f"{path / ARTIFACT}: no tokenizer artifact")
        ckpt = torch.load(path / ARTIFACT, map_location=device, weights_only=False)
        if ckpt.get("meta", {}).get("kind") != KIND:
            raise ValueError(f"{path}: not a tokenizer artifact")
        self.config = config_from_dict(ckpt["model_config"])
        self.meta: dict[str, Any] = ckpt["meta"]
        self.model = BBQTokenizer(self.config)
        self.model.load_state_dict(ckpt["state_dict"])
        self.model.to(device).eval()
        self.item_ids = (path / "item_ids.txt").read_text().split()
        self.table = SemanticIds(np.load(path / "sids.npy"))

    @property
    def view_names(self) -> tuple[str, ...]:
        """Views whose codes measure item similarity: the behaviour views (modalities, z_ID),
        or the single fused view of a TIGER-style tokenizer."""
        return (FUSED_VIEW,) if self.config.tiger else self.config.views

    @torch.no_grad()
    def view_codes(self, mods: dict[str, np.ndarray]) -> np.ndarray:
        """(N, V, L) codes of every catalogue item's views (`mods` L2-normalised, catalogue
        order), from the views' own quantizers."""
        device = next(self.model.parameters()).device
        views = all_views(self.model, mods, with_id=bool(self.config.id_dim))
        codes = [self.model.quantizer(v)(views[v].to(device)).codes for v in self.view_names]
        return torch.stack(codes, dim=1).cpu().numpy()

    @torch.no_grad()
    def item_representations(self) -> np.ndarray:
        """(N, code_dim) each item's quantized representation, decoded from its SID alone."""
        sids = torch.from_numpy(self.table.sids).to(next(self.model.parameters()).device)
        return self.model.decode_sid(sids).cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def new_item_sid(self, features: dict[str, np.ndarray]) -> tuple[int, ...]:
        """SID for an item with no interactions, from its modality features alone
        (deterministic): L codes of its content-only fused view, then the smallest free
        extra-level index under that prefix."""
        missing = [m for m, _ in self.config.modalities if m not in features]
        if missing:
            raise ValueError(f"new item lacks modality features {missing}")
        device = next(self.model.parameters()).device
        feats = {
            m: torch.from_numpy(normalise_rows(np.asarray(features[m], dtype=np.float32)[None])).to(
                device
            )
            for m, _ in self.config.modalities
        }
        codes = tuple(int(c) for c in self.model.codes(feats, None)[0].tolist())
        return (*codes, self.table.next_extra(codes, self.config.codebook_size))
