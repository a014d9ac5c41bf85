"""Fixtures shared across test modules: one tiny pipeline on the embedded dataset."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app

# A generative model small enough to train for an epoch in seconds.
TINY_GENERATIVE = {
    "model": {
        "d_model": 16,
        "heads": 2,
        "d_kv": 8,
        "d_ff": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
    }
}


def invoke(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def tokenize_tiny(root: Path, modalities: str, tokenizer: dict[str, int], *extra: str) -> Path:
    """A no-z_ID tokenizer over `modalities`, trained for 2 epochs, in root/tok."""
    cfg = root / "tok.json"
    cfg.write_text(json.dumps({"tokenizer": tokenizer}))
    out = root / "tok"
    invoke(
        "tokenize",
        *("--out", str(out), "--variant", "no-id", "--config", str(cfg)),
        *("--modalities", modalities, "--epochs", "2", "--no-progress", "--device", "cpu"),
        *extra,
    )
    return out


def train_and_export(root: Path, tokenizer: Path, *extra: str) -> tuple[Path, Path]:
    """A one-epoch TINY_GENERATIVE run on `tokenizer` in root/run, and its bundle root/bundle."""
    cfg = root / "gen.json"
    cfg.write_text(json.dumps(TINY_GENERATIVE))
    invoke(
        "train",
        *("--out", str(root / "run"), "--tokenizer", str(tokenizer), "--config", str(cfg)),
        *("--epochs", "1", "--no-progress", "--device", "cpu"),
        *extra,
    )
    invoke("export", "--run", str(root / "run"), "--out", str(root / "bundle"))
    return root / "run", root / "bundle"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 x 64 no-z_ID tokenizer over the CLIP features, trained for 2 epochs."""
    return tokenize_tiny(
        tmp_path_factory.mktemp("tok"),
        "clip_vitb32_image,clip_vitb32_text",
        {"code_dim": 8, "hidden": 32, "levels": 2, "codebook_size": 64},
    )


@pytest.fixture(scope="session")
def exported(tiny_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-epoch generative run on the tiny tokenizer, and its bundle."""
    return train_and_export(tmp_path_factory.mktemp("export"), tiny_tokenizer)


@pytest.fixture(scope="session")
def retokenized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """What a retraining ships: the tiny tokenizer's config trained again with another seed
    (other codebooks, other SIDs), a run on it, and its bundle."""
    root = tmp_path_factory.mktemp("retokenized")
    tok = tokenize_tiny(
        root,
        "clip_vitb32_image,clip_vitb32_text",
        {"code_dim": 8, "hidden": 32, "levels": 2, "codebook_size": 64},
        *("--seed", "2"),  # (seed 1 collapses this 2-epoch toy onto one prefix)
    )
    return train_and_export(root, tok)


# A small catalogue with real item texts: words shared within a group, so text features differ.
TEXT_ITEMS = {
    f"{group}-{n}": f"{group} {kind} {n}"
    for group, kinds in {
        "glass": ("beaker", "flask", "pipette", "test tube"),
        "safety": ("goggles", "gloves", "lab coat", "face shield"),
        "electronics": ("multimeter", "oscilloscope", "soldering iron", "breadboard"),
    }.items()
    for n, kind in enumerate(kinds)
}


@pytest.fixture(scope="session")
def text_exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle whose only modality is the item text: it ships the text encoder."""
    root = tmp_path_factory.mktemp("text")
    data = root / "dataset"
    data.mkdir()
    items = list(TEXT_ITEMS)
    with gzip.open(data / "items.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"item_id": i, "text": t}) + "\n" for i, t in TEXT_ITEMS.items())
    with gzip.open(data / "sequences.jsonl.gz", "wt") as f:
        for u in range(40):
            seq = [items[(u + 4 * j) % len(items)] for j in range(4 + u % 3)]
            f.write(json.dumps({"user_id": f"u{u}", "item_ids": seq}) + "\n")
    data_args = ("--dataset", str(data))
    tok = tokenize_tiny(
        root, "text", {"code_dim": 8, "hidden": 16, "levels": 2, "codebook_size": 4}, *data_args
    )
    return train_and_export(root, tok, *data_args)
