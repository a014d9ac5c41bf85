"""CLUB: a contrastive log-ratio upper bound of mutual information (Cheng et al., ICML 2020).

vCLUB with a Gaussian variational q(y | x) = N(mu(x), diag(exp(logvar(x)))):

    I(x; y) <= E_p(x,y)[log q(y|x)] - E_p(x)E_p(y)[log q(y|x)]

estimated in-batch (positives: matching rows; negatives: all pairs). Two separate steps:
`log_likelihood` is *maximised* by the estimator's own optimiser on detached samples so q
tracks p(y|x); `mi_upper_bound` is *minimised* by the main model, with the estimator frozen.

The estimate is clamped at zero. Mutual information is never negative, so a negative estimate
only says that q lags behind the encoders; unclamped, the encoders can drive it without limit
(scaling y up against mu(x)) faster than q follows. On Sports that ran the estimate to -545 by
epoch 15 and -5,200 by epoch 25, and collapsed the tokenizer's first code level (docs/RESULTS.md).
"""

from __future__ import annotations

from torch import Tensor, nn


class CLUB(nn.Module):
    def __init__(self, *, x_dim: int, y_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(
            nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim), nn.Tanh()
        )

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean log q(y_i | x_i) up to a constant; the estimator's training objective."""
        mu, logvar = self.mu(x), self.logvar(x)  # (B, Dy)
        ll: Tensor = (-((mu - y) ** 2) / logvar.exp() - logvar).sum(dim=1).mean()
        return ll

    def estimate(self, x: Tensor, y: Tensor) -> Tensor:
        """The raw in-batch vCLUB estimate of I(x; y): negative when q lags behind."""
        mu, logvar = self.mu(x), self.logvar(x)  # (B, Dy)
        var = logvar.exp()
        positive = -((mu - y) ** 2) / var / 2.0  # (B, Dy)
        # E_j (y_j - mu_i)^2 = (mu_i - E y)^2 + Var y, per dimension: O(B * Dy), not O(B^2 * Dy)
        y_mean, y_sq_mean = y.mean(dim=0, keepdim=True), (y**2).mean(dim=0, keepdim=True)
        negative = -((mu - y_mean) ** 2 + y_sq_mean - y_mean**2) / var / 2.0  # (B, Dy)
        raw: Tensor = (positive.sum(dim=1) - negative.sum(dim=1)).mean()
        return raw

    def mi_upper_bound(self, x: Tensor, y: Tensor) -> Tensor:
        """The estimate clamped at 0, what the main model minimises; differentiable in x and y
        where positive (zero gradient once the estimate says independent)."""
        return self.estimate(x, y).clamp(min=0.0)
