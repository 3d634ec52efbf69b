"""`moe_metrics`: routing statistics of the MoE layers (distreg.models.moe).

Each MoE layer all-reduces its routing statistics inside its forward (one float64
vector per layer and micro-batch: per-expert top-k choices, dispatched slots, router
probability sums, token and drop counts, entropy and z sums), so every rank holds the
same global numbers and this hook reads them without any collective. After each
optimizer step it turns the step's sums into metrics and resets them:

  moe/load/e{j}          fraction of the dispatched (token, expert) slots that went to
                         expert j (mean over MoE layers)
  moe/load_max           the largest such fraction (1/E when perfectly balanced)
  moe/dropped_frac       fraction of the tokens' top-k slots left empty (dropped by
                         capacity, or a router - e.g. sparse OT - that gave a token
                         fewer than top_k experts)
  moe/dropped_tokens_frac fraction of tokens with every slot dropped (residual only)
  moe/router_entropy     mean entropy of the router softmax (nats; log E = uniform)
  moe/aux_loss, moe/z_loss  the load-balancing and z losses (coefficients included)
  moe/solver_iterations  OT routers: solver iterations per solve (mean over ranks and
                         micro-batches; global scope: the one shared count; group scope:
                         each rank's batch of groups runs until its slowest group stops,
                         so this depends on the world size - the plans do not)
  moe/solver_residual    OT routers: the plan's marginal residual |P1 - a|_1 + |P^T 1 - b|_1
                         (group scope: the largest over a rank's groups, averaged over ranks)
  moe/layer{i}/...       with `per_layer: true`: load_max, dropped_frac, router_entropy
                         of each MoE block
"""
from __future__ import annotations

from pydantic import Field

from distreg.hooks.base import Hook, HookContext
from distreg.hooks.registry import register
from distreg.models.moe import moe_metrics, reset_moe_metrics


@register
class MoEMetrics(Hook):
    name = "moe_metrics"

    class Params(Hook.Params):
        every: int = Field(1, gt=0)  # steps between metric updates (statistics cover those steps)
        per_layer: bool = False

    def __init__(self, params: "MoEMetrics.Params"):
        super().__init__(params)
        self.values: dict[str, float] = {}

    def on_train_start(self, ctx: HookContext) -> None:
        reset_moe_metrics(ctx.model)

    def after_step(self, ctx: HookContext) -> None:
        if ctx.metrics_on(self.params.every):  # host reads: logging steps only
            self.values = moe_metrics(ctx.model, self.params.per_layer)
            reset_moe_metrics(ctx.model)

    def metrics(self) -> dict[str, float]:
        return dict(self.values)
