"""Sparsity masks over sharded parameters: the pure functional core.

- `topk`: exact bottom-k selection over local shards (global or per-layer scope) with
  all-reduced radix histograms and a canonical tie-break (spec S1).
- `masks`: global / layer-wise magnitude masks, torch.prune-compatible global
  unstructured masks, ER / ERK layer densities, index-keyed random masks (spec S6).
- `iss`: ISS-P selection counts, per-layer selection, soft shrink, N:M selection.
- `schedules`: Zhu & Gupta cubic gradual-pruning schedule.
- `layer_adaptive`: per-layer sparsity allocation by dynamic programming over
  output-distortion curves (Xu et al. 2023): level grid, budget rule, distortion sums.
- `dsnot`: DSnoT calibration statistics, Wanda masks, prune-and-grow cycles per row.
- `sara`: SaRA trainable masks (threshold / exact fraction), re-selection, masked
  nuclear-norm gradient, the paper's lr rule.

Everything here is tensor in, tensor out; collectives only through a `Comm`, and none
with `replicated=True` (DDP) or a world-size-1 `Comm`. Hooks wrap these.
"""
from distreg.sparsity.iss import iss_count, iss_select, iss_shrink, nm_select
from distreg.sparsity.masks import (
    global_unstructured_masks,
    index_uniform,
    layer_densities,
    magnitude_masks,
    random_keep_mask,
)
from distreg.sparsity.sara import fraction_masks, masked_nuclear_grad, pick_matrix, reselect, sara_lr, threshold_mask
from distreg.sparsity.schedules import is_pruning_step, sparsity_at
from distreg.sparsity.topk import (
    Selection,
    ShardScores,
    select_bottom_k,
    select_bottom_k_columns,
    select_bottom_k_fn,
    select_bottom_k_per_layer,
)

__all__ = [
    "Selection", "ShardScores", "select_bottom_k", "select_bottom_k_fn", "select_bottom_k_per_layer",
    "magnitude_masks", "global_unstructured_masks", "layer_densities", "index_uniform", "random_keep_mask",
    "iss_count", "iss_select", "iss_shrink", "nm_select",
    "sparsity_at", "is_pruning_step",
    "threshold_mask", "fraction_masks", "reselect", "masked_nuclear_grad", "pick_matrix", "sara_lr",
    "select_bottom_k_columns",
]
