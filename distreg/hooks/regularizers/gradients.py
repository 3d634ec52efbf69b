"""`perp_grad`: ⊥Grad (Prieto et al. 2025, spec 2.2) as a gradient transform.

In `after_backward`, on the reduced local gradients: g <- g - (<θ, g> / (<θ, θ> + eps)) θ,
then (renorm, reference default) g <- g * ||g|| / ||g_perp||, per tensor (`scope: tensor`,
the released `orthograd.py`) or with one θ over all participating tensors (`scope:
model`, the paper's formula). θ is the optimizer's fp32 copy (master shards under
ZeRO-3). Sharded: one all-reduce of 3 floats per tensor (+ one for the renorm) via
`distreg.regularizers.orthograd`; DDP: none.

Order: after the penalty hooks listed before it (their gradients are projected too, spec
P7: param-regulariser gradients -> gradient transforms), before clipping (the reference
has no clipping) and the optimizer step (the wrapped optimizer's weight decay is not
projected: it acts inside the optimizer). Metrics (one extra 4-float all-reduce):
`cos_before` (model-level cosine between θ and the gradient before the projection),
`grad_norm_before`, `grad_norm_after`.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from distreg.hooks.base import HookContext
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import F64, SelectParams, ValuesHook, require_grad_writes, select_shards
from distreg.regularizers import orthograd


@register
class PerpGrad(ValuesHook):
    writes_gradients = True  # edits reduced gradients: refused with DeepSpeed fp16 (scaled grads)
    name = "perp_grad"

    class Params(SelectParams):
        scope: Literal["tensor", "model"] = "tensor"
        renorm: bool = True
        eps: float = Field(1e-30, ge=0)

    params: "PerpGrad.Params"

    def __init__(self, params):
        super().__init__(params)
        self.names: list[str] | None = None
        self.values: dict[str, float] = {}

    @property
    def prefix(self) -> str:
        return self.params.metrics_prefix or self.name

    def shards(self, ctx: HookContext):
        shards = select_shards(ctx, self.params.include, self.params.exclude, self.names, self.name)
        self.names = [s.name for s in shards]
        return shards

    def on_train_start(self, ctx: HookContext) -> None:
        require_grad_writes(self.shards(ctx), ctx, self.name)

    def after_backward(self, ctx: HookContext) -> None:
        p = self.params
        shards = [s for s in self.shards(ctx)]
        grads = [s.grad() for s in shards]
        if any(g is None for g in grads):
            missing = [s.name for s, g in zip(shards, grads) if g is None]
            raise RuntimeError(f"perp_grad: no gradient for {missing[:3]}")
        thetas = [s.data() for s in shards]
        new = orthograd(thetas, grads, p.scope, p.renorm, p.eps, ctx.comm if ctx.sharded else None)
        local = torch.zeros(4, dtype=F64, device=thetas[0].device if thetas else None)
        for t, g, n in zip(thetas, grads, new):
            t, g, n = t.detach().to(F64), g.detach().to(F64), n.detach().to(F64)
            local += torch.stack([torch.dot(t, g), torch.dot(t, t), torch.dot(g, g), torch.dot(n, n)])
        for s, n in zip(shards, new):
            s.write_grad(n)
        if not ctx.metrics_due:
            return  # statistics only: no reduction, no host read off logging steps
        tg, tt, gg, nn_ = ctx.sum_over_shards(local).tolist()
        self.values = {"cos_before": tg / max((tt * gg) ** 0.5, 1e-300), "grad_norm_before": gg ** 0.5,
                       "grad_norm_after": nn_ ** 0.5}

