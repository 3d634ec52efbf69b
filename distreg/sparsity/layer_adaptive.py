"""Layer-adaptive sparsity allocation by dynamic programming (Xu et al., ICCV 2023):
the pure core of the `layer_adaptive` hook.

The paper's observation: the output distortion caused by pruning several layers is close
to the sum of the distortions caused by pruning each layer alone, δ(s_1..s_L) ≈ Σ_l
δ_l(s_l). With each δ_l measured on a grid of sparsity levels, the allocation that
minimises the estimated distortion under a global budget is a multiple-choice knapsack,
solved exactly by dynamic programming over the layers.

What comes from the reference implementation (github.com/Akimoto-Cris/RD_PRUNE, the code
the paper points to; `tools/pruners.py` `gen_rd_curves` and `tools/algo.py` `dp_pruning`,
`pruning` / `get_mask`):
- δ_l(s) is the mean squared difference between the network output (logits) of the dense
  model and of the model with only layer l magnitude-pruned to level s, on a calibration
  set, in eval mode; `--worst_case_curve` takes the largest per-sample mean instead.
  (`sample_sq_errors`, `distortion_from_sums`.)
- Levels are a uniform grid of pruned fractions, `d / maxsps` for d = 0..maxsps (default
  101 levels, 0 to 1 inclusive); a level prunes the smallest-|w| entries of the layer.
- The budget is counted in weights: survivors <= int((1 - target) * total), i.e. at
  least the target number pruned; the DP runs over the survivor count at single-weight
  granularity, layer by layer (layers sorted by size), minimising the summed distortion,
  then backtracks the chosen level of each layer.
- Not taken: the reference's `find_slope` (a Lagrangian slope search) calls a
  `pareto_condition` that is not in the repository; the DP is the method the paper and
  the code use. The iterative mode (levels constrained to >= the previous iteration's) is
  not implemented: distreg prunes once and keeps the masks fixed.

What distreg decided (documented in the hook as well):
- Counts: level s prunes exactly `round(s * n_l)` entries of a layer of n_l weights
  (Python's round-half-even, the same rule as `magnitude_masks`; the reference takes
  `int(s * n_l)`), selected exactly over shards with the canonical tie-break (spec S1).
- Budget rule: prune at least `target_count` weights in total; among all such
  allocations take the smallest total distortion, then the smallest total pruned count,
  then (within one DP cell) the lowest level of the later layers. With `unit = 1` the
  DP is exact (checked against brute force). The reference's DP is exact only in its
  survivor bookkeeping (its first layer takes the closest level, not a feasible one).
- Budget granularity: a DP cell per pruned weight is infeasible for large models
  (the reference's table is layers x weights). With `unit = u > 1` each layer-level costs
  `floor(count / u)` units and the target is `ceil(target_count / u)` units, so the true
  count is still >= target_count (the solution is exact for the quantised problem; the
  overshoot grows by at most about L*u weights). The hook chooses
  `u = ceil(total / budget_bins)`.
- With monotone curves (the hook's default, `monotone_envelope`) and the tie-break above,
  the overshoot past the target is smaller than the last level step of every pruned
  layer (at `unit = 1`): any pruned layer one level lower would miss the target.
  Measured curves can dip (noise); the envelope stops the DP from "buying" distortion
  decreases with extra sparsity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

F64 = torch.float64


@dataclass
class Allocation:
    """The DP's answer: `level_index[l]` into the level grid, `pruned[l]` the exact count it
    prunes in layer l, their sum, and the summed distortion of the chosen cells."""

    level_index: list[int]
    pruned: list[int]
    total_pruned: int
    distortion: float


def level_grid(num_levels: int, max_level: float) -> list[float]:
    """`num_levels` evenly spaced pruned fractions from 0 to `max_level` inclusive
    (the reference's grid is `level_grid(maxsps + 1, 1.0)`)."""
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    if not 0.0 < max_level <= 1.0:
        raise ValueError(f"max_level must be in (0, 1], got {max_level}")
    return [max_level * j / (num_levels - 1) for j in range(num_levels)]


def check_levels(levels: Sequence[float]) -> list[float]:
    levels = [float(v) for v in levels]
    if len(levels) < 2:
        raise ValueError(f"levels: need at least 2 values, got {levels}")
    if any(not 0.0 <= v <= 1.0 for v in levels):
        raise ValueError(f"levels must lie in [0, 1], got {levels}")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must be strictly increasing, got {levels}")
    return levels


def level_counts(prunable_counts: Sequence[int], levels: Sequence[float]) -> list[list[int]]:
    """counts[l][j] = round(levels[j] * n_l): entries level j prunes in layer l."""
    return [[round(s * int(n)) for s in levels] for n in prunable_counts]


def monotone_envelope(distortion: torch.Tensor) -> torch.Tensor:
    """Running maximum along the levels: δ_l(s_j) := max_{i <= j} δ_l(s_i)."""
    return torch.cummax(torch.as_tensor(distortion, dtype=F64), dim=1).values


def allocate(distortion, prunable_counts: Sequence[int], levels: Sequence[float], target_count: int, *,
             unit: int = 1) -> Allocation:
    """Per-layer levels minimising Σ_l distortion[l, j_l] subject to Σ_l round(levels[j_l]
    n_l) >= target_count (see the module docstring for the tie-break and `unit`).

    `distortion` is [L, S] (S = len(levels)), finite; `prunable_counts[l]` = n_l.
    Time O(L · S · C) and memory O(L · C) with C = Σ_l floor(round(max level · n_l) / unit).
    Raises ValueError when no allocation reaches the target.
    """
    table = torch.as_tensor(distortion, dtype=F64)
    levels = check_levels(levels)
    n_layers = len(prunable_counts)
    if table.dim() != 2 or tuple(table.shape) != (n_layers, len(levels)):
        raise ValueError(f"distortion must be [layers={n_layers}, levels={len(levels)}], got {tuple(table.shape)}")
    if not torch.isfinite(table).all():
        raise ValueError("distortion table holds NaN/inf")
    if unit < 1:
        raise ValueError(f"unit must be >= 1, got {unit}")
    counts = level_counts(prunable_counts, levels)
    most = sum(row[-1] for row in counts)
    if not 0 <= target_count <= most:
        raise ValueError(f"target of {target_count} pruned weights is outside what the levels reach "
                         f"(0 .. {most}, the largest level in every layer)")
    cost = [[c // unit for c in row] for row in counts]
    need = -(-target_count // unit)
    reach_max = sum(row[-1] for row in cost)
    if need > reach_max:
        raise ValueError(f"target of {target_count} weights is not reachable at a budget unit of {unit} weights "
                         f"(at most {reach_max * unit}): use a finer budget (more budget_bins)")

    best = torch.full((reach_max + 1,), math.inf, dtype=F64)
    best[0] = 0.0
    choice = torch.zeros((n_layers, reach_max + 1), dtype=torch.int16 if len(levels) < 2**15 else torch.int32)
    reach = 0  # largest cost reachable with the layers so far
    for layer in range(n_layers):
        new = torch.full_like(best, math.inf)
        for j, c in enumerate(cost[layer]):
            cand = best[:reach + 1] + table[layer, j]
            seg = new[c:c + reach + 1]
            better = cand < seg  # strict: on equal distortion the lower level keeps the cell
            seg[better] = cand[better]
            choice[layer, c:c + reach + 1][better] = j
        reach += cost[layer][-1]
        best = new
    # smallest distortion among cells >= need; argmin takes the first, i.e. the smallest count
    cell = need + int(torch.argmin(best[need:reach + 1]))
    picked = [0] * n_layers
    for layer in reversed(range(n_layers)):
        j = int(choice[layer, cell])
        picked[layer] = j
        cell -= cost[layer][j]
    pruned = [counts[l][j] for l, j in enumerate(picked)]
    total = 0.0
    for l, j in enumerate(picked):  # the DP's summation order: layer 0 first
        total = total + float(table[l, j])
    return Allocation(picked, pruned, sum(pruned), total)


# --------------------------------------------------------------------------- distortion


def sample_sq_errors(out: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample i: (Σ of squared output differences over its valid positions and all
    output channels, the number of values summed), float64, each [B].

    `out` / `ref`: [B, ..., C] (logits of a classifier [B, C], of a language model
    [B, T, V]); `valid`: bool [B, ...] (positions whose target is not ignored), or None.
    """
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the dense output's {tuple(ref.shape)}")
    sq = (out.to(F64) - ref.to(F64)).square().sum(-1)  # [B, ...]
    channels = out.shape[-1]
    if valid is None:
        valid = torch.ones(sq.shape, dtype=torch.bool, device=sq.device)
    elif valid.shape != sq.shape:
        raise ValueError(f"valid mask {tuple(valid.shape)} does not match the output positions {tuple(sq.shape)}")
    sq = torch.where(valid, sq, sq.new_zeros(())).reshape(sq.shape[0], -1).sum(1)
    n = valid.reshape(valid.shape[0], -1).sum(1).to(F64) * channels
    return sq, n


def local_distortion(sq: torch.Tensor, n: torch.Tensor, kind: str) -> torch.Tensor:
    """This rank's share of one distortion value, for the rank-global reduction:
    `mse`: Σ_i sq_i (summed over ranks, divided by the global value count);
    `worst_case`: max_i sq_i / n_i (max over ranks; 0 when this rank has no samples)."""
    if kind == "mse":
        return sq.sum()
    if kind == "worst_case":
        means = sq[n > 0] / n[n > 0]
        return means.max() if means.numel() else sq.new_zeros(())
    raise ValueError(f"unknown distortion {kind!r} (mse | worst_case)")


def distortion_from_sums(reduced: torch.Tensor, total_values: float, kind: str) -> torch.Tensor:
    """The global distortion from the reduced `local_distortion` values."""
    if kind == "mse":
        return reduced / total_values if total_values > 0 else torch.zeros_like(reduced)
    return reduced
