"""The BBQRec generative recommender: a T5-style encoder-decoder over semantic-ID tokens whose
encoder self-attention is reweighted by the discretized semantic similarity of item pairs, a
sequence-to-item contrastive loss, and trie-constrained beam search.

Inputs are gathered tensors, never catalogue tables held by the model, so new items can be served
by extending the tables alone:
- `sids` (B, M, D): the history items' semantic IDs (D tokens each), -1 on padding items;
- `view_codes` (B, M, V, L): per view (modalities, behaviour) the item's L codes, used only to
  measure similarity; -1 on padding.

Discretized similarity: for a pair of items and a view, the number of leading codes they share
(0..L). Residual codes go coarse to fine, so this is a similarity with L + 1 levels that needs no
threshold; each (layer, view, level) has a learned per-head bias added to the attention logits of
every token pair of the two items (additive logit bias = multiplicative reweighting). The tables
start at zero: an untrained model equals the plain transformer exactly.

Reads top to bottom: config, helpers, attention, blocks, model, trie, beam search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.trie import trie_tables

NEG = -1e9  # large finite negative: fully masked rows stay finite (and float16-safe in export)


@dataclass(frozen=True)
class GenRecConfig:
    sid_levels: int  # D: tokens per item (L codes + the extra ID level)
    codebook_size: int  # K: codes per level
    num_views: int = 1  # V: views whose shared leading codes index the reweighting tables
    code_levels: int = 3  # L: codes per view used for similarity
    max_items: int = 20
    d_model: int = 128
    heads: int = 6
    d_kv: int = 32  # per-head width (T5 decouples it from d_model)
    d_ff: int = 1024
    encoder_layers: int = 4
    decoder_layers: int = 4
    dropout: float = 0.1
    rel_buckets: int = 32
    rel_max_distance: int = 128
    reweight: bool = True  # False: plain transformer ("- reweighting")
    item_dim: int = 32  # dim of the target item representation given to the s2i loss
    s2i_weight: float = 0.1  # lambda; 0 disables the loss ("- s2i")
    s2i_temperature: float = 0.1

    def __post_init__(self) -> None:
        if min(self.sid_levels, self.codebook_size, self.max_items, self.heads) < 1:
            raise ValueError(f"invalid GenRecConfig {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    @property
    def vocab(self) -> int:
        """Token ids: 0 = padding, 1 + d * K + c = code c at level d, then BOS."""
        return 1 + self.sid_levels * self.codebook_size + 1

    @property
    def bos(self) -> int:
        return self.vocab - 1


def sid_tokens(sids: Tensor, codebook_size: int) -> Tensor:
    """(..., D) codes (-1 = padding) -> token ids (0 = padding)."""
    level = torch.arange(sids.shape[-1], device=sids.device)
    return torch.where(sids >= 0, 1 + level * codebook_size + sids, torch.zeros_like(sids))


def shared_prefix_length(codes: Tensor) -> Tensor:
    """(B, M, V, L) codes -> (B, V, M, M): leading codes items i and j share, per view."""
    c = codes.permute(0, 2, 1, 3)  # (B, V, M, L)
    equal = (c.unsqueeze(3) == c.unsqueeze(2)) & (c.unsqueeze(3) >= 0)  # (B, V, M, M, L)
    # leading run of matches = positions before the first mismatch (CumSum exports; CumProd not)
    mismatches_so_far = torch.cumsum((~equal).long(), dim=-1)
    return (mismatches_so_far == 0).long().sum(dim=-1)  # (B, V, M, M)


def item_pairs_to_tokens(values: Tensor, tokens_per_item: int) -> Tensor:
    """(B, H, M, M) values per item pair -> (B, H, M * D, M * D) per token pair: every token of
    item i with every token of item j gets the (i, j) value.

    Repeats along the second-to-last axis twice (transposing the two smaller tensors in between)
    instead of repeating the last axis: ONNX Runtime's Tile copies element by element when the
    repeated axis is the innermost one, about 8x slower here (B 8, M 20, D 4, measured)."""
    D = tokens_per_item
    columns = values.transpose(-1, -2).repeat_interleave(D, dim=2)  # (B, H, T, M): [s, i]
    return columns.transpose(-1, -2).repeat_interleave(D, dim=2)  # (B, H, T, T): [t, s]


def relative_bucket(
    relative: Tensor, *, bidirectional: bool, buckets: int, max_distance: int
) -> Tensor:
    """T5's log-bucketed relative positions (key - query) -> bucket ids in [0, buckets)."""
    out = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        out += (relative > 0).long() * buckets
        n = relative.abs()
    else:
        n = (-relative).clamp(min=0)
    exact = buckets // 2
    large = (
        exact
        + (
            torch.log(n.float().clamp(min=1) / exact)
            / math.log(max_distance / exact)
            * (buckets - exact)
        ).long()
    )
    large = large.clamp(max=buckets - 1)
    return out + torch.where(n < exact, n, large)


