"""Per-sample losses and the global reduction weights of one optimizer step.

The step loss is a weighted sum over *all* samples of the step (all ranks, all
micro-batches) with weights fixed before the first forward: for token reduction
w_i = n_i / N, for sample reduction w_i = 1 / S (n_i = valid tokens of sample i, N and S
summed over the whole step by one all-reduce). A sample's weight therefore never
depends on which rank or micro-batch it landed on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distreg.runtime.comm import Comm

IGNORE_INDEX = -100


def per_sample_lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of each sequence ([batch]); ignored tokens excluded."""
    tok = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    valid = (target != IGNORE_INDEX).sum(1)
    return tok.view(target.shape).sum(1) / valid.clamp(min=1)


def step_denominator(micro_batches: list[dict], reduction: str, comm: Comm) -> float:
    """Global count of valid tokens (or of non-empty samples) over the whole step."""
    local = 0
    for b in micro_batches:
        valid = (b["target"] != IGNORE_INDEX).sum(1)
        local += int(valid.sum()) if reduction == "token" else int((valid > 0).sum())
    total = comm.all_reduce(torch.tensor([local], dtype=torch.float64))
    return float(total.item())


def reduction_weights(target: torch.Tensor, reduction: str, denominator: float) -> torch.Tensor:
    valid = (target != IGNORE_INDEX).sum(1).float()
    w = valid if reduction == "token" else (valid > 0).float()
    return w / denominator
