"""Test metrics of trained runs, split by whether the user's (latest item -> target) transition
was seen in training: does a model's gain or loss sit on transitions it could have memorised?

python scripts/transition_probe.py --run runs/sasrec/scientific_mm/seed0 \
    --run runs/generative/TAG/scientific_mm/bbqrec/seed0 [--split test|valid]

A transition is seen when the target follows the history's latest item somewhere in the
training sequences (`leave_one_out(...).train`, each user's sequence without its last two items:
the pairs training targets are drawn from). Each run ranks the split once; the groups are masks on
those ranks, so "all" repeats the run's recorded metrics. Prints one markdown row per (run, group).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from training.data import PAD, EvalSplit, leave_one_out, load_dataset
from training.evaluation import (
    NDCG_KS,
    RECALL_KS,
    Ranker,
    load_run_ranker,
    metrics_from_ranks,
    split_ranks,
)


def training_transitions(train: Iterable[np.ndarray]) -> set[tuple[int, int]]:
    """Every (item, next item) pair of consecutive items in the training sequences."""
    pairs: set[tuple[int, int]] = set()
    for seq in train:
        pairs.update(zip(seq[:-1].tolist(), seq[1:].tolist(), strict=True))
    return pairs


def seen_mask(split: EvalSplit, pairs: set[tuple[int, int]]) -> np.ndarray:
    """(U,) bool: the row's latest history item -> its target is a training transition. Rows
    with an empty history are unseen."""
    latest = split.histories[:, -1]  # left-padded: the latest item is the last column
    return np.array(
        [
            int(last) != PAD and (int(last), int(target)) in pairs
            for last, target in zip(latest, split.targets, strict=True)
        ]
    )


def group_metrics(
    ranker: Ranker, split: EvalSplit, seen: np.ndarray
) -> dict[str, tuple[int, dict[str, float]]]:
    """(users, metrics) of the whole split and of its seen / unseen rows, from one ranking."""
    ranks = split_ranks(ranker, split, max(*RECALL_KS, *NDCG_KS))
    groups = {"all": np.ones(len(split), dtype=bool), "seen": seen, "unseen": ~seen}
    return {name: (int(m.sum()), metrics_from_ranks(ranks[m])) for name, m in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append", required=True)
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    args = parser.parse_args()
    print("| run | transitions | users | share | Recall@10 | NDCG@10 |\n|---|---|---|---|---|---|")
    for run in args.run:
        ranker, max_len, meta = load_run_ranker(run)
        loo = leave_one_out(load_dataset(Path(meta["dataset"])), max_len)
        split = loo.test if args.split == "test" else loo.valid
        seen = seen_mask(split, training_transitions(loo.train))
        for group, (users, m) in group_metrics(ranker, split, seen).items():
            print(
                f"| {run} | {group} | {users} | {users / len(split):.1%} "
                f"| {m['recall@10']:.4f} | {m['ndcg@10']:.4f} |"
            )


if __name__ == "__main__":
    main()
