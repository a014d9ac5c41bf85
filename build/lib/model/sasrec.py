"""SASRec (Kang & McAuley, ICDM 2018): an ID-based causal self-attention sequential recommender.

Differences from the original, all standard in recent reproductions: full softmax cross-entropy
over the catalogue instead of one sampled negative with BCE, and pre-LayerNorm blocks. Item index
`i` of the dataset is row `i + 1` of the embedding table; row 0 is padding.

Reads top to bottom: config, attention, block, model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG_INF = -1e9  # large finite negative: an all-padding row must give zeros, not NaN


@dataclass(frozen=True)
class SASRecConfig:
    num_items: int
    max_len: int = 20
    dim: int = 64
    heads: int = 2
    layers: int = 2
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.num_items < 1 or self.max_len < 1 or self.layers < 1:
            raise ValueError(f"invalid SASRecConfig {self}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, *, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # x: (B, T, D); mask: (B, 1, T, T) bool, True where attention is allowed
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(D // self.heads)  # (B, H, T, T)
        logits = logits.masked_fill(~mask, NEG_INF)
        attn = self.drop(torch.softmax(logits, dim=-1))
        y = (attn @ v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        out: Tensor = self.out(y)
        return out


class Block(nn.Module):
    def __init__(self, *, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim=dim, heads=heads, dropout=dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask))
        out: Tensor = x + self.drop(self.ff(self.ln2(x)))
        return out


class SASRecOutput(NamedTuple):
    hidden: Tensor  # (B, T, D) state after each position
    valid: Tensor  # (B, T) bool, False on padding


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.item_emb = nn.Embedding(c.num_items + 1, c.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(c.max_len + 1, c.dim)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(dim=c.dim, heads=c.heads, dropout=c.dropout) for _ in range(c.layers)
        )
        self.ln_f = nn.LayerNorm(c.dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, items: Tensor) -> SASRecOutput:
        """`items` (B, T) dataset item indices, left-padded with -1."""
        T = items.shape[1]
        valid = items >= 0  # (B, T)
        # Positions count back from the most recent item, so a history means the same thing
        # whatever its padding: the last item is always position 1.
        pos = (valid.flip(1).cumsum(1).flip(1) * valid).clamp(max=self.config.max_len)  # (B, T)
        x = self.item_emb(items + 1) * math.sqrt(self.config.dim) + self.pos_emb(pos)
        x = self.drop(x) * valid.unsqueeze(-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()
        # Padding keys are masked; each query may always attend to itself, so no row is empty.
        mask = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=items.device)
        mask = mask.unsqueeze(1)  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, mask)
        return SASRecOutput(hidden=self.ln_f(x), valid=valid)

    def item_weights(self) -> Tensor:
        """(N, D) output embeddings of the catalogue, tied with the input embeddings."""
        return self.item_emb.weight[1:]

    def scores(self, histories: Tensor) -> Tensor:
        """(B, N) next-item scores over the whole catalogue from the last position."""
        hidden: Tensor = self(histories).hidden[:, -1]  # (B, D)
        return hidden @ self.item_weights().T

    def loss(self, windows: Tensor) -> Tensor:
        """Full softmax cross-entropy at every position of causal windows (B, T + 1)."""
        inputs, targets = windows[:, :-1], windows[:, 1:]
        out = self(inputs)
        keep = out.valid & (targets >= 0)  # (B, T)
        logits = out.hidden[keep] @ self.item_weights().T  # (P, N) only real positions
        return F.cross_entropy(logits, targets[keep])
