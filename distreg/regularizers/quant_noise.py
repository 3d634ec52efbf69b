"""Quantization noise (QuantNAS, Shvetsov et al., "QuantNAS for super resolution: searching
for efficient quantization-friendly architectures against quantization noise", IEEE Access
2024) and the real uniform quantizer it stands in for.

b-bit uniform affine quantization of a tensor w with range [lo, hi] rounds every element to
the grid lo + k·Δ, Δ = (hi - lo) / (2^b - 1), k = 0 .. 2^b - 1, so its error lies in
[-Δ/2, Δ/2]. QuantNAS trains against that error by adding noise of the same scale instead
of rounding ("Adding quantization noise to parameters and activations approximates model
degradation after quantization" -- abstract). The form, from the authors' code
(`quant_noise(x, bit, n_type)`: `scale = max - min`, `unit = 1 / (2**bit - 1)`,
`noise = scale * unit * source`, source `rand - 0.5` for "uniform" or `randn / 2` for
"gaussian", the code's default):

    noise = Δ · (U - 1/2)        U ~ Uniform[0, 1)        (variance Δ²/12 = rounding's)
    noise = Δ · Z / 2            Z ~ N(0, 1)

The reference returns the noisy tensor detached; how it is attached to the graph is not in
the excerpt we could read. distreg adds the noise as a constant (w + noise.detach()), so the
weight gradient is the straight-through one: d loss / d w = d loss / d (w + noise).

Distributed (spec P6): the draws come from the counter-based generator of
`distreg.sparsity.masks.index_uniform_at`, keyed by (seed, parameter name, step) and the
element's flat index in the full tensor, so every rank, sharding and device draws the same
noise with no communication. Ranges are over the whole tensor (or each output channel).
"""
from __future__ import annotations

import math

import torch

from distreg.sparsity.masks import index_uniform_at

NOISE_KINDS = ("uniform", "gaussian")


def _ranges(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of the whole tensor, or of each output channel (dim 0) broadcastable to w."""
    if not per_channel or w.ndim < 2:
        return w.amin(), w.amax()
    dims = tuple(range(1, w.ndim))
    return w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True)


def quant_step(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """Δ = (max - min) / (2^bits - 1): a scalar, or [out, 1, ...] per output channel."""
    if not 1 <= bits <= 24:
        raise ValueError(f"bits must be in 1..24, got {bits}")
    lo, hi = _ranges(w.detach(), per_channel)
    return (hi - lo) / (2**bits - 1)


def noise_source(seed: int, key: str, numel: int, kind: str, device=None) -> torch.Tensor:
    """The unit noise of `numel` elements (float64, flat): U - 1/2 or Z / 2 (Box-Muller on
    two keyed uniforms). Element j depends only on (seed, key, j)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    j = torch.arange(numel, dtype=torch.int64, device=device)
    if kind == "uniform":
        return index_uniform_at(seed, key, j) - 0.5
    u1 = index_uniform_at(seed, key + "/u1", j)
    u2 = index_uniform_at(seed, key + "/u2", j)
    z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)  # 1 - u1 in (0, 1]
    return z / 2.0


def quant_noise(w: torch.Tensor, bits: int, seed: int, key: str, kind: str = "uniform",
                per_channel: bool = False) -> torch.Tensor:
    """The (detached) noise to add to w: Δ · source, in w's dtype and shape."""
    delta = quant_step(w, bits, per_channel).double()
    src = noise_source(seed, key, w.numel(), kind, w.device).view(w.shape)
    return (delta * src).to(w.dtype)


def fake_quantize(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """The real b-bit uniform affine quantization of w, dequantized: lo + round((w - lo)/Δ)·Δ
    (a constant tensor: for evaluation and reports, not for training)."""
    w = w.detach()
    lo, hi = _ranges(w, per_channel)
    delta = (hi - lo) / (2**bits - 1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    k = torch.round((w - lo) / safe).clamp(0, 2**bits - 1)
    return torch.where(delta > 0, lo + k * delta, w)
