from __future__ import annotations

import math

import numpy as np
import pytest

from training.data import PAD, EvalSplit
from training.evaluation import evaluate, ndcg_at_k, recall_at_k, target_ranks


def test_target_ranks_are_one_based_and_zero_when_missing() -> None:
    topk = np.array([[5, 3, 9], [1, 2, 3], [7, 8, 4]])
    assert target_ranks(topk, np.array([3, 0, 4])).tolist() == [2, 0, 3]


def test_metric_formulas_on_a_hand_computed_case() -> None:
    # four users; targets at ranks 1, 3, 12 and missing
    ranks = np.array([1, 3, 12, 0])
    assert recall_at_k(ranks, 1) == 0.25
    assert recall_at_k(ranks, 5) == 0.5
    assert recall_at_k(ranks, 10) == 0.5
    assert recall_at_k(ranks, 20) == 0.75
    # NDCG@5 = (1/log2(2) + 1/log2(4)) / 4 = (1 + 0.5) / 4
    assert ndcg_at_k(ranks, 5) == pytest.approx(0.375)
    # NDCG@20 adds 1/log2(13) for the rank-12 hit
    assert ndcg_at_k(ranks, 20) == pytest.approx((1 + 0.5 + 1 / math.log2(13)) / 4)


def test_empty_split_gives_zero() -> None:
    assert recall_at_k(np.array([], dtype=np.int64), 10) == 0.0
    assert ndcg_at_k(np.array([], dtype=np.int64), 10) == 0.0


class FixedScores:
    """Ranks the whole catalogue by a fixed score vector, whatever the history."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores

    def rank(self, histories: np.ndarray, k: int) -> np.ndarray:
        order = np.argsort(-self.scores, kind="stable")[:k]
        return np.tile(order, (len(histories), 1))


class EchoLast:
    """Puts the last history item first, then everything else by index."""

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items

    def rank(self, histories: np.ndarray, k: int) -> np.ndarray:
        out = []
        for h in histories:
            last = int(h[-1])
            rest = [i for i in range(self.num_items) if i != last]
            out.append([last, *rest][:k])
        return np.array(out)


def split_of(histories: list[list[int]], targets: list[int]) -> EvalSplit:
    return EvalSplit(
        name="t",
        users=np.arange(len(targets)),
        histories=np.array(histories),
        targets=np.array(targets),
    )


def test_evaluate_ranks_the_full_catalogue() -> None:
    num_items = 30
    scores = -np.arange(num_items, dtype=np.float64)  # item 0 best, item 29 worst
    split = split_of([[PAD, 1]] * 3, [0, 4, 25])
    m = evaluate(FixedScores(scores), split, batch_size=2)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx(2 / 3)
    assert m["recall@20"] == pytest.approx(2 / 3)  # item 25 is rank 26: a miss at 20
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 3)
    assert m["users"] == 3


def test_evaluate_uses_each_row_history() -> None:
    split = split_of([[PAD, 3], [2, 7], [0, 5]], [3, 7, 1])
    m = evaluate(EchoLast(30), split)
    assert m["recall@1"] == pytest.approx(2 / 3)


def test_evaluate_visits_users_by_history_length_and_scores_each_its_own() -> None:
    class Recording(EchoLast):
        def __init__(self, num_items: int) -> None:
            super().__init__(num_items)
            self.seen: list[np.ndarray] = []

        def rank(self, histories: np.ndarray, k: int) -> np.ndarray:
            self.seen.append(histories.copy())
            return super().rank(histories, k)

    histories = [[4, 5, 6], [PAD, PAD, 3], [PAD, 1, 2], [PAD, PAD, 9], [7, 8, 0]]
    targets = [6, 3, 1, 9, 0]  # users 0, 1, 3 and 4 hit at rank 1; user 2 at rank 3 (after 2, 0)
    ranker = Recording(30)
    m = evaluate(ranker, split_of(histories, targets), batch_size=2)
    lengths = [int((h != PAD).sum()) for batch in ranker.seen for h in batch]
    assert lengths == [1, 1, 2, 3, 3]
    assert m["recall@1"] == pytest.approx(4 / 5)
    assert m["ndcg@5"] == pytest.approx((4 + 1 / math.log2(4)) / 5)
    assert evaluate(EchoLast(30), split_of(histories, targets), batch_size=5) == m


def test_evaluate_rejects_a_ranker_returning_the_wrong_shape() -> None:
    class Short:
        def rank(self, histories: np.ndarray, k: int) -> np.ndarray:
            return np.zeros((len(histories) - 1, k), dtype=np.int64)

    with pytest.raises(ValueError, match="expected"):
        evaluate(Short(), split_of([[0, 1]], [1]))
