"""Export a trained generative run to one versioned, self-describing ONNX bundle.

Bundle directory (`bbqrec export --run RUN --out DIR`):

- `recommender.onnx`: histories (B, M) item indices (-1 = padding), k, beam width, exclude
  (B, E) and the catalogue tables (SID table, view-code table, trie tables) -> top-k items and
  scores. Encoder, similarity reweighting, the unrolled decoder steps and the trie-constrained
  beam search are one graph. The tables are graph inputs, not constants, so items added at
  serving time are recommendable without re-exporting.
- `quantizer.onnx`: modality features -> the L codes of a new item's content-only fused view.
- `text_encoder.onnx` + `text_tokenizer.json` (only when the text modality is an input): the
  training text encoder (all-MiniLM-L6-v2, mean pooling, L2 norm), so a new item's raw text is
  embedded at serving time exactly as in training.
- `item_ids.txt`, `sids.npy`, `view_codes.npy`, `popularity.npy`: the catalogue tables (item id
  <-> index <-> SID; per-view codes; training-split interaction counts for cold start).
- `manifest.json`: format version, configs, SID depth, codebook size, vocab, opset, graph inputs
  and outputs, sha256 of every file, training metrics, versions, git SHA, creation time.

Exported with the TorchScript-based exporter (`dynamo=False`) and constant folding off, which
keeps the runtime k, the beam width and the tables as true graph inputs; see docs/METHOD.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.generative import GenerativeRecommender, Trie, beam_search
from model.tokenizer import FUSED_VIEW, BBQTokenizer
from service.manifest import FORMAT_VERSION, MANIFEST, sha256, space_of
from training.data import Dataset, leave_one_out
from training.features import TEXT_ENCODER, TEXT_MAX_TOKENS, TEXT_MODALITY, text_encoder_dir
from training.generative import load_generative
from training.tokenize import ARTIFACT, Tokenizer

OPSET = 18
RECOMMENDER = "recommender.onnx"
QUANTIZER = "quantizer.onnx"
TEXT_ENCODER_ONNX = "text_encoder.onnx"
TEXT_TOKENIZER = "text_tokenizer.json"
RECOMMENDER_INPUTS = ("histories", "k", "beam", "exclude", "sid_table", "view_table")
# The exporter drops a graph input nothing reads: a model without the similarity reweighting
# ("- reweighting", TIGER's plain model) never reads the view codes.
OPTIONAL_INPUTS = frozenset({"view_table"})
RECOMMENDER_OUTPUTS = ("items", "scores")


class RecommenderGraph(nn.Module):
    """What `recommender.onnx` computes: table look-ups, then the constrained beam search with
    a runtime k and beam width (it keeps max(k, beam) prefixes)."""

    def __init__(self, model: GenerativeRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        histories: Tensor,
        k: Tensor,
        beam: Tensor,
        exclude: Tensor,
        sid_table: Tensor,
        view_table: Tensor,
        *children: Tensor,
    ) -> tuple[Tensor, Tensor]:
        real = histories >= 0  # (B, M)
        rows = histories.clamp(min=0)
        sids = torch.where(real[..., None], sid_table[rows], -1)  # (B, M, D)
        codes = torch.where(real[..., None, None], view_table[rows], -1)  # (B, M, V, L)
        result = beam_search(
            self.model,
            sids,
            codes,
            children,
            k=k,
            beam=beam,
            exclude=exclude,
            num_items=sid_table.shape[0],
        )
        return result.items, result.scores


class TextEncoderGraph(nn.Module):
    """What `text_encoder.onnx` computes: the text modality's sentence encoder as used in
    training (`training.features.TextEncoder`): BERT, mean of the real tokens' states, L2 norm."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state  # (B, T, d)
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)  # (B, d)


