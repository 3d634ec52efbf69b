"""EQ-Net weight distribution regularisation (WDR-Loss) (spec regularizers.md section 14).

Per weight tensor: mu = mean(w), sigma = std(w) with Bessel's correction,
Kurt = mean(((w - mu) / sigma)^4), Skew = mean(((w - mu) / sigma)^3) [CODE];
L = kurt_rate * mean_layers (Kurt - 1.8)^2 + skew_rate * mean_layers Skew^2, with the reference's
defaults kurt_rate = 0.015, skew_rate = 1.0 and the first Conv/Linear layer dropped.
"""
from __future__ import annotations

from typing import Sequence

import torch

from distreg.regularizers._dist import sum_spliced
from distreg.runtime.comm import Comm


def standardized_moments(weights: Sequence[torch.Tensor], comm: Comm | None = None) -> torch.Tensor:
    """[layers, 2] float64 (kurtosis, skewness) of each tensor, differentiable.

    With `comm`, each entry is this rank's shard of that tensor (any split, empty allowed) and
    the moments are exact whole-tensor moments (spec P3), in two all-reduces for all layers
    together: (n, sum w), then the sums of (w - c)^p, p = 1..4, about c = the detached global
    mean; the centred sums are rebuilt by the binomial expansion around mu, so the gradient
    through mu is exact too. "replicated" convention: same value on every rank; each rank's
    gradient is its exact slice of the full gradient (keep it out of the data-parallel average).
    A tensor needs at least 2 elements.
    """
    flat = [w.reshape(-1).to(torch.float64) for w in weights]
    first = torch.stack([torch.stack([w.new_tensor(float(w.numel())), w.sum()]) for w in flat])
    first = sum_spliced(first, comm)
    n = first[:, 0].detach()
    mu = first[:, 1] / n
    centre = mu.detach()
    raw = torch.stack([torch.stack([((w - c) ** p).sum() for p in (1, 2, 3, 4)]) for w, c in zip(flat, centre)])
    m1, m2, m3, m4 = sum_spliced(raw, comm).unbind(1)
    delta = centre - mu  # value exactly 0; carries d/d(mu)
    c2 = m2 + 2 * m1 * delta + n * delta**2
    c3 = m3 + 3 * m2 * delta + 3 * m1 * delta**2 + n * delta**3
    c4 = m4 + 4 * m3 * delta + 6 * m2 * delta**2 + 4 * m1 * delta**3 + n * delta**4
    var = c2 / (n - 1)
    return torch.stack([c4 / n / var**2, c3 / n / var**1.5], dim=1)


def wdr_loss(weights: Sequence[torch.Tensor], kurt_rate: float = 0.015, skew_rate: float = 1.0,
             skip_first: bool = True, comm: Comm | None = None) -> torch.Tensor:
    """kurt_rate * mean (Kurt - 1.8)^2 + skew_rate * mean Skew^2 over `weights` (module order,
    Conv2d / Linear / quantised weights), the first one dropped when `skip_first` (reference)."""
    ws = list(weights)[1:] if skip_first else list(weights)
    if not ws:
        raise ValueError("wdr_loss needs at least one weight tensor after skipping the first")
    ks = standardized_moments(ws, comm)
    return kurt_rate * ((ks[:, 0] - 1.8) ** 2).mean() + skew_rate * (ks[:, 1] ** 2).mean()
