from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.training.test_data import make_dataset, write_jsonl
from training import features
from training.data import load_dataset
from training.features import (
    available_modalities,
    load_modalities,
    text_cache_key,
    text_cache_path,
    text_features,
)


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds", {"u": ["a", "b", "c"]}, ["a", "b", "c"])


def test_text_features_use_the_real_encoder_and_are_cached(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = load_dataset(dataset_dir)
    first = text_features(ds, cache_dir=tmp_path / "cache", progress=False)
    assert first.shape == (3, 384)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert text_cache_path(ds, tmp_path / "cache").exists()

    def no_encoder(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(features, "TextEncoder", no_encoder)
    again = text_features(ds, cache_dir=tmp_path / "cache", progress=False)
    assert np.array_equal(first, again)


def test_similar_texts_are_closer_than_unrelated_ones(tmp_path: Path) -> None:
    root = tmp_path / "sim"
    root.mkdir()
    write_jsonl(
        root / "items.jsonl.gz",
        [
            {"item_id": "a", "title": "red nail polish", "attributes": ["Makeup"]},
            {"item_id": "b", "title": "crimson nail lacquer", "attributes": ["Makeup"]},
            {"item_id": "c", "title": "fishing rod", "attributes": ["Outdoors"]},
        ],
    )
    write_jsonl(root / "sequences.jsonl.gz", [{"user_id": "u", "item_ids": ["a", "b", "c"]}])
    emb = text_features(load_dataset(root), cache_dir=tmp_path / "cache", progress=False)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_cache_key_changes_with_the_text(dataset_dir: Path) -> None:
    ds = load_dataset(dataset_dir)
    write_jsonl(
        dataset_dir / "items.jsonl.gz",
        [{"item_id": i, "text": f"changed {i}"} for i in ["a", "b", "c"]],
    )
    assert text_cache_key(ds) != text_cache_key(load_dataset(dataset_dir))


def test_modalities_are_generic_and_unknown_ones_fail(dataset_dir: Path, tmp_path: Path) -> None:
    (dataset_dir / "feature_item_ids.txt").write_text("a\nb\nc\n")
    np.save(dataset_dir / "image.npy", np.ones((3, 4), dtype=np.float16))
    ds = load_dataset(dataset_dir)
    assert available_modalities(ds) == ["text", "image"]
    mods = load_modalities(ds, ["image"], cache_dir=tmp_path)
    assert mods["image"].dtype == np.float32
    with pytest.raises(KeyError, match="'audio' is not available"):
        load_modalities(ds, ["audio"], cache_dir=tmp_path)


def test_dataset_without_text_has_no_text_modality(tmp_path: Path) -> None:
    root = tmp_path / "notext"
    root.mkdir()
    write_jsonl(root / "items.jsonl.gz", [{"item_id": "a"}, {"item_id": "b"}])
    write_jsonl(root / "sequences.jsonl.gz", [{"user_id": "u", "item_ids": ["a", "b"]}])
    ds = load_dataset(root)
    assert available_modalities(ds) == []
    with pytest.raises(ValueError, match="no item has text"):
        text_features(ds, cache_dir=tmp_path)
