"""Load an exported bundle with numpy and ONNX Runtime only (no torch), and run it.

Loading verifies the manifest's format version and the sha256 of every file it lists, and
refuses a missing, incomplete, corrupt or mismatched bundle with a message that names the file.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from model.trie import next_free_extra, taken_extras, trie_tables
from service.manifest import BundleError, read_manifest, sid_space
from training.data import trim_padding


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    return options


@dataclass(frozen=True)
class Catalogue:
    """An immutable snapshot of the item tables and their trie. Adding an item makes a new
    snapshot that the service swaps in whole, so a batch never sees half an update."""

    item_ids: list[str]
    sids: np.ndarray  # (N, D) int64
    view_codes: np.ndarray  # (N, V, L) int64
    popularity: np.ndarray  # (N,) int64
    codebook_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {item: i for i, item in enumerate(self.item_ids)})
        object.__setattr__(self, "trie", trie_tables(self.sids, self.codebook_size))

    index: dict[str, int] = field(init=False)
    trie: list[np.ndarray] = field(init=False)

    def with_item(self, item_id: str, sid: np.ndarray, view_codes: np.ndarray) -> Catalogue:
        """A new snapshot with one more item, at index len(item_ids) (recommendable at once:
        the tables are graph inputs)."""
        return self.with_items([(item_id, sid, view_codes)])

    def with_items(self, items: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> Catalogue:
        """A new snapshot with `items` (id, SID, view codes) appended in order, built once."""
        ids = [item_id for item_id, _, _ in items]
        if clash := [i for i, n in Counter(ids).items() if n > 1 or i in self.index]:
            raise ValueError(f"items already exist: {clash[:10]}")
        if not items:
            return self
        return Catalogue(
            item_ids=[*self.item_ids, *ids],
            sids=np.concatenate([self.sids, np.asarray([s for _, s, _ in items], dtype=np.int64)]),
            view_codes=np.concatenate(
                [self.view_codes, np.asarray([v for _, _, v in items], dtype=np.int64)]
            ),
            popularity=np.concatenate([self.popularity, np.zeros(len(items), dtype=np.int64)]),
            codebook_size=self.codebook_size,
        )

    def taken_extras(self, prefix: np.ndarray) -> list[int]:
        """The extra-level indices used under a SID prefix (the other codes)."""
        return taken_extras(self.sids, prefix)

    def next_extra(self, codes: np.ndarray) -> int:
        """Smallest extra-level index not yet used under this SID prefix (deterministic)."""
        return next_free_extra(self.sids, codes, self.codebook_size)


TABLES = ("sids.npy", "view_codes.npy", "popularity.npy")
TEXT_BATCH = 64  # texts per text-encoder call when items are quantized again


def item_source(text: str | None, vectors: dict[str, np.ndarray]) -> dict[str, Any]:
    """What an item was added from, as stored (JSON): its raw text and its vectors (float32,
    exact, base64), so that a bundle of another tokenizer can quantize it again."""
    source: dict[str, Any] = {
        "vectors": {
            m: base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            for m, v in vectors.items()
        }
    }
    if text is not None:
        source["text"] = text
    return source


def source_vectors(source: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        m: np.frombuffer(base64.b64decode(v), dtype="<f4").astype(np.float32)
        for m, v in source.get("vectors", {}).items()
    }


def check_export(
    path: Path,
    manifest: dict[str, Any],
    recommender: ort.InferenceSession,
    quantizer: ort.InferenceSession,
    items: int,
    tables: dict[str, np.ndarray],
) -> None:
    """Graphs and tables of one export: each graph takes the inputs the manifest declares, and
    each table has one row per item and the shape the recommender's inputs declare. The hashes
    catch a damaged file; this catches files of different exports under one manifest."""
    declared = manifest["recommender"]["inputs"]
    expected_inputs = (
        (recommender, manifest["recommender"]["file"], set(declared)),
        (quantizer, manifest["quantizer"]["file"], {m["input"] for m in manifest["modalities"]}),
    )
    for session, file, want in expected_inputs:
        if (got := {i.name for i in session.get_inputs()}) != want:
            raise BundleError(
                f"{path / file}: inputs {sorted(got)}, the manifest says {sorted(want)}"
            )
    shapes = {
        "sids.npy": (items, *declared["sid_table"][1:]),
        # also kept when the graph takes no view codes: items added at serving time carry them
        "view_codes.npy": (items, *manifest["quantizer"]["outputs"]["view_codes"][1:]),
        "popularity.npy": (items,),
    }
    for name, table in tables.items():
        if table.shape != shapes[name]:
            raise BundleError(
                f"{path / name}: shape {table.shape}, but item_ids.txt and the manifest make it "
                f"{shapes[name]} (files of different exports?)"
            )


class TextEmbedder:
    """The bundle's text encoder (`text_encoder.onnx` + `text_tokenizer.json`): raw text ->
    the text modality's vector, tokenized and pooled exactly as in training."""

    def __init__(self, path: Path, entry: dict[str, Any], session: ort.InferenceSession) -> None:
        self.modality, self.session = str(entry["modality"]), session
        self.dim = int(entry["outputs"]["embedding"][1])
        self.tokenizer = Tokenizer.from_file(str(path / entry["tokenizer"]))
        self.tokenizer.enable_truncation(int(entry["max_tokens"]))
        self.tokenizer.enable_padding(pad_id=int(entry["pad_id"]))

    def embed(self, texts: list[str]) -> np.ndarray:
        """(B, dim) float32, unit norm."""
        encoded = self.tokenizer.encode_batch(texts)
        feed = {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        }
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)


