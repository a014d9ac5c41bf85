"""Residual vector quantization (RQ) with k-means initialisation, a straight-through estimator,
commitment loss and re-seeding of dead codes.

Level l quantizes the residual left by levels < l against its own codebook of K codewords; the
quantized vector is the sum of the chosen codewords, so `decode(codes)` rebuilds it from codes
alone. Reads top to bottom: k-means, output type, quantizer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kmeans(
    x: Tensor, k: int, *, iters: int = 20, generator: torch.Generator | None = None
) -> Tensor:
    """(k, D) centroids of `x` (N, D): k-means++ seeding, then Lloyd's algorithm.

    With fewer distinct points than centroids, the surplus centroids repeat points (a centroid
    nobody picks is re-seeded later by `reseed_dead_codes`).
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    first = int(torch.randint(0, n, (1,), generator=generator))
    centroids = [x[first]]
    dist = (x - x[first]).pow(2).sum(dim=1)  # (N,) squared distance to the nearest seed
    for _ in range(1, k):
        if float(dist.sum()) <= 0:  # every point already is a seed
            nxt = int(torch.randint(0, n, (1,), generator=generator))
        else:
            nxt = int(torch.multinomial(dist, 1, generator=generator))
        centroids.append(x[nxt])
        dist = torch.minimum(dist, (x - x[nxt]).pow(2).sum(dim=1))
    c = torch.stack(centroids).clone()  # (k, D)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)  # (N,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        moved = counts > 0
        c[moved] = sums[moved] / counts[moved].unsqueeze(1).to(x.dtype)
    return c


class RQOutput(NamedTuple):
    quantized: Tensor  # (B, D) sum of codewords, straight-through: gradients flow to the input
    codes: Tensor  # (B, L) int64 in [0, K)
    loss: Tensor  # () codebook + beta * commitment, summed over levels
    residual_norms: Tensor  # (B, L + 1) ||residual|| before level 0 .. after level L-1


class ResidualQuantizer(nn.Module):
    def __init__(self, *, dim: int, levels: int, codebook_size: int, beta: float = 0.25) -> None:
        super().__init__()
        if dim < 1 or levels < 1 or codebook_size < 2:
            raise ValueError("dim >= 1, levels >= 1 and codebook_size >= 2 are required")
        self.dim, self.levels, self.codebook_size, self.beta = dim, levels, codebook_size, beta
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, dim) * 0.1)  # (L, K, D)

    @torch.no_grad()
    def init_kmeans(self, x: Tensor, *, generator: torch.Generator | None = None) -> None:
        """Set every level's codebook to k-means centroids of that level's residuals of `x`."""
        residual = x.detach().float()
        for level in range(self.levels):
            self.codebooks[level] = kmeans(residual, self.codebook_size, generator=generator)
            residual = residual - self.codebooks[level][self._nearest(residual, level)]

    def _nearest(self, residual: Tensor, level: int) -> Tensor:
        return torch.cdist(residual, self.codebooks[level]).argmin(dim=1)  # (B,)

    def forward(self, x: Tensor) -> RQOutput:
        """`x` (B, D) -> codes per level and their summed codewords."""
        residual = x
        quantized = torch.zeros_like(x)
        codes, norms = [], [x.norm(dim=-1)]
        loss = x.new_zeros(())
        for level in range(self.levels):
            code = self._nearest(residual.detach(), level)  # (B,)
            codeword = self.codebooks[level][code]  # (B, D)
            # VQ-VAE: move codewords to the residuals, commit residuals to their codewords.
            loss = loss + F.mse_loss(codeword, residual.detach())
            loss = loss + self.beta * F.mse_loss(residual, codeword.detach())
            quantized = quantized + codeword
            residual = residual - codeword.detach()
            codes.append(code)
            norms.append(residual.norm(dim=-1))
        # Straight-through: the forward value is the codewords, the gradient is the identity.
        st = x + (quantized - x).detach()
        return RQOutput(
            quantized=st,
            codes=torch.stack(codes, dim=1),
            loss=loss,
            residual_norms=torch.stack(norms, dim=1),
        )

    def decode(self, codes: Tensor) -> Tensor:
        """(B, L) codes -> (B, D) sum of their codewords; no forward pass needed."""
        levels = torch.arange(codes.shape[1], device=codes.device)
        return self.codebooks[levels, codes].sum(dim=1)  # (B, D)

    @torch.no_grad()
    def reseed_dead_codes(self, x: Tensor, *, generator: torch.Generator | None = None) -> int:
        """Move every code that no row of `x` picks onto a residual of `x` drawn at random, level
        by level, so a collapsing codebook recovers. Returns the number of codes moved."""
        residual = x.detach().float()
        moved = 0
        for level in range(self.levels):
            used = torch.bincount(self._nearest(residual, level), minlength=self.codebook_size)
            dead = (used == 0).nonzero().squeeze(1)
            if len(dead):
                pick = torch.randint(0, len(residual), (len(dead),), generator=generator)
                self.codebooks[level, dead] = residual[pick].to(self.codebooks.dtype)
                moved += len(dead)
            residual = residual - self.codebooks[level][self._nearest(residual, level)]
        return moved
