"""Shared machinery of the regularizer hooks: participant selection, the route by which a
whole-matrix term reaches a sharded weight, gradient additions, coefficient schedules.

Routes for a matrix term (orthogonality, nuclear norm, TRP), decided once per matrix at
train start and identical on every rank:

- ``local``: every rank holds the whole tensor (DDP, ZeRO-1/2); computed with no
  communication (each rank redundantly, on identical replicas).
- ``gram``: every rank holds a block of whole rows (FSDP2 ``Shard(0)``, or a ZeRO-3 flat
  partition that happens to fall on row boundaries on every rank); the core's Gram
  all-reduce form is used (one [D, D] float64 all-reduce per matrix, D = columns).
- ``gather``: otherwise (a ZeRO-3 partition that cuts rows), or when the [N, D] matrix is
  smaller than its [D, D] Gram (N < D), or forced by config: the matrix's local slices are
  all-gathered (the matrix penalties: all such matrices in one all-gather, `_matrices`), so
  each rank briefly holds those full matrices (never the model); hooks needing an
  eigendecomposition / SVD compute it on one owner rank (round-robin) and share the result.

Gradient additions go through ``ParamShard.write_grad`` (the reduced local gradient: a
view under DDP / FSDP2, DeepSpeed's fp32 gradient partition under ZeRO-3, where
``grad()`` is a copy in bf16 and edits of it would not stick). They are made in
``after_backward``, i.e. on already-reduced gradients, and are never averaged over ranks
again; clipping follows, so they are clipped together with the loss gradient. Not
supported: DeepSpeed fp16 (its gradients are still loss-scaled in `after_backward`, the
additions are not) and ZeRO-1/2 (no `write_grad`; refused at train start).
"""
from __future__ import annotations

from contextlib import contextmanager

import math
from fnmatch import fnmatchcase

import torch
from pydantic import Field
from torch import nn

from distreg.hooks.base import Hook, HookContext, ParamShard

F64 = torch.float64


class ValuesHook(Hook):
    """A hook whose metrics are its last `values` under `prefix`; the values go into the
    checkpoint so a resumed run logs the same numbers until the hook computes new ones."""

    values: dict[str, float]
    prefix: str

    def metrics(self) -> dict[str, float]:
        # Values may be 0-dim device tensors: read back here, on logging steps only.
        return {f"{self.prefix}/{k}": float(v) for k, v in self.values.items()}

    def state_dict(self) -> dict:
        return {"values": {k: float(v) for k, v in self.values.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.values = dict(state.get("values", {}))


class StatHook(ValuesHook):
    """Per-step sums accumulated over micro-batches, all-reduced once per step (data
    statistics of loss hooks: always over all ranks). Metrics only: subclasses accumulate
    and reduce on `ctx.metrics_on(...)` steps (logging steps) and skip both elsewhere, so
    a non-logging step pays neither the collective nor the host read."""

    class Params(Hook.Params):
        metrics_prefix: str | None = Field(None, description="metric name prefix (default: the hook name)")

    def __init__(self, params):
        super().__init__(params)
        self.values: dict[str, float] = {}
        self._acc: torch.Tensor | None = None

    @property
    def prefix(self) -> str:
        return self.params.metrics_prefix or self.name

    def accumulate(self, local: torch.Tensor) -> None:
        # Stays on the device: a .cpu() here would be a host sync every micro-batch.
        local = local.detach().to(F64)
        self._acc = local if self._acc is None else self._acc + local

    def reduced(self, ctx: HookContext, size: int) -> torch.Tensor:
        acc = self._acc if self._acc is not None else torch.zeros(size, dtype=F64)
        self._acc = None
        return ctx.comm.all_reduce(acc.clone())


def valid_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets with ignored positions set to 0, the valid mask)."""
    from distreg.runtime.loss import IGNORE_INDEX

    target = batch["target"]
    valid = target != IGNORE_INDEX
    return torch.where(valid, target, torch.zeros_like(target)), valid


class SelectParams(Hook.Params):
    include: list[str] = Field(["*"], description="fnmatch patterns of parameter names that take part")
    exclude: list[str] = Field([], description="fnmatch patterns of parameter names left alone")
    metrics_prefix: str | None = Field(None, description="metric name prefix (default: the hook name)")


def layer_weight_names(model: nn.Module) -> list[str]:
    """Names of the `weight` of every nn.Linear / nn.Conv{1,2,3}d, in module order."""
    out = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(mod.weight, nn.Parameter):
            out.append(f"{mod_name}.weight" if mod_name else "weight")
    return out


# Top-level modules that are a model's output head (llama `output`, HF `lm_head`,
# torchvision `fc` / `classifier` / `head`): left out of the matrix penalties by default.
OUTPUT_HEADS = ("output", "lm_head", "fc", "classifier", "head")


def io_weight_names(model: nn.Module) -> set[str]:
    """Weights of the embedding tables and the output head: the vocabulary-sized matrices
    that dominate a Gram/SVD penalty's cost (a 32000 x 512 head costs more than all
    blocks of a small Llama together) and that the methods' papers do not constrain.
    Output head = a top-level Linear named in OUTPUT_HEADS, or any Linear shaped like an
    embedding table (a tied or untied LM head)."""
    def full_shape(p: torch.Tensor) -> tuple[int, ...]:  # ZeRO-3 partitions keep it in ds_shape
        return tuple(getattr(p, "ds_shape", p.shape))

    out, tables = set(), set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            out.add(f"{name}.weight")
            tables.add(full_shape(mod.weight))
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (name in OUTPUT_HEADS or full_shape(mod.weight) in tables):
            out.add(f"{name}.weight")
    return out


class EveryParams(Hook.Params):
    """`every` for a penalty whose cost is per application, not per step (a hook sets its
    own documented default in `default_every`)."""

    every: int = Field(1, gt=0, description="apply on steps s with s % every == 0, gradient x every (the same "
                                            "mean force per step as every step)")


def every_field(default: int, why: str):
    """`every` with a hook's own default and the reason for it in the description."""
    return Field(default, gt=0, description=f"apply on steps s with s % every == 0, gradient x every (the same mean "
                                            f"force per step as every step); default {default}: {why}")


