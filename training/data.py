"""Datasets in the shared schema, the leave-one-out split and the training examples.

A dataset directory holds (see `docs/DATA.md`):

- `items.jsonl.gz`: one JSON object per item with `item_id` and either `text` or
  `title` / `attributes`. When the directory has none, the parent's is used and the catalogue
  is restricted to the items the sequences use (the layout of `amazon_scientific/mm_subset`).
- `sequences.jsonl.gz`: one user per line, `{"user_id", "item_ids": [...]}` in time order.
- optional `<name>.npy` feature matrices with `feature_item_ids.txt` (row r is that file's line r).

Items are indexed `0..N-1` in catalogue order. Padded histories use `PAD = -1`, left-padded so the
most recent item is always in the last column.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PAD = -1
ITEMS_FILE = "items.jsonl.gz"
SEQUENCES_FILE = "sequences.jsonl.gz"
FEATURE_IDS_FILE = "feature_item_ids.txt"
EMBEDDED_DATASET = Path(__file__).resolve().parent / "datasets" / "scientific_mm"


class DatasetError(ValueError):
    """A dataset file is missing, malformed or inconsistent; the message names file and line."""


@dataclass(frozen=True)
class Dataset:
    """A catalogue, its users' chronological sequences and any shipped feature matrices."""

    name: str
    root: Path
    item_ids: tuple[str, ...]
    item_text: tuple[str, ...]
    user_ids: tuple[str, ...]
    sequences: tuple[np.ndarray, ...]  # per user, int64 item indices in time order
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N, D) float32

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise DatasetError(f"{path}:{lineno}: expected a JSON object")
                yield lineno, row
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read gzip JSON Lines ({e})") from e


def item_text_of(row: dict[str, object]) -> str:
    """The text of an item: `text` when present, else title then attributes ("title. a, b")."""
    text = row.get("text")
    if isinstance(text, str) and text.strip():
        return text.strip()
    parts: list[str] = []
    title = row.get("title")
    if isinstance(title, str) and title.strip():
        parts.append(title.strip())
    attributes = row.get("attributes")
    if isinstance(attributes, list):
        names = [a for a in attributes if isinstance(a, str) and a]
        if names:
            parts.append(", ".join(names))
    return ". ".join(parts)


def _load_items(path: Path) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    for lineno, row in _read_jsonl(path):
        item = row.get("item_id")
        if not isinstance(item, str) or not item:
            raise DatasetError(f"{path}:{lineno}: missing or non-string 'item_id'")
        if item in seen:
            raise DatasetError(f"{path}:{lineno}: duplicate item_id {item!r}")
        seen.add(item)
        ids.append(item)
        texts.append(item_text_of(row))
    if not ids:
        raise DatasetError(f"{path}: no items")
    return ids, texts


