from __future__ import annotations

from pathlib import Path

import pytest

from model.sasrec import SASRecConfig
from training.data import load_dataset
from training.loop import TrainConfig
from training.sasrec import train_sasrec


def test_length_grouping_is_refused_for_sasrec(tmp_path: Path) -> None:
    dataset = load_dataset()
    with pytest.raises(ValueError, match="group_by_length"):
        train_sasrec(
            dataset,
            SASRecConfig(num_items=dataset.num_items),
            TrainConfig(group_by_length=True),
            tmp_path,
            device="cpu",
        )
    assert not any(tmp_path.iterdir())