class Bundle:
    """A loaded bundle: ORT sessions, the manifest and the catalogue tables."""

    def __init__(
        self,
        path: Path,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int = 1,
        beam: int | None = None,
    ) -> None:
        """`beam`: the beam width of every search (it keeps max(k, beam) prefixes); default the
        one the model was trained and exported with. Narrower is faster and may rank worse."""
        self.path = path
        self.manifest = read_manifest(path)
        m = self.manifest
        self.sid_space = sid_space(m)  # what its SIDs mean: one per tokenizer
        # Items added under another tokenizer that this bundle cannot quantize (not looked up
        # again while it serves).
        self.unplaced: set[str] = set()
        # what the graph takes (checked against the graph below): a model without the
        # similarity reweighting takes no view codes
        self.recommender_inputs = frozenset(m["recommender"]["inputs"])
        self.beam = int(m["beam"]) if beam is None else beam
        if self.beam < 1:
            raise ValueError(f"beam must be >= 1, got {self.beam}")
        opts = session_options(intra_op_threads)
        providers = providers or ["CPUExecutionProvider"]
        self.recommender = ort.InferenceSession(
            str(path / m["recommender"]["file"]), opts, providers=providers
        )
        self.quantizer = ort.InferenceSession(
            str(path / m["quantizer"]["file"]), opts, providers=providers
        )
        self.text: TextEmbedder | None = None
        if (entry := m.get("text_encoder")) is not None:
            session = ort.InferenceSession(str(path / entry["file"]), opts, providers=providers)
            self.text = TextEmbedder(path, entry, session)
        item_ids = (path / "item_ids.txt").read_text().split()
        tables = {name: np.load(path / name) for name in TABLES}
        check_export(path, m, self.recommender, self.quantizer, len(item_ids), tables)
        self.catalogue = Catalogue(
            item_ids=item_ids,
            sids=tables["sids.npy"],
            view_codes=tables["view_codes.npy"],
            popularity=tables["popularity.npy"],
            codebook_size=int(m["codebook_size"]),
        )

    @property
    def version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def max_history(self) -> int:
        return int(self.manifest["max_history"])

    def recommend(
        self, histories: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items (B, k) (-1 where the catalogue has fewer) and their scores, for left-padded
        histories (B, M) of item indices (-1 = padding); `exclude` (B, E) items never returned.
        The graph runs on the batch's longest history (`training.data.trim_padding`), not M."""
        if not 1 <= k <= int(self.manifest["max_k"]):
            raise ValueError(f"k must be in [1, {self.manifest['max_k']}], got {k}")
        histories = np.ascontiguousarray(
            trim_padding(histories[:, -self.max_history :]), dtype=np.int64
        )
        if exclude is None:
            exclude = np.full((len(histories), 1), -1, dtype=np.int64)
        cat = self.catalogue
        feed = {
            "histories": histories,
            "k": np.array(k, dtype=np.int64),
            "beam": np.array(self.beam, dtype=np.int64),
            "exclude": np.ascontiguousarray(exclude, dtype=np.int64),
            "sid_table": cat.sids,
            "view_table": cat.view_codes,
            **{f"trie_{d}": t for d, t in enumerate(cat.trie)},
        }
        taken = {name: value for name, value in feed.items() if name in self.recommender_inputs}
        items, scores = self.recommender.run(None, taken)
        return items, scores

    def rank(self, histories: np.ndarray, k: int) -> np.ndarray:
        """The `training.evaluation.Ranker` protocol: evaluate the bundle through ONNX Runtime."""
        return self.recommend(histories, k)[0]

    def quantize(self, features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """For new items known by their modality features: (B, L) codes of the content-only
        fused view (the SID prefix) and (B, V, L) codes per similarity view (-1 = absent)."""
        feed = {}
        for mod in self.manifest["modalities"]:
            if mod["name"] not in features:
                raise ValueError(f"missing modality {mod['name']!r}")
            x = np.atleast_2d(np.asarray(features[mod["name"]], dtype=np.float32))
            if x.shape[1] != mod["dim"]:
                raise ValueError(
                    f"modality {mod['name']!r} needs dim {mod['dim']}, got {x.shape[1]}"
                )
            feed[mod["input"]] = x
        codes, view_codes = self.quantizer.run(None, feed)
        return np.asarray(codes, dtype=np.int64), np.asarray(view_codes, dtype=np.int64)

    def quantize_sources(
        self, sources: Sequence[dict[str, Any]]
    ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Codes (the SID prefix, and the view codes) of items known by what they were added
        from (`item_source`), e.g. under a bundle of another tokenizer; None for an item this
        bundle cannot quantize (a modality it needs is missing, or of another dimension, or
        text without this bundle's text encoder). Texts are embedded again, in batches."""
        texts = {i: str(s["text"]) for i, s in enumerate(sources) if "text" in s}
        embedded: dict[int, np.ndarray] = {}
        if self.text is not None:
            order = list(texts)
            for start in range(0, len(order), TEXT_BATCH):
                chunk = order[start : start + TEXT_BATCH]
                embedded.update(zip(chunk, self.text.embed([texts[i] for i in chunk]), strict=True))
        out: list[tuple[np.ndarray, np.ndarray] | None] = []
        for i, source in enumerate(sources):
            features = source_vectors(source)
            if i in texts:
                if self.text is None:
                    out.append(None)
                    continue
                features[self.text.modality] = embedded[i]
            try:
                codes, view_codes = self.quantize(features)
            except ValueError:
                out.append(None)
                continue
            out.append((codes[0], view_codes[0]))
        return out
