"""The loss that adversarial hooks maximise in their inner step (hooks/base.py, `adversarial`).

`loss_fn(batch)` runs the forward on the strategy's *unwrapped* module (`strategy.module`:
DDP's reducer is bypassed, so a backward that forms no parameter gradient leaves it in no
half-finished state; FSDP2's fully-sharded module and ZeRO-3's engine module gather their
weights through their own module hooks) inside the strategy's non-final accumulation
context (compute dtype; FSDP2 gradient sync off), and returns this micro-batch's share of
the global mean task loss, in the same units as the real step's `sample_part`.
"""
from __future__ import annotations

from typing import Callable

import torch

from distreg.runtime.loss import per_sample_loss, reduction_weights


def inner_loss_fn(strategy, loss_reduction: str, denom) -> Callable[[dict], torch.Tensor]:
    def loss_fn(batch: dict) -> torch.Tensor:
        with strategy.accumulation_context(False):
            out = strategy.module(batch["input"], *([batch["visible"]] if "visible" in batch else []))  # mae: masks
            weights = reduction_weights(batch["target"], loss_reduction, denom)
            return (weights * per_sample_loss(out, batch["target"])).sum()

    return loss_fn