def export_text_encoder(out: Path) -> dict[str, Any]:
    """Write `text_encoder.onnx` and its tokenizer (`text_tokenizer.json`) into `out`, so the
    service embeds a new item's text exactly as training did; return the manifest entry."""
    from transformers import AutoModel

    source = text_encoder_dir()
    bert = AutoModel.from_pretrained(str(source), attn_implementation="eager").eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])  # two texts, one padded
    _export(
        TextEncoderGraph(bert).eval(),
        (ids, (ids > 0).long()),
        str(out / TEXT_ENCODER_ONNX),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
            "embedding": {0: "batch"},
        },
    )
    shutil.copyfile(source / "tokenizer.json", out / TEXT_TOKENIZER)
    dim = int(bert.config.hidden_size)
    return {
        "name": TEXT_ENCODER,
        "modality": TEXT_MODALITY,
        "file": TEXT_ENCODER_ONNX,
        "tokenizer": TEXT_TOKENIZER,
        "max_tokens": TEXT_MAX_TOKENS,
        "pad_id": int(bert.config.pad_token_id or 0),
        "inputs": {"input_ids": ["batch", "tokens"], "attention_mask": ["batch", "tokens"]},
        "outputs": {"embedding": ["batch", dim]},
    }


class QuantizerGraph(nn.Module):
    """What `quantizer.onnx` computes for new items: L2-normalised features -> the codes of the
    content-only fused view (the SID prefix) and of every similarity view; a view a new item
    cannot have (the behaviour view z_ID) gets -1 codes, which match nothing."""

    def __init__(self, tokenizer: BBQTokenizer, views: tuple[str, ...]) -> None:
        super().__init__()
        self.tokenizer, self.views = tokenizer, views

    def forward(self, *features: Tensor) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer
        feats = {m: F.normalize(x, dim=-1) for m, x in zip(tok.names, features, strict=True)}
        content = tok.behaviour_views(feats, None)
        fused = tok.fuse(content)
        codes = tok.quantizer(FUSED_VIEW)(fused).codes  # (B, L)
        content.setdefault(FUSED_VIEW, fused)
        per_view = [
            tok.quantizer(v)(content[v]).codes if v in content else torch.full_like(codes, -1)
            for v in self.views
        ]
        return codes, torch.stack(per_view, dim=1)  # (B, L), (B, V, L)


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def popularity(dataset: Dataset, max_len: int) -> np.ndarray:
    """(N,) interaction counts in the training split: the cold-start ranking."""
    counts = np.zeros(dataset.num_items, dtype=np.int64)
    for seq in leave_one_out(dataset, max_len).train:
        np.add.at(counts, seq, 1)
    return counts


