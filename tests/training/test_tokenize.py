from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from model.tokenizer import TokenizerConfig
from training.cli import app
from training.data import load_dataset
from training.loop import TrainConfig
from training.tokenize import (
    SemanticIds,
    Tokenizer,
    add_extra_level,
    collision_rate,
    level_stats,
    successors,
    train_tokenizer,
)

runner = CliRunner()


def test_extra_level_makes_colliding_codes_unique_in_item_order() -> None:
    codes = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    sids = add_extra_level(codes, codebook_size=4)
    assert sids[:, -1].tolist() == [0, 0, 1, 2, 0]
    assert collision_rate(codes) == pytest.approx(0.6)
    assert collision_rate(sids) == 0.0


def test_extra_level_refuses_a_group_larger_than_the_codebook() -> None:
    with pytest.raises(ValueError, match="share one code prefix"):
        add_extra_level(np.zeros((5, 2), dtype=np.int64), codebook_size=4)


def test_level_stats() -> None:
    codes = np.array([[0, 1], [0, 2], [1, 3], [1, 0]])
    stats = level_stats(codes, codebook_size=4)
    assert stats[0]["utilisation"] == 0.5
    assert stats[0]["perplexity"] == pytest.approx(2.0)
    assert stats[1]["utilisation"] == 1.0
    assert stats[1]["perplexity"] == pytest.approx(4.0)


def test_sid_table_round_trips_and_allocates_free_extra_slots() -> None:
    sids = add_extra_level(np.array([[1, 2], [0, 0], [1, 2]]), codebook_size=4)
    table = SemanticIds(sids)
    for item, row in enumerate(sids):
        assert table.item(tuple(int(c) for c in row)) == item
    sorted_sids, items = table.sorted_table()
    assert (sids[items] == sorted_sids).all()
    assert sorted_sids.tolist() == sorted(sids.tolist())
    assert table.next_extra((1, 2), 4) == 2
    assert table.next_extra((3, 3), 4) == 0


def test_successors_come_from_training_sequences_only() -> None:
    follow = successors((np.array([0, 1, 2]), np.array([1, 1, 3])), num_items=4)
    assert [f.tolist() for f in follow] == [[1], [2, 3], [], []]


def test_tokenize_end_to_end_on_the_bundled_dataset(tmp_path: Path) -> None:
    sas_cfg = tmp_path / "sasrec.json"
    sas_cfg.write_text(json.dumps({"model": {"dim": 16, "heads": 2, "layers": 1}}))
    sasrec = tmp_path / "sasrec"
    result = runner.invoke(
        app,
        [
            "train-sasrec",
            "--out",
            str(sasrec),
            "--config",
            str(sas_cfg),
            "--epochs",
            "1",
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    tok_cfg = tmp_path / "tok.json"
    tok_cfg.write_text(
        json.dumps(
            {
                "tokenizer": {
                    "id_dim": 16,
                    "code_dim": 8,
                    "hidden": 32,
                    "levels": 3,
                    "codebook_size": 64,
                },
                "train": {"batch_size": 256},
            }
        )
    )
    out = tmp_path / "tok"
    # CLIP image + text features: the MiniLM path has its own tests
    result = runner.invoke(
        app,
        [
            "tokenize",
            "--out",
            str(out),
            "--config",
            str(tok_cfg),
            "--sasrec",
            str(sasrec),
            "--modalities",
            "clip_vitb32_image,clip_vitb32_text",
            "--epochs",
            "2",
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in (
        "tokenizer.pt",
        "sids.npy",
        "item_ids.txt",
        "sid_index.npz",
        "metrics.json",
        "code_usage.png",
        "losses.png",
        "run.json",
    ):
        assert (out / name).exists(), name

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["collision_rate_after_extra_level"] == 0.0
    assert len(metrics["levels"]) == 3
    assert all(0 < lv["utilisation"] <= 1 for lv in metrics["levels"])
    assert set(metrics["reconstruction_error"]) == {"clip_vitb32_image", "clip_vitb32_text"}
    assert len(metrics["curves"]) == 2
    curve = metrics["curves"][0]
    assert {"train_club", "train_align", "train_recon", "train_club_raw"} <= set(curve)
    assert 0.0 <= curve["train_club_clamped"] <= 1.0

    tok = Tokenizer(out)
    ds = load_dataset()
    sids = tok.table.sids
    assert sids.shape == (ds.num_items, 4)
    assert len({tuple(r) for r in sids.tolist()}) == ds.num_items
    assert tok.item_ids == list(ds.item_ids)
    assert int(sids[:, :3].max()) < 64
    index = np.load(out / "sid_index.npz")
    assert (sids[index["items"]] == index["sids"]).all()

    # a new item, known only by its features, gets a valid, fresh and deterministic SID
    feats = {m: ds.features[m][0] + 0.01 for m in ("clip_vitb32_image", "clip_vitb32_text")}
    sid = tok.new_item_sid(feats)
    assert sid == tok.new_item_sid(feats)
    assert len(sid) == 4
    assert all(0 <= c < 64 for c in sid)
    assert tok.table.item(sid) is None
    with pytest.raises(ValueError, match="lacks modality"):
        tok.new_item_sid({"clip_vitb32_image": feats["clip_vitb32_image"]})


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tokenize", "--out", str(tmp_path), "--variant", "nope"])
    assert result.exit_code == 2
    assert "unknown variant" in result.output


def test_length_grouping_is_refused_for_the_tokenizer(tmp_path: Path) -> None:
    dataset = load_dataset()
    config = TokenizerConfig(modalities=(("text", 512),), num_items=dataset.num_items, id_dim=0)
    with pytest.raises(ValueError, match="group_by_length"):
        train_tokenizer(
            dataset,
            config,
            TrainConfig(group_by_length=True),
            tmp_path / "tok",
            modality_names=["text"],
            device="cpu",
        )
    assert not (tmp_path / "tok").exists()
