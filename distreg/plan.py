"""`distreg plan` / `distreg train --dry-run`: the model and its per-rank memory under
the configured sharding, computed from a model built on the meta device (no weights
are allocated, so the 7B plan runs on a laptop).

Per-rank bytes, for the rank holding the most (shards can be uneven):
  params      the optimizer's master copy (fp32)       DDP/ZeRO-1/2: whole; FSDP2/ZeRO-3: shard
  grads       reduced gradients (fp32)                 DDP/ZeRO-1: whole; ZeRO-2/3, FSDP2: shard
  optimizer   AdamW moments, 2 x fp32 (SGD+momentum 1) DDP: whole; ZeRO-1/2/3, FSDP2: shard
  gathered    FSDP2/ZeRO-3 only, unsharded parameters in param_dtype at the peak:
              FSDP2: the root's own parameters (embedding, output, final norm: the root
              is not resharded after forward, they stay gathered through backward) plus
              two blocks (the one computing and the one FSDP2 prefetches);
              ZeRO-3: the small persistent parameters (each < DeepSpeed's
              stage3_param_persistence_threshold, gathered for good) plus the largest
              block and the prefetch bucket (stage3_prefetch_bucket_size), at most
              stage3_max_live_parameters
  grad buffers  unsharded gradients before their reduction:
              FSDP2: one block's gradients in param_dtype (+ the reduce_dtype copy
              reduce-scatter sends when the two differ);
              DeepSpeed: the contiguous reduce bucket, reduce_bucket_size elements
              (two with overlap_comm, DeepSpeed's default under ZeRO-3)
DeepSpeed's bucket sizes are its defaults (distreg does not override them).
Activations are not included (they depend on micro-batch size and checkpointing).
"""
from __future__ import annotations

import math

import torch

from distreg.config import RunConfig
from distreg.hooks.registry import build_hooks
from distreg.models import build_model, transformer_blocks

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# DeepSpeed ZeRO defaults (deepspeed.runtime.zero.config.DeepSpeedZeroConfig), in elements.
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_MAX_LIVE = 1_000_000_000
DS_PERSISTENCE_THRESHOLD = 100_000