KeyValues = tuple[Tensor, Tensor]  # attention keys and values, (B, H, T, dk) each


class Attention(nn.Module):
    """Multi-head attention written out (MatMul + Add + Softmax) with an additive logit bias.

    No dropout on the attention probabilities: on the CPU it cost a third of a training step
    (a (B, H, T, T) random mask per layer); residual and feed-forward dropout remain.
    """

    def __init__(self, *, d_model: int, heads: int, d_kv: int) -> None:
        super().__init__()
        self.heads, self.d_kv = heads, d_kv
        self.q = nn.Linear(d_model, heads * d_kv, bias=False)
        self.kv = nn.Linear(d_model, 2 * heads * d_kv, bias=False)
        self.o = nn.Linear(heads * d_kv, d_model, bias=False)

    def keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Tk, d) -> keys and values, (B, H, Tk, dk) each."""
        B, Tk, _ = memory.shape
        k, v = self.kv(memory).view(B, Tk, 2, self.heads, self.d_kv).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        # x: (R * B, Tq, d), R query rows (beams) per key row; k, v: (B, H, Tk, dk);
        # bias: broadcastable to (B, H, R * Tq, Tk), masking included
        B = k.shape[0]
        R, Tq = x.shape[0] // B, x.shape[1]
        # Keys and values once per key row; the R rows sharing it join the query axis.
        q = self.q(x).view(B, R * Tq, self.heads, self.d_kv).transpose(1, 2)  # (B, H, R*Tq, dk)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.d_kv) + bias  # (B, H, R*Tq, Tk)
        attn = torch.softmax(logits, dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B * R, Tq, self.heads * self.d_kv)
        out: Tensor = self.o(y)
        return out

    def forward(self, x: Tensor, memory: Tensor, bias: Tensor) -> Tensor:
        return self.attend(x, *self.keys_values(memory), bias)


class FeedForward(nn.Sequential):
    def __init__(self, *, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )


class EncoderBlock(nn.Module):
    def __init__(self, c: GenRecConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.attn = Attention(d_model=c.d_model, heads=c.heads, d_kv=c.d_kv)
        self.ff = FeedForward(d_model=c.d_model, d_ff=c.d_ff, dropout=c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, bias))
        out: Tensor = x + self.drop(self.ff(self.ln2(x)))
        return out


class DecoderBlock(nn.Module):
    def __init__(self, c: GenRecConfig) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(c.d_model) for _ in range(3))
        self.self_attn = Attention(d_model=c.d_model, heads=c.heads, d_kv=c.d_kv)
        self.cross = Attention(d_model=c.d_model, heads=c.heads, d_kv=c.d_kv)
        self.ff = FeedForward(d_model=c.d_model, d_ff=c.d_ff, dropout=c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, y: Tensor, memory: Tensor, self_bias: Tensor, cross_bias: Tensor) -> Tensor:
        h = self.ln1(y)
        y = y + self.drop(self.self_attn(h, h, self_bias))
        y = y + self.drop(self.cross(self.ln2(y), memory, cross_bias))
        out: Tensor = y + self.drop(self.ff(self.ln3(y)))
        return out

    def step(
        self,
        y: Tensor,
        past: KeyValues | None,
        cross: KeyValues,
        self_bias: Tensor,
        cross_bias: Tensor,
    ) -> tuple[Tensor, KeyValues]:
        """One new position per row, `y` (B', 1, d), attending to the cached keys and values
        `past` ((B', H, t, dk) each) of the earlier positions; returns them extended by one."""
        h = self.ln1(y)
        k, v = self.self_attn.keys_values(h)  # (B', H, 1, dk)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = y + self.drop(self.self_attn.attend(h, k, v, self_bias))
        y = y + self.drop(self.cross.attend(self.ln2(y), *cross, cross_bias))
        out: Tensor = y + self.drop(self.ff(self.ln3(y)))
        return out, (k, v)


class Encoded(NamedTuple):
    memory: Tensor  # (B, T, d) encoder states, T = M * D
    mask: Tensor  # (B, T) bool, True on real tokens
    pooled: Tensor  # (B, d) mean of the real tokens' states


class GenRecOutput(NamedTuple):
    loss: Tensor  # () generation CE + lambda * s2i
    generation_loss: Tensor  # ()
    s2i_loss: Tensor  # () (0 when disabled or no item representation given)
    logits: Tensor  # (B, D, K): level d's logits over its K codes


class GenerativeRecommender(nn.Module):
    def __init__(self, config: GenRecConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab, c.d_model, padding_idx=0)
        self.enc_rel = nn.Embedding(c.rel_buckets, c.heads)
        self.dec_rel = nn.Embedding(c.rel_buckets, c.heads)
        # (layers, views, L + 1 similarity levels, heads), zero: starts as the plain transformer
        self.sim_bias = nn.Parameter(
            torch.zeros(c.encoder_layers, c.num_views, c.code_levels + 1, c.heads),
            requires_grad=c.reweight,
        )
        self.encoder = nn.ModuleList(EncoderBlock(c) for _ in range(c.encoder_layers))
        self.decoder = nn.ModuleList(DecoderBlock(c) for _ in range(c.decoder_layers))
        self.enc_ln, self.dec_ln = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.seq_proj = nn.Linear(c.d_model, c.item_dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def _rel_bias(
        self, table: nn.Embedding, q_len: int, k_len: int, *, bidirectional: bool
    ) -> Tensor:
        c = self.config
        pos_q = torch.arange(q_len, device=table.weight.device)
        pos_k = torch.arange(k_len, device=table.weight.device)
        bucket = relative_bucket(
            pos_k[None, :] - pos_q[:, None],
            bidirectional=bidirectional,
            buckets=c.rel_buckets,
            max_distance=c.rel_max_distance,
        )  # (Tq, Tk)
        bias: Tensor = table(bucket)  # (Tq, Tk, H)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, Tq, Tk)

    def encode(self, sids: Tensor, view_codes: Tensor) -> Encoded:
        """`sids` (B, M, D), `view_codes` (B, M, V, L); -1 marks padding items."""
        c = self.config
        B, M, D = sids.shape
        tokens = sid_tokens(sids, c.codebook_size).reshape(B, M * D)  # (B, T)
        mask = tokens > 0
        x = self.drop(self.tok_emb(tokens))
        base = self._rel_bias(self.enc_rel, M * D, M * D, bidirectional=True)  # (1, H, T, T)
        key_mask = torch.where(mask, 0.0, NEG)[:, None, None, :]  # (B, 1, 1, T)
        sim = shared_prefix_length(view_codes) if c.reweight else None  # (B, V, M, M)
        for layer, block in enumerate(self.encoder):
            bias = base + key_mask
            if sim is not None:
                table = self.sim_bias[layer]  # (V, L + 1, H)
                views = torch.arange(c.num_views, device=sids.device)[None, :, None, None]
                item_bias = table[views, sim].sum(dim=1).permute(0, 3, 1, 2)  # (B, H, M, M)
                bias = bias + item_pairs_to_tokens(item_bias, D)  # (B, H, T, T)
            x = block(x, bias)
        memory = self.enc_ln(x)
        weights = mask.unsqueeze(-1).to(memory.dtype)
        pooled = (memory * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, d)
        return Encoded(memory=memory, mask=mask, pooled=pooled)

    def decode(self, enc: Encoded, prefix: Tensor) -> Tensor:
        """Logits (B', t, K) for decoder input `prefix` (B', t) of token ids starting with BOS;
        B' may be a multiple of the encoder batch (beams), rows repeated in order."""
        t = prefix.shape[1]
        cross = torch.where(enc.mask, 0.0, NEG)[:, None, None, :]  # (B, 1, 1, T)
        causal = torch.full((t, t), NEG, device=prefix.device).triu(1)
        self_bias = self._rel_bias(self.dec_rel, t, t, bidirectional=False) + causal
        y = self.drop(self.tok_emb(prefix))
        for block in self.decoder:
            y = block(y, enc.memory, self_bias, cross)
        h = self.dec_ln(y)  # (B', t, d)
        return torch.einsum("btd,tkd->btk", h, self._output_embeddings(t))

    def _output_embeddings(self, levels: int) -> Tensor:
        """(levels, K, d): level d's output embeddings are the input embeddings of its codes."""
        c = self.config
        out_emb = self.tok_emb.weight[1 : 1 + c.sid_levels * c.codebook_size]
        return out_emb.view(c.sid_levels, c.codebook_size, c.d_model)[:levels]

    def _decoder_blocks(self) -> list[DecoderBlock]:
        return [cast(DecoderBlock, block) for block in self.decoder]

    def cross_keys_values(self, enc: Encoded) -> tuple[KeyValues, ...]:
        """Each decoder layer's cross-attention keys and values: computed once per search."""
        return tuple(block.cross.keys_values(enc.memory) for block in self._decoder_blocks())

    def decode_step(
        self,
        enc: Encoded,
        cross: tuple[KeyValues, ...],
        past: tuple[KeyValues, ...] | None,
        token: Tensor,
        position: int,
    ) -> tuple[Tensor, tuple[KeyValues, ...]]:
        """Incremental `decode`: logits (B', K) at decoder `position` for the input tokens
        `token` (B',), given the self-attention keys and values `past` of positions
        0..position-1 (None at position 0); returns them extended by this position. Equals
        `decode(enc, prefix)[:, position]` for the prefix whose last token is `token`."""
        cross_bias = torch.where(enc.mask, 0.0, NEG)[:, None, None, :]  # (B, 1, 1, T)
        n = position + 1
        # query `position` against keys 0..position: the last row of the relative bias
        self_bias = self._rel_bias(self.dec_rel, n, n, bidirectional=False)[:, :, -1:]
        y = self.drop(self.tok_emb(token.unsqueeze(1)))  # (B', 1, d)
        layers = []
        for layer, block in enumerate(self._decoder_blocks()):
            y, kv = block.step(
                y, None if past is None else past[layer], cross[layer], self_bias, cross_bias
            )
            layers.append(kv)
        h = self.dec_ln(y)[:, 0]  # (B', d)
        return h @ self._output_embeddings(n)[position].T, tuple(layers)  # (B', K)

    def forward(
        self,
        sids: Tensor,
        view_codes: Tensor,
        target_sids: Tensor,
        target_repr: Tensor | None = None,
        target_items: Tensor | None = None,
        s2i_offset: int = 0,
    ) -> GenRecOutput:
        """Teacher-forced loss for next items `target_sids` (B, D); `target_repr` (B, item_dim)
        is the target's quantized representation for the s2i loss and `target_items` (B,) its
        index (in-batch duplicates of the target are not used as negatives).

        `target_repr` (C, item_dim) and `target_items` (C,) may cover a larger batch than these
        B rows, which are then its rows `s2i_offset .. s2i_offset + B - 1`: data-parallel
        training passes each process the whole global batch's targets, so its s2i negatives are
        those of single-process training."""
        c = self.config
        enc = self.encode(sids, view_codes)
        targets = sid_tokens(target_sids, c.codebook_size)  # (B, D)
        bos = torch.full_like(targets[:, :1], c.bos)
        logits = self.decode(enc, torch.cat([bos, targets[:, :-1]], dim=1))  # (B, D, K)
        gen = F.cross_entropy(logits.reshape(-1, c.codebook_size), target_sids.reshape(-1))
        s2i = gen.new_zeros(())
        if c.s2i_weight > 0 and target_repr is not None:
            seq = F.normalize(self.seq_proj(enc.pooled), dim=-1)  # (B, item_dim)
            item = F.normalize(target_repr, dim=-1)
            sim = seq @ item.T / c.s2i_temperature  # (B, C)
            positive = torch.arange(len(sim), device=sim.device) + s2i_offset  # (B,)
            if target_items is not None:
                same = target_items[positive][:, None] == target_items[None, :]  # (B, C)
                own = positive[:, None] == torch.arange(sim.shape[1], device=sim.device)
                sim = sim.masked_fill(same & ~own, NEG)
            s2i = F.cross_entropy(sim, positive)
        return GenRecOutput(
            loss=gen + c.s2i_weight * s2i, generation_loss=gen, s2i_loss=s2i, logits=logits
        )


# ---------------------------------------------------------------------------------------------
# Trie of valid semantic IDs and constrained beam search
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trie:
    """Valid SIDs as dense transition tables (`model.trie.trie_tables`) on a torch device."""

    children: tuple[Tensor, ...]  # D tensors (P_d, K) int64; P_0 = 1 (the empty prefix)

    @staticmethod
    def from_sids(sids: np.ndarray, codebook_size: int) -> Trie:
        return Trie(children=tuple(torch.from_numpy(t) for t in trie_tables(sids, codebook_size)))

    def to(self, device: torch.device) -> Trie:
        return Trie(children=tuple(t.to(device) for t in self.children))


class BeamResult(NamedTuple):
    items: Tensor  # (B, k) item indices, best first; -1 where fewer than k valid items exist
    scores: Tensor  # (B, k) sum of per-level log-probabilities


@torch.no_grad()
def beam_search(
    model: GenerativeRecommender,
    sids: Tensor,
    view_codes: Tensor,
    children: tuple[Tensor, ...],
    *,
    k: int | Tensor,
    beam: int | Tensor,
    exclude: Tensor | None = None,
    num_items: int | None = None,
) -> BeamResult:
    """Top-k items by beam search constrained to the trie `children` (`Trie.children`).

    `exclude` (B, E) item indices (-1 = none) are removed at the last step (already seen items);
    `num_items` is the catalogue size (default: read off the last trie table).
    The beam keeps max(beam, k) prefixes; with that at least the number of valid prefixes at
    every depth the search is exhaustive. `k` and `beam` may be 0-d tensors and nothing branches
    on tensor values, so the whole search exports to one ONNX graph with a runtime k and beam.

    Each step runs the decoder on the new token only, with the earlier positions' self-attention
    keys and values cached (and reordered with their beams) and the cross-attention keys and
    values computed once: equal to re-running the decoder on the whole prefix.
    """
    c = model.config
    B = sids.shape[0]
    device = sids.device
    k_t = torch.as_tensor(k, dtype=torch.long, device=device)
    width = torch.maximum(k_t, torch.as_tensor(beam, dtype=torch.long, device=device))  # ()
    enc = model.encode(sids, view_codes)
    cross = model.cross_keys_values(enc)
    past: tuple[KeyValues, ...] | None = None
    seen_mask: Tensor | None = None
    if exclude is not None:
        # a traced size (the SID table's rows) in an exported graph: new items fit
        n = int(children[-1].max()) + 1 if num_items is None else num_items
        # (B, 1 + N) with column 1 + i set when item i is excluded (column 0 takes the -1s):
        # one scatter, then one gather per candidate instead of comparing against every item
        seen_mask = torch.zeros(B, n + 1, dtype=torch.bool, device=device).scatter(
            1, exclude + 1, torch.ones_like(exclude, dtype=torch.bool)
        )
    prefix_ids = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, W) trie prefix ids
    scores = torch.zeros(B, 1, device=device)  # (B, W)
    token = torch.full((B,), c.bos, dtype=torch.long, device=device)  # (B * W,) last tokens
    for d in range(c.sid_levels):
        W = prefix_ids.shape[1]
        last = d == c.sid_levels - 1
        # `keep` is a 0-d tensor: it stays symbolic in an exported graph; torch takes it as a
        # size at run time, its type stubs only know ints.
        keep = cast(int, k_t if last else width)
        logits, past = model.decode_step(enc, cross, past, token, d)  # (B*W, K)
        logp = torch.log_softmax(logits.float(), dim=-1).view(B, W, c.codebook_size)
        nxt = children[d][prefix_ids.clamp(min=0)]  # (B, W, K)
        valid = (nxt >= 0) & (prefix_ids >= 0).unsqueeze(-1)
        if last and seen_mask is not None:
            seen = seen_mask.gather(1, (nxt + 1).clamp(min=0).reshape(B, -1))  # (B, W*K)
            valid = valid & ~seen.view_as(valid)
        cand = torch.where(valid, scores.unsqueeze(-1) + logp, NEG).reshape(B, -1)  # (B, W*K)
        # Pad with `keep` dead candidates so topk(keep) is valid even for tiny catalogues.
        pad_scores = torch.full_like(cand[:, :1], NEG).expand(B, keep)
        cand = torch.cat([cand, pad_scores], dim=1)
        cand_ids = torch.cat(
            [nxt.reshape(B, -1), torch.full_like(pad_scores, -1, dtype=torch.long)], 1
        )
        scores, flat = cand.topk(keep, dim=-1)  # (B, W')
        prefix_ids = torch.where(scores > NEG / 2, cand_ids.gather(1, flat), -1)
        if not last:
            parent = (flat // c.codebook_size).clamp(max=W - 1)  # padded candidates: any parent
            rows = (torch.arange(B, device=device)[:, None] * W + parent).reshape(-1)  # (B*W',)
            past = tuple((kk.index_select(0, rows), vv.index_select(0, rows)) for kk, vv in past)
            token = (1 + d * c.codebook_size + flat % c.codebook_size).reshape(-1)
    return BeamResult(items=prefix_ids, scores=scores)
