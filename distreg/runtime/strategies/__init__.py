"""Strategy selection by `strategy.name`."""
from __future__ import annotations

import torch

from distreg.config import RunConfig
from distreg.runtime.comm import Comm
from distreg.runtime.strategies.base import Strategy


def build_strategy(cfg: RunConfig, comm: Comm, device: torch.device) -> Strategy:
    name = cfg.strategy.name
    if name == "ddp":
        from distreg.runtime.strategies.torch_native import DDPStrategy

        return DDPStrategy(cfg, comm, device)
    if name == "fsdp2":
        from distreg.runtime.strategies.torch_native import FSDP2Strategy

        return FSDP2Strategy(cfg, comm, device)
    from distreg.runtime.strategies.deepspeed_zero import DeepSpeedStrategy

    return DeepSpeedStrategy(cfg, comm, device)
