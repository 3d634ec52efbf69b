"""Per-sample losses and the global reduction weights of one optimizer step.

The step loss is a weighted sum over *all* samples of the step (all ranks, all
micro-batches) with weights fixed before the first forward: for token reduction
w_i = n_i / N, for sample reduction w_i = 1 / S (n_i = valid tokens of sample i, N and S
summed over the whole step by one all-reduce). A sample's weight therefore never
depends on which rank or micro-batch it landed on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distreg.runtime.comm import Comm

IGNORE_INDEX = -100


def per_sample_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each sample's loss ([batch]): the mean token cross-entropy of a sequence
    (target [batch, seq]) or the cross-entropy of a classification (target [batch]);
    ignored targets (IGNORE_INDEX) excluded. A masked-image-modeling output (a dict,
    models/mae.py) gives each sample's mean reconstruction loss over its masked patches."""
    if isinstance(logits, dict):
        from distreg.models.mae import per_sample_mim_loss

        return per_sample_mim_loss(logits)
    if target.ndim == 1:
        return F.cross_entropy(logits.float(), target, reduction="none", ignore_index=IGNORE_INDEX)
    tok = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    return tok.view(target.shape).sum(1) / valid_counts(target).clamp(min=1)


def valid_counts(target: torch.Tensor) -> torch.Tensor:
    """Valid (non-ignored) targets of each sample: tokens of a sequence, or 0/1."""
    valid = target != IGNORE_INDEX
    return valid.long() if target.ndim == 1 else valid.sum(1)


@dataclass
class StepCounts:
    """Global counts over one optimizer step (all ranks, all micro-batches)."""

    tokens: int  # valid targets (tokens for LM, samples for classification)
    samples: int  # samples with at least one valid target

    def denominator(self, reduction: str) -> float:
        return float(self.tokens if reduction == "token" else self.samples)


def local_counts(micro_batches: list[dict]) -> torch.Tensor:
    """This rank's [valid targets, samples with one] of the step (float64, on the
    batches' device; no host read)."""
    parts = []
    for b in micro_batches:
        n = valid_counts(b["target"])
        parts.append(torch.stack([n.sum(), (n > 0).sum()]))
    return torch.stack(parts).sum(0).double()


def known_counts(data, global_batch: int, seq_len: int | None) -> tuple[int, int] | None:
    """Global (tokens, samples) of every step when the data guarantees them, without a
    collective: packed token windows (`data.full_windows`) hold seq_len valid targets
    per sample, every sample of the global batch. None otherwise."""
    if getattr(data, "full_windows", False) and seq_len:
        return global_batch * seq_len, global_batch
    return None


def step_counts(micro_batches: list[dict], comm: Comm) -> StepCounts:
    """One all-reduce and one host read, before the first forward of the step (the
    Trainer itself keeps the reduced counts on the device instead)."""
    tokens, samples = comm.all_reduce(local_counts(micro_batches)).tolist()
    return StepCounts(int(tokens), int(samples))


def reduction_weights(target: torch.Tensor, reduction: str, denominator: float | torch.Tensor) -> torch.Tensor:
    n = valid_counts(target).float()
    return (n if reduction == "token" else (n > 0).float()) / denominator
