"""Optimizer and learning-rate schedule from config (identical for every strategy)."""
from __future__ import annotations

import math

import torch
from torch import nn

from distreg.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and other vectors are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # CPU: foreach=False, the per-tensor loop gives bitwise-identical updates whether the
    # parameters are whole tensors, DTensor shards or ZeRO partitions (rank invariance).
    # CUDA: the fused kernel (one launch for all parameters), as torchtitan uses.
    on_cuda = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
    if on_cuda:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier of the base lr at optimizer step `s` (0-based): linear warmup, then
    constant or cosine decay to `min_lr_ratio`."""

    def f(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))
