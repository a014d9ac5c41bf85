from __future__ import annotations

import torch

from model.club import CLUB


def fitted_estimate(dependent: bool) -> float:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    club = CLUB(x_dim=4, y_dim=4, hidden=32)
    opt = torch.optim.Adam(club.parameters(), lr=5e-3)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 4, generator=g)
        noise = torch.randn(n, 4, generator=g)
        y = 0.9 * x + 0.3 * noise if dependent else noise
        return x, y

    for _ in range(300):  # the estimator's own maximum-likelihood steps
        x, y = sample(256)
        opt.zero_grad()
        (-club.log_likelihood(x, y)).backward()
        opt.step()
    with torch.no_grad():
        x, y = sample(4096)
        return float(club.mi_upper_bound(x, y))


def test_club_estimate_separates_dependent_from_independent_samples() -> None:
    dependent, independent = fitted_estimate(True), fitted_estimate(False)
    # true MI of the dependent pair is 4 * 0.5 * log(1 + 0.81 / 0.09) ~ 4.6 nats; independent 0
    assert dependent > 2.0
    assert abs(independent) < 0.2
    assert dependent > 10 * abs(independent)


def test_mi_bound_is_differentiable_in_its_inputs() -> None:
    club = CLUB(x_dim=3, y_dim=2)
    x = torch.randn(16, 3, requires_grad=True)
    y = torch.randn(16, 2, requires_grad=True)
    club.mi_upper_bound(x, y).backward()
    assert x.grad is not None
    assert y.grad is not None
