"""scripts/transition_probe.py: training transitions and the seen / unseen split on a crafted
case, and the subsets' metrics adding back up to the whole split's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).parents[2] / "scripts" / "transition_probe.py"
sys.path.insert(0, str(SCRIPT.parent))

from transition_probe import seen_mask, subset, training_transitions  # noqa: E402

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


def test_the_groups_partition_the_split() -> None:
    train, split = crafted()
    seen = seen_mask(split, training_transitions(train))
    a, b = subset(split, seen, "seen"), subset(split, ~seen, "unseen")
    assert (a.users.tolist(), b.users.tolist()) == ([0, 3], [1, 2])
    whole, m_a, m_b = (evaluate(Fixed(), s) for s in (split, a, b))
    for key in ("recall@10", "ndcg@10"):
        assert whole[key] == (m_a[key] * len(a) + m_b[key] * len(b)) / len(split)
    assert m_a["recall@1"] == 0.5  # targets 1 and 0: item 0 is ranked first