def _export(module: nn.Module, args: tuple[Tensor, ...], path: str, **kwargs: Any) -> None:
    """The TorchScript-based exporter with constant folding off (keeps k and the tables as graph
    inputs). torch deprecates it in favour of the dynamo exporter, which needs explicit dynamic
    shapes for the beam's data-dependent sizes; torch is pinned, see docs/METHOD.md."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            module,
            args,
            path,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=False,
            **kwargs,
        )


def graph_inputs(path: Path) -> set[str]:
    """Input names of an exported graph, as ONNX Runtime will ask for them."""
    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}


def export_bundle(run: Path, out: Path, dataset: Dataset) -> dict[str, Any]:
    """Write the bundle of generative run `run` (trained on `dataset`); return its manifest."""
    model, tables, ckpt = load_generative(run)
    meta = ckpt["meta"]
    tokenizer_dir = Path(meta["tokenizer"])
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.item_ids != list(dataset.item_ids):
        raise ValueError("the run's tokenizer does not match the dataset's catalogue")
    c = model.config
    out.mkdir(parents=True, exist_ok=True)
    trie = Trie.from_sids(tables.sids, c.codebook_size)
    depth = len(trie.children)

    # recommender.onnx, traced on a small batch with every axis that varies marked dynamic
    graph = RecommenderGraph(model).eval()
    histories = torch.from_numpy(np.array([[-1] * (c.max_items - 2) + [0, 1]] * 2))
    example = (
        histories,
        torch.tensor(10),
        torch.tensor(int(meta["beam"])),
        histories.clone(),
        torch.from_numpy(tables.sids),
        torch.from_numpy(tables.view_codes),
        *trie.children,
    )
    trie_names = [f"trie_{d}" for d in range(depth)]
    dynamic: dict[str, dict[int, str]] = {
        "histories": {0: "batch", 1: "history"},
        "exclude": {0: "batch", 1: "excluded"},
        "sid_table": {0: "items"},
        "view_table": {0: "items"},
        "items": {0: "batch", 1: "k"},
        "scores": {0: "batch", 1: "k"},
        **{name: {0: f"prefixes_{d}"} for d, name in enumerate(trie_names)},
    }
    _export(
        graph,
        example,
        str(out / RECOMMENDER),
        input_names=[*RECOMMENDER_INPUTS, *trie_names],
        output_names=list(RECOMMENDER_OUTPUTS),
        dynamic_axes=dynamic,
    )

    shapes: dict[str, list[str | int]] = {
        "histories": ["batch", "history"],
        "k": [],
        "beam": [],
        "exclude": ["batch", "excluded"],
        "sid_table": ["items", c.sid_levels],
        "view_table": ["items", *tables.view_codes.shape[1:]],
        **{name: [f"prefixes_{d}", c.codebook_size] for d, name in enumerate(trie_names)},
    }
    taken = graph_inputs(out / RECOMMENDER)
    if missing := set(shapes) - taken - OPTIONAL_INPUTS:
        raise RuntimeError(f"the exported recommender lost inputs it needs: {sorted(missing)}")
    # the manifest declares what the graph takes; the service feeds exactly that
    recommender_inputs = {name: shape for name, shape in shapes.items() if name in taken}

    # quantizer.onnx
    modalities = list(tokenizer.config.modalities)
    qgraph = QuantizerGraph(tokenizer.model, tokenizer.view_names).eval()
    q_example = tuple(torch.randn(2, dim) for _, dim in modalities)
    q_inputs = [f"features_{name}" for name, _ in modalities]
    _export(
        qgraph,
        q_example,
        str(out / QUANTIZER),
        input_names=q_inputs,
        output_names=["codes", "view_codes"],
        dynamic_axes={
            **{n: {0: "batch"} for n in q_inputs},
            "codes": {0: "batch"},
            "view_codes": {0: "batch"},
        },
    )

    # text_encoder.onnx: when the text modality is an input, POST /items may send raw text
    text_encoder = (
        export_text_encoder(out) if any(n == TEXT_MODALITY for n, _ in modalities) else None
    )

    (out / "item_ids.txt").write_text("\n".join(dataset.item_ids) + "\n")
    np.save(out / "sids.npy", tables.sids.astype(np.int64))
    np.save(out / "view_codes.npy", tables.view_codes.astype(np.int64))
    np.save(out / "popularity.npy", popularity(dataset, c.max_items))

    results_path = run / "results.json"
    files = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_version": f"{run.name}-{sha256(out / RECOMMENDER)[:12]}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_sha": git_sha(),
        "versions": {"torch": torch.__version__, "onnx_opset": OPSET},
        "dataset": {"name": dataset.name, "path": str(dataset.root), "items": dataset.num_items},
        "model_config": ckpt["model_config"],
        "tokenizer_config": {**tokenizer.meta, "config": asdict(tokenizer.config)},
        # bundles of one tokenizer share it: added items keep their SIDs across them
        "sid_space": space_of(sha256(tokenizer_dir / ARTIFACT), sha256(tokenizer_dir / "sids.npy")),
        "sid_depth": c.sid_levels,
        "codebook_size": c.codebook_size,
        "vocab": c.vocab,
        "views": list(tokenizer.view_names),
        "max_history": c.max_items,
        "beam": int(meta["beam"]),
        "max_k": 100,
        "modalities": [{"name": n, "dim": d, "input": f"features_{n}"} for n, d in modalities],
        "recommender": {
            "file": RECOMMENDER,
            "inputs": recommender_inputs,
            "outputs": {"items": ["batch", "k"], "scores": ["batch", "k"]},
        },
        "quantizer": {
            "file": QUANTIZER,
            "inputs": q_inputs,
            "outputs": {
                "codes": ["batch", tokenizer.config.levels],
                "view_codes": ["batch", len(tokenizer.view_names), tokenizer.config.levels],
            },
        },
        "text_encoder": text_encoder,
        "training": json.loads(results_path.read_text()) if results_path.exists() else None,
        "files": {name: sha256(out / name) for name in files},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
