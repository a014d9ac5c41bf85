from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from model.club import CLUB


def fitted_club(dependent: bool) -> tuple[CLUB, Callable[[int], tuple[Tensor, Tensor]]]:
    """A CLUB estimator fitted by maximum likelihood to (x, y) samples, and the sampler."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    club = CLUB(x_dim=4, y_dim=4, hidden=32)
    opt = torch.optim.Adam(club.parameters(), lr=5e-3)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 4, generator=g)
        noise = torch.randn(n, 4, generator=g)
        y = 0.9 * x + 0.3 * noise if dependent else noise
        return x, y

    for _ in range(300):  # the estimator's own maximum-likelihood steps
        x, y = sample(256)
        opt.zero_grad()
        (-club.log_likelihood(x, y)).backward()
        opt.step()
    return club, sample


def fitted_estimate(dependent: bool) -> float:
    club, sample = fitted_club(dependent)
    with torch.no_grad():
        x, y = sample(4096)
        return float(club.estimate(x, y))


def test_club_estimate_separates_dependent_from_independent_samples() -> None:
    dependent, independent = fitted_estimate(True), fitted_estimate(False)
    # true MI of the dependent pair is 4 * 0.5 * log(1 + 0.81 / 0.09) ~ 4.6 nats; independent 0
    assert dependent > 2.0
    assert abs(independent) < 0.2
    assert dependent > 10 * abs(independent)


def test_mi_bound_is_differentiable_in_its_inputs() -> None:
    club, sample = fitted_club(True)
    x, y = sample(256)
    x.requires_grad_(True)
    y.requires_grad_(True)
    club.mi_upper_bound(x, y).backward()
    assert x.grad is not None
    assert float(x.grad.abs().sum()) > 0
    assert y.grad is not None
    assert float(y.grad.abs().sum()) > 0


def test_mi_bound_is_clamped_at_zero_so_encoders_cannot_push_it_below() -> None:
    # q learned y ~ 0.9 x; encoders that scale y up against it make the raw in-batch
    # estimate as negative as they like (the Sports collapse). MI >= 0: clamped, no gradient.
    club, sample = fitted_club(True)
    x, _ = sample(256)
    y = (-10.0 * x).requires_grad_(True)
    assert float(club.estimate(x, y).detach()) < -10.0  # what the unclamped bound would reward
    bound = club.mi_upper_bound(x, y)
    bound.backward()
    assert float(bound.detach()) == 0.0
    assert y.grad is not None
    assert float(y.grad.abs().sum()) == 0.0
