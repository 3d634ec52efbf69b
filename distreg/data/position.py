"""The world-size-independent data position shared by every data source.

Why this exists: a checkpoint written by a job on N ranks must resume on M ranks (and
with any number of dataloader workers) and see exactly the samples the uninterrupted
job would have seen. So the position is global, never per rank or per worker:
(epoch, samples of the epoch consumed, seed). From it every rank derives the same
global batch of the next step and takes its own fixed slice of it.

The rules are the ones of `tokens.TokenBatches` (same permutation seeding, same tail
drop, same micro-batch slicing), written once here for the other sources.
"""
from __future__ import annotations

import torch


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of one epoch; identical on every rank and worker."""
    if not shuffle:
        return torch.arange(num_samples)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g)


def step_start(epoch: int, consumed: int, global_batch: int, num_samples: int) -> tuple[int, int]:
    """Where the next step's global batch starts. An epoch ends when fewer than a full
    global batch remains: that tail is dropped, identically for every world size."""
    if consumed + global_batch > num_samples:
        return epoch + 1, 0
    return epoch, consumed


def rank_slices(step_items: torch.Tensor, grad_accum: int, rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's micro-batches of one global batch: micro-batch m of rank r is the
    slice [m*W*b + r*b, m*W*b + (r+1)*b) (b = per-rank micro-batch size)."""
    micro = len(step_items) // (grad_accum * world_size)
    out = []
    for m in range(grad_accum):
        lo = m * world_size * micro + rank * micro
        out.append(step_items[lo : lo + micro])
    return out


class EpochStream:
    """A rank-independent walk through the epochs of one dataset: `take(k)` returns the
    next k sample indices, crossing into the next epoch (with its own permutation) when
    this one runs out. Used by sources that draw a variable number of samples per step
    (a mixture's components), where no tail is dropped."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.epoch, self.consumed = 0, 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            self._perm = epoch_permutation(self.num_samples, self.seed, self.epoch, self.shuffle)
            self._perm_epoch = self.epoch
        return self._perm

    def take(self, k: int) -> torch.Tensor:
        parts = []
        while k > 0:
            if self.consumed == self.num_samples:
                self.epoch, self.consumed = self.epoch + 1, 0
            n = min(k, self.num_samples - self.consumed)
            parts.append(self._permutation()[self.consumed : self.consumed + n])
            self.consumed += n
            k -= n
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