def _load_sequences(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    users: list[str] = []
    seqs: list[list[str]] = []
    lines: list[int] = []
    for lineno, row in _read_jsonl(path):
        user = row.get("user_id")
        items = row.get("item_ids")
        if not isinstance(user, str) or not user:
            raise DatasetError(f"{path}:{lineno}: missing or non-string 'user_id'")
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise DatasetError(f"{path}:{lineno}: 'item_ids' must be a list of strings")
        if not items:
            raise DatasetError(f"{path}:{lineno}: empty sequence for user {user!r}")
        users.append(user)
        seqs.append(items)
        lines.append(lineno)
    if not users:
        raise DatasetError(f"{path}: no sequences")
    return users, seqs, lines


def _load_features(root: Path, index: dict[str, int]) -> dict[str, np.ndarray]:
    files = sorted(root.glob("*.npy"))
    if not files:
        return {}
    ids_path = root / FEATURE_IDS_FILE
    if not ids_path.exists():
        raise DatasetError(f"{ids_path}: missing; it names the rows of {files[0].name}")
    row_ids = ids_path.read_text(encoding="utf-8").split()
    position = {item: r for r, item in enumerate(row_ids)}
    missing = [i for i in index if i not in position]
    if missing:
        raise DatasetError(
            f"{ids_path}: {len(missing)} catalogue items have no feature row "
            f"(first: {missing[0]!r})"
        )
    # rows[i] = feature row of catalogue item i
    rows = np.array([position[item] for item in index], dtype=np.int64)
    features: dict[str, np.ndarray] = {}
    for path in files:
        matrix = np.load(path, mmap_mode="r")
        if matrix.ndim != 2 or matrix.shape[0] != len(row_ids):
            raise DatasetError(
                f"{path}: shape {matrix.shape} does not match "
                f"{len(row_ids)} rows in {ids_path.name}"
            )
        out = np.asarray(matrix[rows], dtype=np.float32)
        if not np.isfinite(out).all():
            raise DatasetError(f"{path}: contains NaN or infinite values")
        features[path.stem] = out
    return features


def load_dataset(root: Path | str | None = None) -> Dataset:
    """Load and validate a dataset directory; `None` loads the embedded default."""
    root = Path(root) if root is not None else EMBEDDED_DATASET
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    seq_path = root / SEQUENCES_FILE
    if not seq_path.exists():
        raise DatasetError(f"{seq_path}: missing")
    users, raw_seqs, lines = _load_sequences(seq_path)

    items_path = root / ITEMS_FILE
    restrict = False
    if not items_path.exists():
        items_path = root.parent / ITEMS_FILE
        restrict = True
        if not items_path.exists():
            raise DatasetError(f"{root / ITEMS_FILE}: missing (and none in the parent directory)")
    ids, texts = _load_items(items_path)
    if restrict:
        used = {i for s in raw_seqs for i in s}
        keep = [k for k, item in enumerate(ids) if item in used]
        ids, texts = [ids[k] for k in keep], [texts[k] for k in keep]

    index = {item: i for i, item in enumerate(ids)}
    sequences: list[np.ndarray] = []
    for user, seq, lineno in zip(users, raw_seqs, lines, strict=True):
        unknown = [i for i in seq if i not in index]
        if unknown:
            raise DatasetError(
                f"{seq_path}:{lineno}: user {user!r} has item {unknown[0]!r} "
                f"that is not in {items_path}"
            )
        sequences.append(np.array([index[i] for i in seq], dtype=np.int64))
    if len(set(users)) != len(users):
        raise DatasetError(f"{seq_path}: duplicate user_id")
    return Dataset(
        name=root.name,
        root=root,
        item_ids=tuple(ids),
        item_text=tuple(texts),
        user_ids=tuple(users),
        sequences=tuple(sequences),
        features=_load_features(root, index),
    )


# ---------------------------------------------------------------------------------------------
# Leave-one-out split
# ---------------------------------------------------------------------------------------------


def left_pad(histories: list[np.ndarray], max_len: int) -> np.ndarray:
    """Stack histories into (B, max_len), keeping the last `max_len` items, left-padded with PAD."""
    out = np.full((len(histories), max_len), PAD, dtype=np.int64)
    for row, h in enumerate(histories):
        h = h[-max_len:]
        if len(h):
            out[row, max_len - len(h) :] = h
    return out


def history_lengths(histories: np.ndarray) -> np.ndarray:
    """Items per row of left-padded (B, M) `histories`."""
    lengths: np.ndarray = (histories != PAD).sum(axis=1)
    return lengths


def trim_padding(histories: np.ndarray) -> np.ndarray:
    """The left-padded (B, M) `histories` without the leading columns that are PAD in every row
    (one column stays when all are). For the generative model, which sees only relative
    positions and masks padding keys, the answer is the same at the cost of the batch's longest
    history instead of M; most histories are far shorter (on Beauty, a third of the training
    prefixes' slots hold an item at M = 20). Not for SASRec: its positions are absolute."""
    real = (histories != PAD).any(axis=0)
    first = int(real.argmax()) if real.any() else histories.shape[1] - 1
    return histories[:, first:]


@dataclass(frozen=True)
class EvalSplit:
    """One target per user: `histories[u]` (left-padded, PAD=-1) is followed by `targets[u]`."""

    name: str
    users: np.ndarray  # (U,) user indices
    histories: np.ndarray  # (U, max_len) int64
    targets: np.ndarray  # (U,) int64

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class Split:
    """Leave-one-out: last item is test, second-to-last validation, the rest training.

    Users with fewer than 3 interactions have no validation/test target; their whole sequence
    is training data.
    """

    train: tuple[np.ndarray, ...]  # per user, the training part of the sequence
    valid: EvalSplit
    test: EvalSplit
    max_len: int


def leave_one_out(dataset: Dataset, max_len: int = 20) -> Split:
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    train: list[np.ndarray] = []
    eval_users: list[int] = []
    for u, seq in enumerate(dataset.sequences):
        if len(seq) >= 3:
            train.append(seq[:-2])
            eval_users.append(u)
        else:
            train.append(seq)
    users = np.array(eval_users, dtype=np.int64)
    seqs = [dataset.sequences[u] for u in eval_users]
    valid = EvalSplit(
        name="valid",
        users=users,
        histories=left_pad([s[:-2] for s in seqs], max_len),
        targets=np.array([s[-2] for s in seqs], dtype=np.int64),
    )
    test = EvalSplit(
        name="test",
        users=users,
        histories=left_pad([s[:-1] for s in seqs], max_len),
        targets=np.array([s[-1] for s in seqs], dtype=np.int64),
    )
    return Split(train=tuple(train), valid=valid, test=test, max_len=max_len)


# Diagnostic splits over the evaluated users (never for model selection): where a model's
# validation-to-test drop comes from.
PROBE_SPLITS = ("train-last", "test-skip-valid")


def probe_split(dataset: Dataset, name: str, max_len: int = 20) -> EvalSplit:
    """`train-last`: history s[:-3], target s[-3], the last training target (seen in training);
    `test-skip-valid`: history s[:-2], target s[-1], the test target two steps ahead, without
    the validation item in the history. Same users as `leave_one_out`'s valid and test."""
    offsets = {"train-last": (3, 3), "test-skip-valid": (2, 1)}
    if name not in offsets:
        raise ValueError(f"unknown probe split {name!r}; choose from {PROBE_SPLITS}")
    cut, target = offsets[name]
    users = [u for u, seq in enumerate(dataset.sequences) if len(seq) >= 3]
    seqs = [dataset.sequences[u] for u in users]
    return EvalSplit(
        name=name,
        users=np.array(users, dtype=np.int64),
        histories=left_pad([s[:-cut] for s in seqs], max_len),
        targets=np.array([s[-target] for s in seqs], dtype=np.int64),
    )


def training_prefixes(train: tuple[np.ndarray, ...], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every prefix of every training sequence as one example.

    Returns `(histories (E, max_len) left-padded, targets (E,))`: for a sequence s and each
    i >= 1, history s[max(0, i - max_len):i] and target s[i].
    """
    hists: list[np.ndarray] = []
    targets: list[int] = []
    for seq in train:
        for i in range(1, len(seq)):
            hists.append(seq[max(0, i - max_len) : i])
            targets.append(int(seq[i]))
    return left_pad(hists, max_len), np.array(targets, dtype=np.int64)


def training_windows(train: tuple[np.ndarray, ...], max_len: int) -> np.ndarray:
    """Causal training windows: every training target exactly once, for models that predict at
    every position (SASRec).

    Returns (W, max_len + 1) left-padded windows; position t predicts position t + 1. Windows end
    at the sequence end and step back by `max_len`, so a sequence of up to `max_len + 1` items
    is one window in which every prefix sees its whole history.
    """
    windows: list[np.ndarray] = []
    for seq in train:
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            windows.append(seq[start:end])
            end = start + 1  # the next window's last item is this window's first (an input only)
    return left_pad(windows, max_len + 1)
