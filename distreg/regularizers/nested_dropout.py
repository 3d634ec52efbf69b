"""Nested dropout on the penultimate feature (spec regularizers.md section 9, Chen et al.,
"Compressing Features for Learning with Noisy Labels").

One draw j per global mini-batch from p(j) ∝ exp(-((j - mu) / sigma)^2), j = 1..D; features
j+1..D are zeroed, no rescaling [CODE]. The draw is keyed by (seed, global step) (spec P6), so
every rank draws the same j with no communication and a resumed run redraws identically.
Defaults [CODE scripts]: mu = 0, sigma = 10 (CIFAR-10) or 100 (CIFAR-100, Clothing1M, ANIMAL-10N).
"""
from __future__ import annotations

import torch

from distreg.sparsity.masks import index_uniform


def nested_dropout_probs(dim: int, sigma: float, mu: float = 0.0) -> torch.Tensor:
    """p(j) for keeping j = 1..dim units, float64 [dim]."""
    j = torch.arange(1, dim + 1, dtype=torch.float64)
    w = torch.exp(-(((j - mu) / sigma) ** 2))
    return w / w.sum()


def nested_dropout_keep(seed: int, step: int, dim: int, sigma: float, mu: float = 0.0,
                        purpose: str = "nested-dropout") -> int:
    """The number of units j in 1..dim kept at global step `step` (inverse-CDF of one uniform
    from the counter-based generator of `distreg.sparsity.masks.index_uniform`, keyed by
    (seed, purpose, step))."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    u = index_uniform(seed, purpose, step, 1)
    cdf = torch.cumsum(nested_dropout_probs(dim, sigma, mu), 0)
    return min(int(torch.searchsorted(cdf, u, right=True)) + 1, dim)


def nested_dropout(h: torch.Tensor, keep: int) -> torch.Tensor:
    """h with the features (last dim) after the first `keep` set to 0; no rescaling."""
    mask = torch.arange(h.shape[-1], device=h.device) < keep
    return h * mask.to(h.dtype)
