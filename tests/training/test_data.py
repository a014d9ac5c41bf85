from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from training.data import (
    PAD,
    DatasetError,
    item_text_of,
    leave_one_out,
    left_pad,
    load_dataset,
    probe_split,
    training_prefixes,
    training_windows,
    trim_padding,
)


def write_jsonl(path: Path, rows: list[object]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_dataset(root: Path, sequences: dict[str, list[str]], items: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "items.jsonl.gz", [{"item_id": i, "text": f"item {i}"} for i in items])
    write_jsonl(
        root / "sequences.jsonl.gz",
        [{"user_id": u, "item_ids": s} for u, s in sequences.items()],
    )
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_dataset(
        tmp_path / "tiny",
        {"u1": ["a", "b", "c", "d"], "u2": ["b", "c", "e"], "u3": ["e", "a"]},
        ["a", "b", "c", "d", "e"],
    )


def test_embedded_dataset_loads_with_both_clip_modalities() -> None:
    ds = load_dataset()
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (2928, 1585, 19712)
    assert set(ds.features) == {"clip_vitb32_image", "clip_vitb32_text"}
    for matrix in ds.features.values():
        assert matrix.shape == (1585, 512)
        assert matrix.dtype == np.float32
    assert all(ds.item_text)


def test_loads_items_and_indexes_sequences(tiny: Path) -> None:
    ds = load_dataset(tiny)
    assert ds.item_ids == ("a", "b", "c", "d", "e")
    assert [s.tolist() for s in ds.sequences] == [[0, 1, 2, 3], [1, 2, 4], [4, 0]]
    assert ds.name == "tiny"


def test_unknown_item_names_file_and_line(tiny: Path) -> None:
    write_jsonl(
        tiny / "sequences.jsonl.gz",
        [{"user_id": "u1", "item_ids": ["a"]}, {"user_id": "u2", "item_ids": ["a", "zz"]}],
    )
    with pytest.raises(DatasetError, match=r"sequences\.jsonl\.gz:2: user 'u2' has item 'zz'"):
        load_dataset(tiny)


def test_empty_sequence_is_rejected_with_line(tiny: Path) -> None:
    write_jsonl(tiny / "sequences.jsonl.gz", [{"user_id": "u1", "item_ids": []}])
    with pytest.raises(DatasetError, match=r"sequences\.jsonl\.gz:1: empty sequence"):
        load_dataset(tiny)


def test_invalid_json_names_line(tiny: Path) -> None:
    with gzip.open(tiny / "items.jsonl.gz", "wt") as f:
        f.write('{"item_id": "a"}\n{not json\n')
    with pytest.raises(DatasetError, match=r"items\.jsonl\.gz:2: invalid JSON"):
        load_dataset(tiny)


def test_duplicate_item_is_rejected(tiny: Path) -> None:
    write_jsonl(tiny / "items.jsonl.gz", [{"item_id": "a"}, {"item_id": "a"}])
    with pytest.raises(DatasetError, match=r"items\.jsonl\.gz:2: duplicate item_id 'a'"):
        load_dataset(tiny)


def test_feature_row_count_mismatch_names_file(tiny: Path) -> None:
    (tiny / "feature_item_ids.txt").write_text("a\nb\nc\nd\ne\n")
    np.save(tiny / "image.npy", np.zeros((4, 8), dtype=np.float32))
    with pytest.raises(DatasetError, match=r"image\.npy: shape \(4, 8\) does not match 5 rows"):
        load_dataset(tiny)


def test_feature_rows_follow_their_id_list(tiny: Path) -> None:
    order = ["e", "d", "c", "b", "a"]
    (tiny / "feature_item_ids.txt").write_text("\n".join(order))
    np.save(tiny / "image.npy", np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 3)))
    ds = load_dataset(tiny)
    # catalogue item i ("a".."e") must get the row that the id list assigns to it
    assert ds.features["image"][:, 0].tolist() == [4.0, 3.0, 2.0, 1.0, 0.0]


