"""Fire Together Wire Together (FTWT; Elkerdawy et al., CVPR 2022): the pure core.

Dynamic filter pruning with self-supervised mask prediction. For a gated convolution, a
small predictor reads the layer's *input* (the previous layer's activations) and emits one
logit per output filter; it is trained by binary cross-entropy against targets built from
the layer's own *output* for the same sample, so no label or other sample is involved.

What is taken from the authors' reference code (github selkerdawy/FTWT, utils/layers.py and
utils/utils.py), since only the abstract of the paper could be read here:

- heat-map score of a filter: the spatial max of |activation| (`get_fmap_criteria`);
- "mass" targets (`get_gt_mask_ratio`): scores normalised to sum 1 per sample, sorted
  descending (ties: lower filter index first, our choice for determinism), cumulative sum;
  a filter is kept while the cumulative mass up to and including it is <= r + 1e-5. At
  r = 1 exactly, the filters dropped are those whose normalised score is <= 1e-5. So k (the
  kept count) is chosen per sample by the mass of its heat-maps;
- loss (`compute_mask_loss_per_input`): BCE-with-logits per filter, summed over filters,
  averaged over the batch and over the gated layers;
- accuracy: per sample, the fraction of filters where (sigmoid(logit) > 0.5) == target;
- cost of a gated conv (`ConvWithMask.forward`): kept_out * H_out * W_out *
  (kept_in / groups) * kernel_area multiply-accumulates (bias ignored).

A sample whose scores are all zero (nan in the reference) keeps every filter when r < 1
and none when r = 1 (every normalised score is 0 <= 1e-5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MASS_DELTA = 1e-5  # the reference's tolerance on the cumulative mass


def heat_scores(act: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] activations -> [B, C]: each filter's spatial max of |activation|."""
    if act.dim() != 4:
        raise ValueError(f"heat_scores: expected [B, C, H, W] activations, got shape {tuple(act.shape)}")
    return act.detach().abs().amax(dim=(2, 3))


def mass_targets(scores: torch.Tensor, mass_threshold: float) -> torch.Tensor:
    """[B, C] non-negative scores -> [B, C] bool keep-targets (True: the filter is kept).

    Per sample: keep the highest-scoring filters whose cumulative normalised mass stays
    within `mass_threshold` (r in (0, 1]); r = 1 drops only the filters with
    (normalised) zero mass."""
    if not 0.0 < mass_threshold <= 1.0:
        raise ValueError(f"mass_threshold must be in (0, 1], got {mass_threshold}")
    s = scores.detach().double()
    norm = s / s.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    if mass_threshold == 1.0:
        return norm > MASS_DELTA
    order = torch.sort(norm, dim=1, descending=True, stable=True)
    kept_sorted = torch.cumsum(order.values, dim=1) - mass_threshold <= MASS_DELTA
    return torch.zeros_like(kept_sorted).scatter(1, order.indices, kept_sorted)


def mask_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, C] logits, [B, C] targets -> [B]: each sample's BCE summed over filters."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none").sum(dim=1)


def predicted_keep(logits: torch.Tensor) -> torch.Tensor:
    """The binary mask the predictor asks for: sigmoid(logit) > 0.5, i.e. logit > 0."""
    return logits.detach() > 0


def mask_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B]: per sample, the fraction of filters whose predicted keep bit equals the target."""
    return (predicted_keep(logits) == targets.bool()).double().mean(dim=1)


def conv_macs(kept_in: torch.Tensor | float, kept_out: torch.Tensor | float, out_hw: tuple[int, int],
              kernel_area: int, groups: int = 1) -> torch.Tensor | float:
    """Multiply-accumulates of a conv that runs `kept_out` filters on `kept_in` input
    channels (per sample; tensors broadcast): kept_out * H*W * (kept_in / groups) * k*k."""
    return kept_out * (out_hw[0] * out_hw[1]) * (kept_in / groups) * kernel_area


def flops_reduction(kept_macs: torch.Tensor | float, dense_macs: torch.Tensor | float) -> torch.Tensor | float:
    """Fraction of multiply-accumulates saved: 1 - kept / dense."""
    return 1 - kept_macs / dense_macs
