from __future__ import annotations

import pytest
import torch

from model.quantizer import ResidualQuantizer, kmeans

Fitted = tuple[ResidualQuantizer, torch.Tensor]


@pytest.fixture
def fitted() -> Fitted:
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    rq = ResidualQuantizer(dim=8, levels=3, codebook_size=16)
    rq.init_kmeans(x, generator=torch.Generator().manual_seed(0))
    return rq.eval(), x


def test_decode_of_codes_equals_the_quantized_output(fitted: Fitted) -> None:
    rq, x = fitted
    out = rq(x)
    assert torch.allclose(rq.decode(out.codes), out.quantized, atol=1e-5)


def test_quantized_is_the_sum_of_per_level_codewords(fitted: Fitted) -> None:
    rq, x = fitted
    out = rq(x)
    total = sum(rq.codebooks[level][out.codes[:, level]] for level in range(rq.levels))
    assert isinstance(total, torch.Tensor)
    assert torch.allclose(out.quantized, total, atol=1e-5)


def test_codes_are_in_range_and_deterministic(fitted: Fitted) -> None:
    rq, x = fitted
    a, b = rq(x).codes, rq(x.clone()).codes
    assert a.shape == (512, 3)
    assert a.dtype == torch.int64
    assert int(a.min()) >= 0
    assert int(a.max()) < 16
    assert torch.equal(a, b)


def test_residual_energy_never_increases_level_to_level(fitted: Fitted) -> None:
    # k-means centroids are cluster means, so on the data they were fitted to the summed squared
    # residual cannot exceed the previous level's (each cluster's mean beats the origin).
    rq, x = fitted
    energy = (rq(x).residual_norms ** 2).sum(dim=0)  # (L + 1,)
    assert (energy[1:] <= energy[:-1] + 1e-4).all()
    assert energy[-1] < 0.8 * energy[0]


def test_straight_through_gradient_reaches_the_input(fitted: Fitted) -> None:
    rq, x = fitted
    x = x.clone().requires_grad_(True)
    out = rq(x)
    (out.quantized.sum() + out.loss).backward()
    assert x.grad is not None
    assert torch.count_nonzero(x.grad) > 0
    assert rq.codebooks.grad is not None  # codebook loss moves the codewords


def test_kmeans_recovers_separated_clusters() -> None:
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    x = torch.cat([c + 0.1 * torch.randn(100, 2) for c in centres])
    found = kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    dist = torch.cdist(centres, found).min(dim=1).values
    assert (dist < 0.2).all()


def test_dead_codes_are_reseeded_onto_data() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(dim=4, levels=1, codebook_size=8)
    x = torch.randn(64, 4)
    with torch.no_grad():
        rq.codebooks[0] = 100.0  # every code far away: one is picked, seven are dead
        rq.codebooks[0, 0] = 0.0
    moved = rq.reseed_dead_codes(x, generator=torch.Generator().manual_seed(0))
    assert moved == 7
    assert rq(x).codes.unique().numel() > 1