def test_items_missing_a_feature_row_are_reported(tiny: Path) -> None:
    (tiny / "feature_item_ids.txt").write_text("a\nb\n")
    np.save(tiny / "image.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(DatasetError, match="3 catalogue items have no feature row"):
        load_dataset(tiny)


def test_subset_directory_uses_parent_items_restricted_to_its_sequences(tmp_path: Path) -> None:
    parent = make_dataset(tmp_path / "full", {"u": ["a", "b", "c"]}, ["a", "b", "c", "d"])
    sub = parent / "subset"
    sub.mkdir()
    write_jsonl(sub / "sequences.jsonl.gz", [{"user_id": "u", "item_ids": ["c", "a"]}])
    ds = load_dataset(sub)
    assert ds.item_ids == ("a", "c")


def test_item_text_is_title_then_attributes() -> None:
    assert item_text_of({"text": " given "}) == "given"
    assert item_text_of({"title": "Lipstick", "attributes": ["OPI", "Makeup"]}) == (
        "Lipstick. OPI, Makeup"
    )
    assert item_text_of({"title": None, "attributes": ["Ghost", "Hunting"]}) == "Ghost, Hunting"
    assert item_text_of({"title": None, "attributes": None}) == ""


def test_left_pad_keeps_most_recent_items() -> None:
    out = left_pad([np.array([1, 2, 3, 4]), np.array([7]), np.array([], dtype=np.int64)], 3)
    assert out.tolist() == [[2, 3, 4], [PAD, PAD, 7], [PAD, PAD, PAD]]


def test_trim_padding_drops_only_columns_that_are_padding_in_every_row() -> None:
    h = left_pad([np.array([1, 2]), np.array([7]), np.array([], dtype=np.int64)], 5)
    assert trim_padding(h).tolist() == [[1, 2], [PAD, 7], [PAD, PAD]]
    assert trim_padding(left_pad([np.array([1, 2, 3])], 3)).tolist() == [[1, 2, 3]]
    # all padding: one column stays, so the row still reaches the model
    assert trim_padding(np.full((2, 4), PAD)).tolist() == [[PAD], [PAD]]
    assert trim_padding(np.empty((3, 0), dtype=np.int64)).shape == (3, 0)


def test_leave_one_out_split(tiny: Path) -> None:
    split = leave_one_out(load_dataset(tiny), max_len=2)
    # u3 has only 2 interactions: training only
    assert split.valid.users.tolist() == [0, 1]
    assert split.test.targets.tolist() == [3, 4]
    assert split.valid.targets.tolist() == [2, 2]
    assert split.test.histories.tolist() == [[1, 2], [1, 2]]
    assert split.valid.histories.tolist() == [[0, 1], [PAD, 1]]
    assert [t.tolist() for t in split.train] == [[0, 1], [1], [4, 0]]


def test_probe_splits_take_the_evaluated_users_at_other_offsets(tiny: Path) -> None:
    ds = load_dataset(tiny)
    loo = leave_one_out(ds, max_len=2)
    last = probe_split(ds, "train-last", max_len=2)
    skip = probe_split(ds, "test-skip-valid", max_len=2)
    assert last.users.tolist() == skip.users.tolist() == loo.test.users.tolist() == [0, 1]
    # u1 = a b c d: the last training target b after a; the test target d after a b
    assert last.targets.tolist() == [1, 1]
    assert last.histories.tolist() == [[PAD, 0], [PAD, PAD]]
    assert skip.targets.tolist() == loo.test.targets.tolist()
    assert skip.histories.tolist() == loo.valid.histories.tolist()
    with pytest.raises(ValueError, match="unknown probe split"):
        probe_split(ds, "valid")


def test_split_never_trains_on_validation_or_test_items(tiny: Path) -> None:
    ds = load_dataset(tiny)
    split = leave_one_out(ds)
    for u, seq in enumerate(ds.sequences):
        if len(seq) >= 3:
            assert split.train[u].tolist() == seq[:-2].tolist()


def test_training_prefixes_are_every_prefix_truncated() -> None:
    hists, targets = training_prefixes((np.array([1, 2, 3, 4]), np.array([5])), max_len=2)
    assert targets.tolist() == [2, 3, 4]
    assert hists.tolist() == [[PAD, 1], [1, 2], [2, 3]]


@pytest.mark.parametrize("length", [1, 2, 5, 21, 22, 40, 61])
def test_training_windows_cover_every_target_once(length: int) -> None:
    seq = np.arange(100, 100 + length)
    windows = training_windows((seq,), max_len=20)
    assert windows.shape[1] == 21
    targets: list[int] = []
    for w in windows:
        real = w[w != PAD]
        assert (np.diff(real) == 1).all()  # a window is a contiguous slice
        targets += real[1:].tolist()  # a window's first item is an input only
    # every item but the sequence's first is a target exactly once
    assert sorted(targets) == seq[1:].tolist()
