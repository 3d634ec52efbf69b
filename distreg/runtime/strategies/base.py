"""The Strategy interface: how a model is wrapped, stepped, sharded and checkpointed.

The Trainer calls only these methods, so one loop serves DDP, FSDP2 and DeepSpeed.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import nn

from distreg.config import RunConfig
from distreg.hooks.base import ParamShard
from distreg.runtime.comm import Comm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Strategy(ABC):
    name: str
    sharded: bool  # parameters split across ranks (hooks must all-reduce partial sums)

    def __init__(self, cfg: RunConfig, comm: Comm, device: torch.device):
        self.cfg, self.comm, self.device = cfg, comm, device
        self.module: nn.Module  # the user's model (unwrapped; its params may be shards)
        self.model: nn.Module  # what the forward is called on

    def create_model(self, build: Callable[..., nn.Module], lazy: bool) -> nn.Module:
        """Build the model (`build(device, init)`); `lazy` builds it without weights where
        the strategy can shard first and initialise after (`materialize`)."""
        return build("cpu", True)

    @abstractmethod
    def setup(self, model: nn.Module) -> None:
        """Wrap/shard `model`, build the optimizer and lr schedule."""

    def accumulation_context(self, last_micro: bool):
        """Context for one micro-batch's forward+backward: skip the gradient reduction
        on all but the last micro-batch of the step, where the strategy allows it."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        """Accumulate the gradient of `loss` (already in global-mean units; the
        strategy's own averaging over ranks is accounted for by the caller)."""

    @abstractmethod
    def step(self) -> torch.Tensor:
        """Clip (train.grad_clip), optimizer step, lr schedule step, zero grads.
        Returns the global gradient norm before clipping (a 0-dim tensor, not read back)."""

    @abstractmethod
    def local_shards(self) -> list[ParamShard]: ...

    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def save(self, path: str) -> None:
        """Collective: write model + optimizer + scheduler state under `path`."""

    @abstractmethod
    def load(self, path: str) -> None: ...