def select_shards(ctx: HookContext, include: list[str], exclude: list[str], candidates: list[str] | None,
                  hook: str) -> list[ParamShard]:
    """This rank's shards of the participating parameters, in model order (the same list on
    every rank). `candidates=None`: every trainable parameter."""
    allowed = None if candidates is None else set(candidates)
    out = [s for s in ctx.local_shards()
           if (allowed is None or s.name in allowed)
           and any(fnmatchcase(s.name, p) for p in include) and not any(fnmatchcase(s.name, p) for p in exclude)]
    if not out:
        raise ValueError(f"{hook}: no parameter matches include={include} exclude={exclude}")
    return out


def require_grad_writes(shards: list[ParamShard], ctx: HookContext, hook: str) -> None:
    if any(s._write_grad is None for s in shards):
        raise RuntimeError(f"{hook}: strategy {ctx.strategy!r} does not support gradient writes "
                           "(ParamShard.write_grad); use ddp, fsdp2 or deepspeed ZeRO-3")


def add_to_grad(shard: ParamShard, delta: torch.Tensor) -> None:
    """grad += delta on this rank's local elements (reduced gradient, after_backward only)."""
    g = shard.grad()
    if g is None:
        raise RuntimeError(f"{shard.name}: no gradient to add a penalty gradient to (unused parameter?)")
    shard.write_grad(g.detach() + delta.reshape(-1).to(g.dtype))


def matrix_shape(shard: ParamShard) -> tuple[int, int]:
    shape = tuple(shard.full_shape)
    return shape[0], math.prod(shape[1:])


def plan_routes(ctx: HookContext, shards: list[ParamShard], route: str = "auto") -> list[str]:
    """'local' | 'gram' | 'gather' per matrix (collective when sharded: one all-reduce of
    one flag per matrix)."""
    if route not in ("auto", "gram", "gather"):
        raise ValueError(f"route must be 'auto', 'gram' or 'gather', got {route!r}")
    if not ctx.sharded or all(s.replicated for s in shards):
        return ["local"] * len(shards)
    aligned = []
    for s in shards:
        _, d = matrix_shape(s)
        aligned.append(1.0 if s.numel == 0 or (s.flat_start % d == 0 and s.numel % d == 0) else 0.0)
    flags = ctx.comm.all_reduce(torch.tensor(aligned, dtype=F64), op="min").tolist()
    out = []
    for s, ok in zip(shards, flags):
        n, d = matrix_shape(s)
        gram = ok == 1.0 and (route == "gram" or (route == "auto" and d <= n))
        out.append("gram" if gram else "gather")
    return out


def local_rows(shard: ParamShard) -> torch.Tensor:
    """This rank's block of whole rows [n_r, D] (route 'gram' only), float64 copy."""
    _, d = matrix_shape(shard)
    return shard.data().detach().to(F64).reshape(-1, d)


def gather_full(ctx: HookContext, shard: ParamShard) -> torch.Tensor:
    """The full matrix [N, D] in float64 from every rank's slice (collective; route 'gather').
    Relies on the ParamShard contract: ranks hold contiguous ranges in rank order."""
    pieces = ctx.comm.all_gather_uneven(shard.data().detach().to(F64).reshape(-1))
    flat = torch.cat(pieces)
    n, d = matrix_shape(shard)
    if flat.numel() != n * d:
        raise RuntimeError(f"{shard.name}: gathered {flat.numel()} elements, expected {n * d}")
    return flat.view(n, d)


def local_slice(shard: ParamShard, full: torch.Tensor) -> torch.Tensor:
    """This rank's elements of a full-size tensor (flat)."""
    return full.reshape(-1)[shard.flat_start: shard.flat_start + shard.numel]


def schedule_factor(milestones: dict[int, float], step: int) -> float:
    """Piecewise-constant factor: the value of the largest milestone <= step (1 before the
    first one). SRIP-style decays: {0: 1, 20000: 1e-3, 50000: 1e-4}."""
    factor = 1.0
    for at in sorted(milestones):
        if step >= at:
            factor = milestones[at]
    return factor


def release_gathered(model: nn.Module) -> None:
    """After a forward that no backward follows (a monitor's probe forward), FSDP2 leaves
    the root module's parameters unsharded: later writes to the local shards would not
    reach the next forward, and `local_shards()` would see plain tensors. Reshard every
    module that offers FSDP2's `reshard()` (duck-typed: a no-op under DDP and ZeRO-3, whose
    probe forwards release or re-gather their partitions themselves)."""
    for mod in model.modules():
        reshard = getattr(mod, "reshard", None)
        if callable(reshard):
            reshard()


@contextmanager
def buffers_unchanged(model: nn.Module):
    """Around a metric's extra forward in training mode: BatchNorm (and Dice) running
    statistics are put back afterwards, so a report never changes training."""
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)


def scalars(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def per_sample_mean(tok: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's valid tokens ([B, T] -> [B]); 1-D (classification) as is.
    The Trainer's per-sample loss convention (`runtime.loss.per_sample_loss`)."""
    tok = torch.where(valid, tok, torch.zeros_like(tok))
    if tok.dim() == 1:
        return tok
    return tok.sum(1) / valid.sum(1).clamp(min=1).to(tok.dtype)
