"""`group_envelope`: WGSEF proximal step after each optimizer step (spec regularizers.md
section 8; Refael, Arbel, Huleihel, arXiv:2212.12921).

Per participating layer weight W (as a matrix [out, in*k*k]) the elements are split into
groups: `rows` (output units / filters), `cols` (input channels) or `elements`
(unstructured), with weights d_i = 1 (`group_weights: one`) or the group size (`size`).
After the optimizer step (whose result stands for θ - η∇L), with η the learning rate of
that step (`lr` overrides it) and α = η λ (× `every` when it runs every N-th step):

    objective dc_gap (default):  θ <- prox_{α S_k}(θ_step + α D θ_old)
    objective envelope:          θ <- prox_{α S_k}(θ_step)

`dc_gap` is proximal gradient on L + λ (S_k(θ) - ½ Σ_i d_i ||θ_{G_i}||²) with the concave
part linearised at the pre-step weights θ_old (our reading; nonnegative, zero exactly when
at most k groups are nonzero); `envelope` is proximal gradient on L + λ S_k. Which of the
two the paper trains, the role of d_i, its λ / k values and its linear-time prox are
[UNVERIFIED] (spec open item 2, still open). Under Adam, η is the scheduled lr, not Adam's
per-coordinate step. k (groups kept per layer) is `k`, or `k_fraction` of the layer's groups.

Distributed (spec P3): per layer one all-reduce of the partial group sq-norms
(`distreg.regularizers.wgsef_prox`), every rank solves the same scalar problem and scales
its own elements; the result is written to the optimizer's copy (and the forward copy)
through `ParamShard.write`. dc_gap keeps a copy of the participating local shards from
`after_backward` to the step (memory: one local copy of those weights).

Order: ... -> clipping -> optimizer step -> `after_step`: prox -> metrics (one all-reduce
of all layers' group norms). Metrics: `zero_group_fraction` (groups exactly zero, over all
layers), `nonzero_groups_mean` (per layer), `gap` (Σ_layers S_k - ½ Σ d ||θ_G||², the DC
penalty without λ, 0 when k-sparse), `penalty` (λ gap), `eta`.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from distreg.hooks.base import HookContext, ParamShard
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import F64, matrix_shape
from distreg.hooks.regularizers.penalties import _ParamPenalty
from distreg.hooks.regularizers._common import SelectParams
from distreg.regularizers import group_sq_norms, sparse_envelope_gap, wgsef_prox


@register
class GroupEnvelope(_ParamPenalty):
    name = "group_envelope"
    writes_gradients = False  # a proximal step on the weights; gradients untouched

    class Params(SelectParams):
        lam: float = Field(gt=0, description="lambda (no verified default)")
        k: int | None = Field(None, gt=0, description="groups kept per layer")
        k_fraction: float | None = Field(None, gt=0, le=1, description="or: fraction of each layer's groups kept")
        groups: Literal["rows", "cols", "elements"] = "rows"
        group_weights: Literal["one", "size"] = "one"
        objective: Literal["dc_gap", "envelope"] = "dc_gap"
        lr: float | None = Field(None, gt=0, description="η of the prox (default: the step's learning rate)")
        include_io: bool = Field(False, description="also the embedding tables and the output head (left out by "
                                                    "default)")
        every: int = Field(1, gt=0, description="apply after every `every`-th step, with alpha = eta * lam * every "
                                                "(the prox of N steps' worth of penalty: the same mean force)")

        @model_validator(mode="after")
        def _one_k(self):
            if (self.k is None) == (self.k_fraction is None):
                raise ValueError("set exactly one of k and k_fraction")
            return self

    params: "GroupEnvelope.Params"

    def __init__(self, params):
        super().__init__(params)
        self.eta: float | None = None
        self._old: list[torch.Tensor] | None = None

    def on_train_start(self, ctx: HookContext) -> None:
        self.shards(ctx)  # no gradient writes: the prox edits weights

    def layout(self, shard: ParamShard) -> tuple[torch.Tensor, int, torch.Tensor | None, int]:
        """(local group ids, number of groups, d or None, k) of one weight."""
        n, d = matrix_shape(shard)
        device = shard.data().device
        e = torch.arange(shard.flat_start, shard.flat_start + shard.numel, device=device)
        ids, num, size = {"rows": (e // d, n, d), "cols": (e % d, d, n), "elements": (e, n * d, 1)}[self.params.groups]
        weights = None if self.params.group_weights == "one" else torch.full((num,), float(size), dtype=F64, device=device)
        k = self.params.k if self.params.k is not None else max(1, round(self.params.k_fraction * num))
        return ids, num, weights, k

    def due(self, step: int) -> bool:
        return step % self.params.every == 0

    def after_backward(self, ctx: HookContext) -> None:
        if not self.due(ctx.step + 1):
            return
        self.eta = self.params.lr if self.params.lr is not None else ctx.lr
        if self.eta is None:
            raise RuntimeError("group_envelope: no learning rate from the Trainer; set `lr`")
        if self.params.objective == "dc_gap":
            self._old = [s.data().detach().clone() for s in self.shards(ctx)]

    @torch.no_grad()
    def after_step(self, ctx: HookContext) -> None:
        if not self.due(ctx.step):
            return
        p = self.params
        alpha = self.eta * p.lam * p.every
        comm = ctx.comm if ctx.sharded else None
        shards = self.shards(ctx)
        partial, layouts = [], []
        for i, s in enumerate(shards):
            ids, num, d, k = self.layout(s)
            v = s.data().detach()
            if p.objective == "dc_gap":
                scale = torch.ones(num, dtype=F64, device=v.device) if d is None else d
                v = (v.to(F64) + alpha * scale[ids] * self._old[i].to(F64)).to(v.dtype)
            x, _ = wgsef_prox(v, ids, num, alpha, k, d, comm)
            s.write(x)
            partial.append(group_sq_norms(x, ids, num))  # local partial sums (no comm)
            layouts.append((num, d, k))
        self._old = None
        if not ctx.metrics_on():  # the statistics below are metrics only: logging steps
            return
        sq = ctx.sum_over_shards(torch.cat(partial)) if partial else torch.zeros(0, dtype=F64)
        gap, zeros, total, nonzero = 0.0, 0, 0, []
        for layer_sq, (num, d, k) in zip(torch.split(sq, [n for n, _, _ in layouts]), layouts):
            gap += float(sparse_envelope_gap(layer_sq, k, d))
            nz = int((layer_sq > 0).sum())
            zeros, total = zeros + num - nz, total + num
            nonzero.append(nz)
        self.values = {"zero_group_fraction": zeros / total, "nonzero_groups_mean": sum(nonzero) / len(nonzero),
                       "gap": gap, "penalty": p.lam * gap, "eta": self.eta}
