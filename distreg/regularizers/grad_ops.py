"""Gradient transforms and gradient-side monitors (spec regularizers.md section 2).

Order (P7): on already-reduced gradients, after unscaling and after parameter-regulariser
gradients, before clipping and the optimizer step.
"""
from __future__ import annotations

from typing import Sequence

import torch

from distreg.regularizers._dist import all_reduce_nograd
from distreg.runtime.comm import Comm


def orthograd(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scope: str = "tensor",
              renorm: bool = True, eps: float = 1e-30, comm: Comm | None = None) -> list[torch.Tensor]:
    """⊥Grad: g_perp = g - (<θ, g> / (<θ, θ> + eps)) θ, then (renorm) g_perp * ||g|| / (||g_perp|| + eps).

    Defaults follow the released `orthograd.py` [CODE]: `scope="tensor"` (each tensor on its own),
    `renorm=True`, eps = 1e-30. `scope="model"` uses one θ over all tensors [PAPER].
    Returns new gradient tensors (same shapes and dtypes); inputs are not modified.

    Sharded parameters (FSDP2 / ZeRO-3 local shards, spec P3): pass the local shards and `comm`
    over the shard group; the per-tensor dot products (fp32; fp64 for fp64 tensors) are
    all-reduced, so every rank scales its shard as the single-process update would. With `renorm` a second all-reduce
    completes ||g_perp||^2 from the projected shards (rather than from the first three sums,
    which loses all precision when g is nearly parallel to θ, the case ⊥Grad exists for).
    Pass `comm=None` when every rank holds whole tensors (DDP).
    """
    if scope not in ("tensor", "model"):
        raise ValueError(f"scope must be 'tensor' or 'model', got {scope!r}")
    if len(params) != len(grads):
        raise ValueError(f"{len(params)} params but {len(grads)} grads")

    def acc(t: torch.Tensor) -> torch.Tensor:  # fp32, or fp64 for fp64 tensors
        return t.detach().reshape(-1).to(torch.promote_types(t.dtype, torch.float32))

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.dot(acc(a), acc(b).to(acc(a).dtype))

    stats = torch.stack([torch.stack([dot(p, g), dot(p, p), dot(g, g)]).double() for p, g in zip(params, grads)])
    if scope == "model":
        stats = stats.sum(0, keepdim=True)
    stats = all_reduce_nograd(stats, comm)
    coef = stats[:, 0] / (stats[:, 1] + eps)
    idx = [0 if scope == "model" else i for i in range(len(params))]
    out = [acc(g) - (coef[j] * acc(p)).to(acc(g).dtype) for p, g, j in zip(params, grads, idx)]
    if renorm:
        perp_sq = torch.stack([dot(o, o).double() for o in out])
        if scope == "model":
            perp_sq = perp_sq.sum(0, keepdim=True)
        perp_sq = all_reduce_nograd(perp_sq, comm)
        scale = stats[:, 2].sqrt() / (perp_sq.sqrt() + eps)
        out = [o * scale[j].to(o.dtype) for o, j in zip(out, idx)]
    return [o.to(g.dtype).view_as(g) for o, g in zip(out, grads)]


def softmax_collapse_counts(logits: torch.Tensor, target: torch.Tensor, comm: Comm | None = None) -> torch.Tensor:
    """Softmax-Collapse counters [CODE logger], evaluated in the logits' own dtype (pass logits in
    the training softmax precision: fp16 / fp32 / fp64).

    Returns float64 [collapsed, zero_loss, samples] summed over ranks (one all-reduce with
    `comm`): `collapsed` counts samples whose sum_j exp(x_j - max x) evaluates to exactly 1;
    `zero_loss` those whose cross-entropy log(sum) - (x_y - max x), evaluated in that dtype,
    is exactly 0 (these give an exactly-zero gradient). Fractions: counts[:2] / counts[2].
    Whether a borderline row collapses depends on the summation order of the sum.
    """
    x = logits.detach().reshape(-1, logits.shape[-1])
    y = target.reshape(-1)
    shifted = x - x.max(-1, keepdim=True).values
    total = torch.exp(shifted).sum(-1)
    ce = torch.log(total) - shifted.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    counts = torch.stack([(total == 1).sum(), (ce == 0).sum(), torch.tensor(y.numel())]).to(torch.float64)
    return all_reduce_nograd(counts, comm)
