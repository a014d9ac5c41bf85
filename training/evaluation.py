"""The one `evaluate()` used for validation and test: full ranking over the whole catalogue.

A model is evaluated through a `Ranker`: given a batch of left-padded histories it returns, per
row, its top items in rank order over **all** items (never sampled negatives). A target absent
from the returned list is a miss. Metrics are Recall@k (= HR@k, one target per user) and
NDCG@k = 1 / log2(rank + 1) for a hit at 1-based rank <= k, averaged over users.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from training.data import EvalSplit, history_lengths

RECALL_KS: tuple[int, ...] = (1, 5, 10, 20)
NDCG_KS: tuple[int, ...] = (5, 10, 20)


class Ranker(Protocol):
    """Anything that ranks the full catalogue for a batch of histories."""

    def rank(self, histories: np.ndarray, k: int) -> np.ndarray:
        """`histories` (B, L) int64 left-padded with PAD; returns (B, min(k, N)) item indices,
        best first."""
        ...


def target_ranks(topk: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target in its row of `topk`, or 0 when it is not in the list."""
    hits = topk == targets[:, None]  # (B, k)
    found = hits.any(axis=1)
    return np.where(found, hits.argmax(axis=1) + 1, 0)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of users whose target is within the top k (`ranks` from `target_ranks`)."""
    if len(ranks) == 0:
        return 0.0
    return float(((ranks >= 1) & (ranks <= k)).mean())


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean 1/log2(rank+1) over users; 0 for a target ranked below k or missing."""
    if len(ranks) == 0:
        return 0.0
    hit = (ranks >= 1) & (ranks <= k)
    gains = np.zeros(len(ranks), dtype=np.float64)
    gains[hit] = 1.0 / np.log2(ranks[hit] + 1.0)
    return float(gains.mean())


def metrics_from_ranks(
    ranks: np.ndarray,
    recall_ks: Sequence[int] = RECALL_KS,
    ndcg_ks: Sequence[int] = NDCG_KS,
) -> dict[str, float]:
    out = {f"recall@{k}": recall_at_k(ranks, k) for k in recall_ks}
    out |= {f"ndcg@{k}": ndcg_at_k(ranks, k) for k in ndcg_ks}
    return out


def load_run_ranker(run: Path, beam: int | None = None) -> tuple[Ranker, int, dict[str, Any]]:
    """The ranker of a trained run's selected checkpoint (SASRec or generative), the history
    length it ranks and the run's `meta`; `beam` overrides a generative run's trained width.
    Raises FileNotFoundError / ValueError for a missing or foreign checkpoint, another kind of
    run, or a beam given to SASRec."""
    from training.loop import BEST, load_checkpoint

    meta: dict[str, Any] = load_checkpoint(run / BEST)["meta"]
    if meta["kind"] == "sasrec":
        if beam is not None:
            raise ValueError("--beam applies to generative runs and bundles, not SASRec")
        from training.sasrec import SASRecRanker, load_sasrec

        model, _ = load_sasrec(run)
        return SASRecRanker(model), model.config.max_len, meta
    if meta["kind"] == "generative":
        from training.generative import GenerativeRanker, load_generative

        gen, tables, _ = load_generative(run)
        return GenerativeRanker(gen, tables, beam or meta["beam"]), gen.config.max_items, meta
    raise ValueError(f"{run}: cannot evaluate a run of kind {meta['kind']!r}")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    try:
        import torch
    except ImportError:  # the serving environment has no torch; ONNX rankers are deterministic
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def split_ranks(
    ranker: Ranker, split: EvalSplit, k: int, *, batch_size: int = 256, seed: int = 0
) -> np.ndarray:
    """(U,) each row's 1-based target rank in the ranker's top k (0: not in it), in the split's
    row order; `evaluate` averages metrics over these, and a subset of rows is a mask on them."""
    ranks = np.zeros(len(split), dtype=np.int64)
    # Users in order of history length: every row is ranked on its own, so the order changes no
    # number, and a ranker that cuts a batch to its longest history (the generative one) runs
    # on batches of similar length.
    order = np.argsort(history_lengths(split.histories), kind="stable")
    with _seeded(seed):
        for start in range(0, len(split), batch_size):
            users = order[start : start + batch_size]
            topk = ranker.rank(split.histories[users], k)
            # fewer than k columns is fine when the catalogue itself is smaller than k
            if topk.ndim != 2 or topk.shape[0] != len(users) or topk.shape[1] > k:
                raise ValueError(
                    f"ranker returned shape {topk.shape}, expected ({len(users)}, <={k})"
                )
            ranks[users] = target_ranks(topk, split.targets[users])
    return ranks


def evaluate(
    ranker: Ranker,
    split: EvalSplit,
    *,
    batch_size: int = 256,
    recall_ks: Sequence[int] = RECALL_KS,
    ndcg_ks: Sequence[int] = NDCG_KS,
    seed: int = 0,
) -> dict[str, float]:
    """Full-ranking metrics of `ranker` on `split` (validation or test), deterministic for a seed.

    Any stochastic layer a ranker forgets to switch off still gives the same numbers twice: torch
    is seeded inside a forked RNG, so a validation in the middle of training leaves the training
    random stream untouched.
    """
    k = max(*recall_ks, *ndcg_ks)
    ranks = split_ranks(ranker, split, k, batch_size=batch_size, seed=seed)
    metrics = metrics_from_ranks(ranks, recall_ks, ndcg_ks)
    metrics["users"] = float(len(split))
    return metrics
