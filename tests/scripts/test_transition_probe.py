"""scripts/transition_probe.py: training transitions and the seen / unseen split on a crafted
case, and each group's metrics, taken from one ranking of the split, equal to evaluating the
group's rows on their own."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).parents[2] / "scripts" / "transition_probe.py"
sys.path.insert(0, str(SCRIPT.parent))

from transition_probe import group_metrics, seen_mask, training_transitions  # noqa: E402

from training.data import PAD, EvalSplit  # noqa: E402
from training.evaluation import evaluate  # noqa: E402


def crafted() -> tuple[list[np.ndarray], EvalSplit]:
    train = [np.array([0, 1, 2]), np.array([3]), np.array([2, 0])]
    split = EvalSplit(
        name="test",
        users=np.arange(4),
        histories=np.array([[PAD, 0], [5, 1], [PAD, PAD], [1, 2]]),
        # 0 -> 1 seen; 1 -> 0 is 0 -> 1 reversed: unseen; empty history: unseen; 2 -> 0 seen
        targets=np.array([1, 0, 3, 0]),
    )
    return train, split


def test_transitions_are_consecutive_training_pairs_in_order() -> None:
    train, split = crafted()
    pairs = training_transitions(train)
    assert pairs == {(0, 1), (1, 2), (2, 0)}
    assert seen_mask(split, pairs).tolist() == [True, False, False, True]


class Fixed:
    """Ranks items 0, 1, 2, 3 in that order for every history."""

    def rank(self, histories: np.ndarray, k: int) -> np.ndarray:
        return np.tile(np.arange(min(k, 4)), (len(histories), 1))


def test_groups_from_one_ranking_match_evaluating_each_group() -> None:
    train, split = crafted()
    seen = seen_mask(split, training_transitions(train))
    groups = group_metrics(Fixed(), split, seen)
    assert [(name, users) for name, (users, _) in groups.items()] == [
        ("all", 4),
        ("seen", 2),
        ("unseen", 2),
    ]
    whole = evaluate(Fixed(), split)
    assert groups["all"][1] == {k: v for k, v in whole.items() if k != "users"}
    for name, mask in (("seen", seen), ("unseen", ~seen)):
        rows = EvalSplit(name, split.users[mask], split.histories[mask], split.targets[mask])
        alone = evaluate(Fixed(), rows)
        assert groups[name][1] == {k: v for k, v in alone.items() if k != "users"}
    # seen: targets 1 and 0 at ranks 2 and 1; unseen: targets 0 and 3 at ranks 1 and 4
    assert groups["seen"][1]["recall@1"] == 0.5
    assert groups["unseen"][1]["recall@1"] == 0.5
    assert groups["unseen"][1]["recall@5"] == 1.0
