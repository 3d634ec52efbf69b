"""Hard Patches Mining (HPM; Wang et al., "Hard Patches Mining for Masked Image Modeling",
CVPR 2023): the functional core. Formulas from the authors' code (github
Haochen-Wang409/HPM: `models_mae_learn_loss.py`, `engine_pretrain.py`, `main_pretrain.py`,
`scripts/pretrain_base.sh`); the hook is distreg.hooks.hpm.

- `ranking_loss` (the reference's `forward_learning_loss(relative=True)`): for every
  ordered pair (i, j) of a sample's masked patches with different target losses, a binary
  cross-entropy that pred_j - pred_i has the sign of target_j - target_i:
  -[t_j > t_i] log(σ(p_j - p_i) + 1e-6) - [t_j < t_i] log(1 - σ(p_j - p_i) + 1e-6).
  The reference divides the sum over the *whole batch* by the batch's number of untied
  pairs; here each sample's sum is divided by its own count (a per-sample loss, so the
  strategies' weighted mean needs no extra all-reduce). Both are equal whenever every
  sample has the same number of untied pairs (a fixed mask ratio and no exactly equal
  patch losses: the case in practice).
- `select_visible` (the reference's `generate_mask`): of the n_mask = L - n_keep masked
  patches, the n_hard = int(n_mask * hard_fraction) with the highest predicted loss are
  masked for sure; the rest of the mask is random among the other patches.
- `hard_fraction` (the reference's `keep_ratio = (epoch + 1) / total_epoch * 0.5`): the
  easy-to-hard schedule, linear from 0 to `max_fraction` (reference 0.5) over
  `schedule_steps` (reference: the whole run, counted in epochs; here in optimizer steps).
- `ema_decay` (the reference's EMA teacher, timm ModelEma: 0.999 + e/100 * (0.9999 - 0.999)
  for epoch e < 100, then 0.9999): linear from `start` to `end` over `ramp_steps`.
"""
from __future__ import annotations

import torch

from distreg.models.mae import visible_from_scores


def hard_fraction(step: int, schedule_steps: int, max_fraction: float = 0.5) -> float:
    """Share of the masked patches chosen by predicted loss at optimizer step `step`
    (0-based): max_fraction * min((step + 1) / schedule_steps, 1)."""
    return max_fraction * min((step + 1) / schedule_steps, 1.0)


def num_hard(num_masked: int, fraction: float) -> int:
    """int(n_mask * fraction), the reference's len_loss."""
    return int(num_masked * fraction)


def ema_decay(step: int, start: float, end: float, ramp_steps: int) -> float:
    """EMA teacher decay after optimizer step `step` (0-based)."""
    return start + min(step / ramp_steps, 1.0) * (end - start)


def select_visible(pred_loss: torch.Tensor | None, uniforms: torch.Tensor, n_keep: int, n_hard: int) -> torch.Tensor:
    """[B, n_keep] visible patch indices (sorted): the n_hard patches of highest
    `pred_loss` ([B, L]) are masked, the visible ones are the n_keep lowest `uniforms`
    ([B, L] in [0, 1), keyed per sample) among the others (ties in pred_loss: the higher
    index counts as harder, a stable sort). n_hard = 0: random masking, `pred_loss` unused."""
    scores = uniforms.clone()
    if n_hard > 0:
        hard = torch.argsort(pred_loss, dim=1, stable=True)[:, pred_loss.shape[1] - n_hard:]
        scores.scatter_(1, hard, 2.0)  # above every uniform: never kept
    return visible_from_scores(scores, n_keep)


def masked_values(values: torch.Tensor, mask: torch.Tensor, n_masked: int) -> torch.Tensor:
    """[B, n_masked]: each row's values at its masked positions (mask 1.0), patch order."""
    ids = torch.argsort(mask, dim=1, stable=True)[:, mask.shape[1] - n_masked:].sort(dim=1).values
    return torch.gather(values, 1, ids)


def _pairs(pred: torch.Tensor, target: torch.Tensor):
    pos = target[:, None, :] > target[:, :, None]  # [B, i, j]: t_j > t_i
    neg = target[:, None, :] < target[:, :, None]
    diff = pred[:, None, :] - pred[:, :, None]  # p_j - p_i
    return pos, neg, diff


def ranking_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] per-sample relative loss of predicted vs actual per-patch losses ([B, M] each;
    `target` is not differentiated)."""
    pos, neg, diff = _pairs(pred.float(), target.detach().float())
    s = torch.sigmoid(diff)
    loss = -pos.float() * torch.log(s + 1e-6) - neg.float() * torch.log(1 - s + 1e-6)
    return loss.sum(dim=(1, 2)) / (pos | neg).sum(dim=(1, 2)).clamp(min=1)


def ranking_counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] pairs ordered correctly, [B] untied pairs): the predictor's ranking accuracy
    is their ratio (0.5 = chance). A pair with equal predictions counts as wrong."""
    pos, neg, diff = _pairs(pred.detach(), target.detach())
    correct = (pos & (diff > 0)) | (neg & (diff < 0))
    return correct.sum(dim=(1, 2)), (pos | neg).sum(dim=(1, 2))