def _shard_numel(shape: torch.Size, world: int, rank: int, how: str) -> int:
    n = shape.numel()
    if how == "whole":
        return n
    if how == "rows":  # FSDP2 Shard(0): torch.chunk over dim 0
        rows = shape[0] if len(shape) else 1
        chunk = math.ceil(rows / world)
        mine = max(0, min(chunk, rows - rank * chunk))
        return mine * (n // max(rows, 1))
    part = math.ceil(n / world)  # ZeRO: flat partition (the last rank's is padded)
    return part


def plan(cfg: RunConfig, world_size: int | None = None) -> dict:
    world = world_size or cfg.scaling.num_workers
    model = build_model(cfg.model, cfg.train.seed, device="meta")
    s = cfg.strategy
    sharded_params = s.name == "fsdp2" or (s.name == "deepspeed" and s.zero_stage == 3)
    how = "rows" if s.name == "fsdp2" else "flat"
    param_how = how if sharded_params else "whole"
    grad_how = how if (s.name == "fsdp2" or (s.name == "deepspeed" and s.zero_stage >= 2)) else "whole"
    opt_how = "whole" if s.name == "ddp" else how
    moments = 2 if cfg.optim.name == "adamw" else (1 if cfg.optim.momentum else 0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    per_rank = []
    for rank in range(world):
        p = sum(_shard_numel(t.shape, world, rank, param_how) for t in trainable)
        g = sum(_shard_numel(t.shape, world, rank, grad_how) for t in trainable)
        o = sum(_shard_numel(t.shape, world, rank, opt_how) for t in trainable)
        per_rank.append((p, g, o))
    p, g, o = max(per_rank, key=lambda x: sum(x))
    gathered, grad_buffers = _transient_bytes(model, s)
    from distreg.plan_hooks import hook_memory

    hook_rows = hook_memory(cfg, build_hooks(cfg.hooks), model, world,
                            lambda shape: max(_shard_numel(shape, world, r, param_how) for r in range(min(world, 2))))
    hook_bytes = {h["name"]: h["bytes"] for h in hook_rows}
    total = sum(t.numel() for t in model.parameters())
    return {
        "world_size": world, "strategy": s.name if s.name != "deepspeed" else f"deepspeed ZeRO-{s.zero_stage}",
        "params": total, "trainable": sum(t.numel() for t in trainable),
        "hooks": hook_rows,
        "bytes": {"params": 4 * p, "grads": 4 * g, "optimizer": 4 * moments * o, "gathered": gathered, "grad buffers": grad_buffers, **{f"hook:{k}": v for k, v in hook_bytes.items()}},
    }


def _transient_bytes(model, s) -> tuple[int, int]:
    """(gathered, grad buffers) bytes at the peak of a step, per rank (module docstring)."""
    from distreg.models.moe import expert_parameters

    param_bytes = _BYTES[s.mixed_precision.param_dtype]
    # MoE experts stay expert-parallel (each rank computes with its own experts):
    # they are never part of an all-gathered block or its gradient reduction.
    experts = {id(t) for t in expert_parameters(model)}
    blocks = transformer_blocks(model) or [model]
    in_blocks = {id(t) for b in blocks for t in b.parameters()}
    block = max(sum(t.numel() for t in b.parameters() if id(t) not in experts) for b in blocks)
    root_own = sum(t.numel() for t in model.parameters() if id(t) not in in_blocks and id(t) not in experts)
    if s.name == "fsdp2":
        mp = s.mixed_precision
        grads = block * (param_bytes + (_BYTES[mp.reduce_dtype] if mp.reduce_dtype != mp.param_dtype else 0))
        if len(blocks) == 1 and blocks[0] is model:  # no blocks: the model is one FSDP unit
            return block * param_bytes, grads
        return (root_own + 2 * block) * param_bytes, grads
    if s.name != "deepspeed":
        return 0, 0
    if s.zero_stage < 3:
        # ZeRO-1 stages fp32 accumulators under bf16/fp16; ZeRO-2 keeps param_dtype.
        bucket_bytes = 4 if s.zero_stage == 1 else param_bytes
        return 0, DS_REDUCE_BUCKET * bucket_bytes
    def partitioned(module) -> int:  # the tensors ZeRO-3 gathers and frees again
        return sum(t.numel() for t in module.parameters() if id(t) not in experts and t.numel() >= DS_PERSISTENCE_THRESHOLD)

    persistent = sum(t.numel() for t in model.parameters() if id(t) not in experts) - partitioned(model)
    live = min(max(partitioned(b) for b in blocks) + DS_PREFETCH_BUCKET, DS_MAX_LIVE, partitioned(model))
    return (persistent + live) * param_bytes, 2 * DS_REDUCE_BUCKET * param_bytes


def format_plan(info: dict) -> str:
    gib = 2**30
    lines = [f"model: {info['params'] / 1e9:.3f}B parameters ({info['trainable'] / 1e9:.3f}B trainable)",
             f"sharding: {info['strategy']} over {info['world_size']} ranks",
             "per-rank memory (largest rank, activations excluded):"]
    width = max(12, *(len(k) for k in info["bytes"]))
    for key, value in info["bytes"].items():
        lines.append(f"  {key:<{width}} {value / gib:8.2f} GiB")
    lines.append(f"  {'total':<{width}} {sum(info['bytes'].values()) / gib:8.2f} GiB")
    if info.get("hooks"):
        lines.append("hooks (per-rank memory, included above):")
        for h in info["hooks"]:
            lines.append(f"  {h['name']:<20} {h['bytes'] / 2**20:10.2f} MiB  {h['what']}")
    return "\n".join(lines)
