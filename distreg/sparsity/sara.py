"""SaRA (Hu et al. 2024, spec sparsity-reweighting-ot.md section 7): the pure core.

SaRA fine-tunes only the "ineffective" parameters, the ones of smallest magnitude, and
keeps every other entry frozen at its pretrained value. Pieces, each tensor in, tensor out:

- `threshold_mask`: the trainable mask `M = 1[|theta| < tau]` of the reference code
  (absolute threshold; script default tau = 2e-3, `DEFAULT_THRESHOLD`).
- `fraction_masks`: the paper's wording, "the smallest fraction of each tensor", chosen
  exactly over local shards with the distributed bottom-k selection (spec S1, ties by
  global flat index); also returns each tensor's threshold, the largest selected |theta|.
- `reselect`: the one progressive re-selection `M' = M & 1[|theta| < tau]` (entries that
  grew past tau freeze; frozen entries never change, so this equals the fresh selection
  of the reference's UB variant). `inclusive=True` uses `<=` (fraction mode, whose tau is
  the largest selected |theta| of the tensor).
- `masked_nuclear_grad` / `nuclear_direction`: `lambda * (U V^T) * M` and `||theta * M||_*`
  from the SVD of the masked matrix (adamw2's low-rank term, the gradient of
  `lambda ||theta * M||_*`).
- `sara_lr`: the reference's default learning rate `1e-3 * exp(-350 tau)`.
- `pick_matrix`: the matrix that gets the nuclear term at a step, uniform over the
  eligible list and keyed on (seed, step) only, so every rank draws the same (spec S6).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from distreg.runtime.comm import Comm
from distreg.sparsity.masks import index_uniform
from distreg.sparsity.topk import ShardScores, select_bottom_k_fn

DEFAULT_THRESHOLD = 2e-3  # finetune.sh / README (the adamw2 constructor default is 1e-3)
DEFAULT_LAMBDA_RANK = 5e-4
DEFAULT_PROGRESSIVE_ITER = 2500
_EPS64 = torch.finfo(torch.float64).eps


def sara_lr(threshold: float) -> float:
    """The reference's learning rate when none is given: `1e-3 * exp(-350 tau)`
    (smaller thresholds select smaller weights, which get larger steps)."""
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    return 1e-3 * math.exp(-350.0 * threshold)


def threshold_mask(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Trainable mask `|theta| < tau` (bool, same shape). Elementwise: a shard's mask is
    the slice of the full tensor's mask, with no communication."""
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    return values.detach().abs() < threshold


def fraction_masks(shards: Sequence[ShardScores], fraction: float, comm: Comm | None = None, *,
                   replicated: bool = False) -> tuple[list[torch.Tensor], list[float | None]]:
    """Trainable masks selecting exactly `round(fraction * n_l)` entries of smallest
    |theta| in each tensor l (n_l its global element count; Python rounding, as the
    magnitude masks), over local shards (`ShardScores` of the weights, rank-ordered
    slices); ties at the threshold go to the lowest global flat index.

    Returns (local trainable masks, per-tensor threshold = the largest selected |theta|,
    None when nothing is selected). Collective when sharded: 4 histogram all-reduces and
    one tiny all-gather for all tensors together (`distreg.sparsity.topk`).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")

    def k_fn(eligible: list[int], total: list[int]) -> list[int]:
        return [round(fraction * n) for n in total]

    sel = select_bottom_k_fn(shards, list(range(len(shards))), k_fn, comm, by_abs=True, replicated=replicated)
    return [~k for k in sel.keep], list(sel.threshold)


def reselect(mask: torch.Tensor, values: torch.Tensor, threshold: float | None,
             inclusive: bool = False) -> torch.Tensor:
    """Progressive re-selection `M' = M & 1[|theta| < tau]` (`<=` with `inclusive`);
    `threshold=None` (a tensor with nothing selected) gives an all-False mask."""
    if threshold is None:
        return torch.zeros_like(mask, dtype=torch.bool)
    a = values.detach().abs().reshape(mask.shape)
    return mask & (a <= threshold if inclusive else a < threshold)


def nuclear_direction(masked: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(`U V^T`, `||A||_*`) of a whole (already masked) matrix `A`, float64.

    `U V^T` uses the numerically nonzero singular values (s > max(shape) * eps * s_max):
    the reference's `s.sum().backward()` also takes the singular vectors of zero singular
    values, which are arbitrary (solver- and sharding-dependent); both agree when `A` has
    full rank. An all-zero matrix gives zeros.
    """
    if masked.dim() != 2:
        raise ValueError(f"need a matrix, got shape {tuple(masked.shape)}")
    a = masked.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    r = int((s > max(a.shape) * _EPS64 * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return u[:, :r] @ vh[:r], float(s.sum())


def masked_nuclear_grad(matrix: torch.Tensor, mask: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """(`lam * (U V^T) * M`, `||theta * M||_*`) for a whole matrix `theta` and its
    trainable mask `M`, `U V^T` from the SVD of `theta * M` (`nuclear_direction`): the
    gradient of `lam * ||theta * M||_*` that adamw2 adds (float64)."""
    if mask.shape != matrix.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from the matrix's {tuple(matrix.shape)}")
    m = mask.to(torch.float64)
    direction, norm = nuclear_direction(matrix.detach().to(torch.float64) * m)
    return lam * direction * m, norm


def pick_matrix(seed: int, step: int, count: int) -> int:
    """Index in [0, count) of the matrix that gets the nuclear term at optimizer step
    `step`: `floor(U * count)`, U the S6 index-keyed uniform of (seed, "sara-nuclear",
    step). Identical on every rank and any world size, no communication; stateless, so
    a resumed run draws the same sequence."""
    if count <= 0:
        raise ValueError(f"no matrix to pick from (count={count})")
    u = float(index_uniform(seed, "sara-nuclear", step, 1)[0])
    return min(int(u * count), count - 1)
