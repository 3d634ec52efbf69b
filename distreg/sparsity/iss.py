"""ISS-P (Iterative Soft Shrinkage-Percentage, Wang et al. 2023) functional core.

Each iteration, after the optimizer step, the `q_l` smallest-|w| weights of each layer
are multiplied by `alpha` (< 1) instead of being zeroed, so they can recover if they
become important; at the end of the pruning phase the last selection is frozen into a
mask. Selection is per layer over the whole (unsharded) tensor via `topk` (spec S1,
one `[L, 256]` histogram all-reduce per round); the shrink is elementwise on the local
shard (spec S2). Spec section 1.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import torch

from distreg.runtime.comm import Comm
from distreg.sparsity.topk import ShardScores, select_bottom_k_fn

COUNT_ROUNDINGS = ("exact", "float_ceil")


def iss_count(ratio: float, numel: int, rounding: str = "exact") -> int:
    """Number of weights selected in a layer: `min(ceil(p * n), floor(0.995 * n))`.

    The cap keeps at least ~0.5 % of a layer. `rounding="exact"` evaluates both products
    on the decimal value of the floats (0.07 * 100 -> 7); `"float_ceil"` reproduces the
    reference code's float arithmetic (0.07 * 100 = 7.000000000000001 -> 8).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if rounding == "exact":
        return min(math.ceil(Fraction(repr(float(ratio))) * numel), math.floor(Fraction("0.995") * numel))
    if rounding == "float_ceil":
        return min(math.ceil(ratio * numel), math.floor(0.995 * numel))
    raise ValueError(f"unknown count rounding {rounding!r} ({' | '.join(COUNT_ROUNDINGS)})")


def iss_select(shards: Sequence[ShardScores], ratios: Sequence[float], comm: Comm | None = None, *,
               rounding: str = "exact", replicated: bool = False) -> list[torch.Tensor]:
    """Per-layer bottom-|w| selection of ISS-P: returns local keep-masks, False on the
    `iss_count(ratios[l], n_l)` smallest |w| of each whole layer (n_l = global numel,
    counted during the selection's first all-reduce). Ties: canonical (flat index).
    `shards[l].scores` are the layer's local weights (|.| is taken inside)."""
    if len(ratios) != len(shards):
        raise ValueError(f"{len(ratios)} ratios for {len(shards)} layers")

    def k_fn(eligible: list[int], total: list[int]) -> list[int]:
        return [min(iss_count(p, n, rounding), e) for p, n, e in zip(ratios, total, eligible)]

    return select_bottom_k_fn(shards, list(range(len(shards))), k_fn, comm, by_abs=True,
                              replicated=replicated).keep


def iss_shrink(weights: torch.Tensor, keep: torch.Tensor, alpha: float) -> torch.Tensor:
    """Soft shrink: selected entries (keep == False) times `alpha`, others unchanged.
    `alpha = 0` is IHT (hard zeroing). Returns a new tensor shaped like `weights`."""
    scale = torch.where(keep.reshape(weights.shape), torch.ones((), dtype=weights.dtype),
                        torch.full((), alpha, dtype=weights.dtype))
    return weights * scale


def nm_select(scores: torch.Tensor, n: int, m: int, flat_start: int = 0) -> torch.Tensor:
    """N:M selection (`pick_pruned = "min_N:M"`): in every run of `m` consecutive flat
    elements, select the `n` smallest |score| (ties: lowest index). Returns the local
    keep-mask. Purely local: the slice must start and end on group boundaries (FSDP2
    `Shard(0)` guarantees this iff prod(shape[1:]) % m == 0); otherwise ValueError."""
    s = scores.detach().reshape(-1).float()
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"invalid N:M = {n}:{m}")
    if flat_start % m or s.numel() % m:
        raise ValueError(f"N:M groups of {m} straddle this slice (start {flat_start}, numel {s.numel()})")
    if not torch.isfinite(s).all():
        raise ValueError("non-finite scores in N:M selection")
    order = s.abs().view(-1, m).sort(dim=1, stable=True).indices[:, :n]
    keep = torch.ones_like(s, dtype=torch.bool).view(-1, m)
    keep.scatter_(1, order, False)
    return keep.view(-1)
