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

Distributed (spec P3): one all-reduce of every layer's partial group sq-norms together,
every rank solves the same scalar problem per layer (`distreg.regularizers.wgsef_scale`)
and scales its own elements; the result is written to the optimizer's copy (and the
forward copy) through `ParamShard.write`. Cost: `rows` / `cols` groups of whole-row
slices are reshapes (no per-element index tensors; ZeRO-3 slices that cut rows use cached
group ids); the squared norms are summed in the parameter dtype within a slice's row /
column and in float64 over ranks, the scalar problem is float64; `every` stays 1 by default
(~0.03 of a llama-small fsdp2 x2 step). dc_gap keeps a copy of the participating local shards from
`after_backward` to the step (memory: one local copy of those weights).

Order: ... -> clipping -> optimizer step -> `after_step`: prox -> on logging steps (every
due step when `every` > 1) metrics from the written weights (one all-reduce of all
layers' group norms). Metrics: `zero_group_fraction` (groups exactly zero, over all
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
from distreg.regularizers import sparse_envelope_gap, wgsef_scale


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
        self._layouts: dict[str, _Groups] = {}

    def on_train_start(self, ctx: HookContext) -> None:
        self.shards(ctx)  # no gradient writes: the prox edits weights

    def layout(self, shard: ParamShard) -> "_Groups":
        """How this rank's elements of one weight fall into its groups (cached: fixed by the sharding)."""
        got = self._layouts.get(shard.name)
        if got is None:
            got = self._layouts[shard.name] = _Groups(shard, self.params)
        return got

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
        shards = self.shards(ctx)
        layouts = [self.layout(s) for s in shards]
        inputs = []
        for i, (s, lay) in enumerate(zip(shards, layouts)):
            v = s.data().detach()
            if p.objective == "dc_gap":  # theta_step + alpha D theta_old (D: one weight per group)
                v = v + (alpha * lay.weight) * self._old[i]
            inputs.append(v)
        self._old = None
        # every layer's group sq-norms in one all-reduce (accumulated in the parameter dtype
        # within a group row / column, summed over ranks and solved in float64)
        sq = self._all_layers(ctx, [lay.partial_sq(v) for lay, v in zip(layouts, inputs)])
        for s, lay, v, layer_sq in zip(shards, layouts, inputs, torch.split(sq, [lay.num for lay in layouts])):
            scale, _ = wgsef_scale(layer_sq, alpha, lay.k, lay.d)
            s.write(lay.scale(v, scale.to(v.dtype)))
        if ctx.metrics_due or p.every > 1:
            self._metrics(ctx, shards, layouts)

    def _all_layers(self, ctx: HookContext, partial: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat(partial) if partial else torch.zeros(0, dtype=F64)
        return ctx.sum_over_shards(flat)

    def _metrics(self, ctx: HookContext, shards: list[ParamShard], layouts: list["_Groups"]) -> None:
        """From the written weights: one all-reduce of all layers' group norms."""
        sq = self._all_layers(ctx, [lay.partial_sq(s.data().detach()) for s, lay in zip(shards, layouts)])
        gap, zeros, total, nonzero = 0.0, 0, 0, []
        for layer_sq, lay in zip(torch.split(sq, [lay.num for lay in layouts]), layouts):
            gap += float(sparse_envelope_gap(layer_sq, lay.k, lay.d))
            nz = int((layer_sq > 0).sum())
            zeros, total = zeros + lay.num - nz, total + lay.num
            nonzero.append(nz)
        self.values = {"zero_group_fraction": zeros / total, "nonzero_groups_mean": sum(nonzero) / len(nonzero),
                       "gap": gap, "penalty": self.params.lam * gap, "eta": self.eta}


class _Groups:
    """The groups of one weight seen from this rank's slice: `rows` / `cols` of a slice of
    whole rows are a reshape (no index tensors); `elements`, or a ZeRO-3 slice that cuts
    rows, use per-element group ids. `d` (None: all ones), `weight` (the scalar d_i: groups
    of one weight have one size) and `k` as the prox needs them."""

    def __init__(self, shard: ParamShard, p: GroupEnvelope.Params):
        n, d = matrix_shape(shard)
        self.cols, self.start, self.numel = d, shard.flat_start, shard.numel
        self.num, size = {"rows": (n, d), "cols": (d, n), "elements": (n * d, 1)}[p.groups]
        self.weight = 1.0 if p.group_weights == "one" else float(size)
        device = shard.data().device
        self.d = None if p.group_weights == "one" else torch.full((self.num,), float(size), dtype=F64, device=device)
        self.k = p.k if p.k is not None else max(1, round(p.k_fraction * self.num))
        aligned = self.start % d == 0 and self.numel % d == 0
        self.mode = p.groups if aligned or p.groups == "elements" else "ids"
        self.ids = None
        if self.mode == "ids":
            e = torch.arange(self.start, self.start + self.numel, device=device)
            self.ids = e // d if p.groups == "rows" else e % d

    def partial_sq(self, v: torch.Tensor) -> torch.Tensor:
        """This rank's part of each group's squared norm, float64 [num]."""
        out = torch.zeros(self.num, dtype=F64, device=v.device)
        if not self.numel:
            return out
        sq = v * v
        if self.mode == "rows":
            lo = self.start // self.cols
            out[lo: lo + self.numel // self.cols] = sq.view(-1, self.cols).sum(1)
        elif self.mode == "cols":
            out += sq.view(-1, self.cols).sum(0)
        elif self.mode == "elements":
            out[self.start: self.start + self.numel] = sq
        else:
            out.index_add_(0, self.ids, sq.to(F64))
        return out

    def scale(self, v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """v with each group's elements times its factor ([num], v's dtype)."""
        if not self.numel:
            return v
        if self.mode == "rows":
            lo = self.start // self.cols
            return (v.view(-1, self.cols) * factor[lo: lo + self.numel // self.cols, None]).reshape(-1)
        if self.mode == "cols":
            return (v.view(-1, self.cols) * factor[None, :]).reshape(-1)
        if self.mode == "elements":
            return v * factor[self.start: self.start + self.numel]
        return v * factor[self.ids]
