"""DIN: mini-batch-aware L2 on sparse embedding rows and the Dice activation (spec
regularizers.md section 10).

Feature ids come as a padded [samples, slots] integer tensor (`pad` marks empty slots); a
feature counts once per sample however often it appears in it.
"""
from __future__ import annotations

import math

import torch

from distreg.regularizers._dist import active, all_reduce_nograd, sum_partial
from distreg.runtime.comm import Comm


def _unique_per_sample(ids: torch.Tensor, pad: int) -> torch.Tensor:
    ids = ids.reshape(ids.shape[0], math.prod(ids.shape[1:]))
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
    valid = ids != pad
    pairs = torch.unique(torch.stack([rows[valid], ids[valid]]), dim=1)
    return pairs[1]


def feature_counts(ids: torch.Tensor, num_features: int, comm: Comm | None = None, pad: int = -1) -> torch.Tensor:
    """n_j: number of samples containing feature j, int64 [num_features], summed over ranks.
    Run once over the training set (each rank over its data shard); the hook keeps the slice
    of its own embedding rows. The all-reduce carries the whole [num_features] vector."""
    counts = torch.bincount(_unique_per_sample(ids, pad), minlength=num_features)
    return all_reduce_nograd(counts, comm)


def batch_presence(ids: torch.Tensor, num_rows: int, row_start: int = 0, comm: Comm | None = None,
                   pad: int = -1) -> torch.Tensor:
    """alpha_{mj} for the rows [row_start, row_start + num_rows) this rank holds: True if any
    sample of the *global* mini-batch contains feature j. The unique ids of every rank are
    all-gathered (communication scales with the batch, not the vocabulary)."""
    uniq = torch.unique(ids[ids != pad])
    if active(comm):
        uniq = torch.unique(torch.cat(comm.all_gather_uneven(uniq)))
    local = uniq[(uniq >= row_start) & (uniq < row_start + num_rows)] - row_start
    present = torch.zeros(num_rows, dtype=torch.bool, device=ids.device)
    present[local] = True
    return present


def mba_l2(weight: torch.Tensor, counts: torch.Tensor, present: torch.Tensor, lam: float) -> torch.Tensor:
    """Mini-batch-aware L2 as an auxiliary loss (lam / 2) sum_j (alpha_j / n_j) ||w_j||^2 [PAPER];
    its gradient lam (alpha_j / n_j) w_j is the paper's update term (coupled like an L2 gradient,
    not decoupled decay). `weight` [rows, dim], `counts` and `present` [rows] are this rank's
    aligned rows; rows that are present need n_j >= 1. lam has no published default (open
    item 7). Under DDP (whole table, identical `present`) the term is rank-identical; with
    row-sharded tables each rank's term covers its rows and its gradient bypasses averaging."""
    coef = torch.where(present, 1.0 / counts.to(torch.float64), torch.zeros((), dtype=torch.float64))
    return 0.5 * lam * (coef.to(weight.dtype) * (weight * weight).sum(-1)).sum()


def dice_batch_moments(s: torch.Tensor, comm: Comm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance over dim 0 of the *global* batch, SyncBN style:
    (sum s, sum s^2, count) are all-reduced in forward and their gradients in backward
    ("partial" convention), so the ranks' gradients sum to the single-process gradient."""
    mean, var, _ = dice_batch_stats(s, comm)
    return mean, var


def dice_batch_stats(s: torch.Tensor, comm: Comm | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dice_batch_moments` plus the global sample count (a detached scalar), from the same
    single all-reduce: what a module needs to also update running statistics."""
    x = s.reshape(s.shape[0], math.prod(s.shape[1:])).to(torch.promote_types(s.dtype, torch.float32))
    local = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), float(x.shape[0]))])
    total = sum_partial(local, comm)
    c = x.shape[1]
    n = total[-1].detach()
    mean = total[:c] / n
    var = total[c : 2 * c] / n - mean * mean
    shape = s.shape[1:]
    return mean.reshape(shape).to(s.dtype), var.reshape(shape).to(s.dtype), n


def dice(s: torch.Tensor, alpha: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
         eps: float = 1e-8) -> torch.Tensor:
    """Dice, paper form [PAPER]: p = sigmoid((s - E[s]) / sqrt(Var[s] + eps)),
    f = p s + (1 - p) alpha s; alpha learnable per channel. Pass the mini-batch moments
    (`dice_batch_moments`) in training and running averages at inference."""
    p = torch.sigmoid((s - mean) / torch.sqrt(var + eps))
    return p * s + (1 - p) * alpha * s


def dice_reference(s: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, bn_eps: float = 1e-3) -> torch.Tensor:
    """Dice as the public DIN repo computes it (`reference_compat`) [CODE]: p = sigmoid(beta * BN(s))
    with the never-updated BN statistics (mean 0, var 1), i.e. BN(s) = s / sqrt(1 + bn_eps)."""
    p = torch.sigmoid(beta * s / (1 + bn_eps) ** 0.5)
    return p * s + (1 - p) * alpha * s
