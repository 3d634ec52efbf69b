"""`param_norm`: the global L2 norm of all trainable parameters, from local shards.

Reads the copy the optimizer updates (DDP: the parameter; FSDP2: the local DTensor
shard; ZeRO-3: the fp32 master partition via `safe_get_local_fp32_param`). Each rank
sums the squares of its own elements; one scalar all-reduce completes the sum when the
parameters are sharded. Nothing is gathered.
"""
from __future__ import annotations

import torch
from pydantic import Field

from distreg.hooks.base import Hook, HookContext
from distreg.hooks.registry import register


@register
class ParamNorm(Hook):
    name = "param_norm"

    class Params(Hook.Params):
        every: int = Field(1, gt=0)

    def __init__(self, params: "ParamNorm.Params"):
        super().__init__(params)
        self._value: torch.Tensor | None = None  # on the device; read back in metrics()

    @staticmethod
    def compute(ctx: HookContext) -> float:
        return float(ParamNorm.norm(ctx))

    @staticmethod
    @torch.no_grad()
    def norm(ctx: HookContext) -> torch.Tensor:
        shards = ctx.local_shards()
        # The accumulator lives where the shards do (a CPU one cannot take CUDA values).
        sq = torch.zeros((), dtype=torch.float64, device=shards[0].data().device if shards else None)
        for shard in shards:
            sq += shard.data().double().pow(2).sum()
        return ctx.sum_over_shards(sq).sqrt()

    @property
    def value(self) -> float | None:
        return None if self._value is None else float(self._value)

    def on_train_start(self, ctx: HookContext) -> None:
        self._value = self.norm(ctx)

    def after_step(self, ctx: HookContext) -> None:
        if ctx.metrics_on(self.params.every):
            # Logging steps only (a collective when sharded); no host read: metrics() reads it.
            self._value = self.norm(ctx)

    def metrics(self) -> dict[str, float]:
        return {"hooks/param_norm": self.value} if self._value is not None else {}
