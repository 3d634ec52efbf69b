"""Loss hooks: `stablemax`, `z_loss_logit`, `z_loss_spherical`, and the Softmax-Collapse
monitor `collapse_monitor` (spec regularizers.md sections 2 and 5).

All are per-token terms turned into the Trainer's per-sample convention (mean over each
sample's valid tokens; `runtime.loss.per_sample_loss`), so the Trainer's reduction weights
make every global mean exact on any number of ranks and micro-batches (spec P1): token
reduction weights n_i / N give the mean over all valid tokens of the step.

Order: forward -> per-sample CE -> `loss` hooks in list order (a replacing hook overwrites
`per_sample`; `z_loss_logit` adds to it, so a later reweighting hook weights CE + z-loss
together) -> backward. Metrics are accumulated on logging steps only (`ctx.metrics_on`)
and completed in `after_backward` by one small all-reduce (data statistics: always over
all ranks); other steps run the loss term alone, with no collective and no host read.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from distreg.hooks.base import HookContext, LossTerms
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import F64, StatHook, per_sample_mean, valid_targets
from distreg.regularizers import softmax_collapse_counts, stablemax_cross_entropy, z_loss_logit, z_loss_spherical


def _collapse_counts(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[collapsed, zero_loss, n] over this micro-batch's valid tokens, in the logits' dtype
    (the training softmax precision, as the reference logger)."""
    return softmax_collapse_counts(out.detach()[valid], target[valid])


# --------------------------------------------------------------------------- collapse monitor


@register
class CollapseMonitor(StatHook):
    """Softmax Collapse (Prieto et al. 2025, spec 2.3) on the training batches: the fraction
    of valid tokens (samples, for classification) whose sum_j exp(x_j - max x) is exactly 1
    in the logits' precision (`softmax_collapse`), and whose cross-entropy is exactly 0
    (`zero_loss`: no gradient at all). The reference evaluates on the whole training set
    every few epochs; this logs it on each step's global batch (`every` steps). One
    3-float all-reduce per counted step."""

    name = "collapse_monitor"

    class Params(StatHook.Params):
        every: int = Field(1, gt=0)

    params: "CollapseMonitor.Params"

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        if ctx.metrics_on(self.params.every):
            target, valid = valid_targets(batch)
            self.accumulate(_collapse_counts(out, target, valid))
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        if ctx.metrics_on(self.params.every):
            c = self.reduced(ctx, 3)
            n = max(float(c[2]), 1.0)
            self.values = {"softmax_collapse": float(c[0]) / n, "zero_loss": float(c[1]) / n}


# --------------------------------------------------------------------------- StableMax


@register
class StableMax(StatHook):
    """Replaces the loss by StableMax cross-entropy (spec 2.1, [CODE]): s(x) = x + 1 for
    x >= 0, 1 / (1 - x) for x < 0, loss = -log s(x_y) + log sum_j s(x_j), computed in
    float64 like the reference (memory: 8 bytes per logit). Predictions stay argmax x.
    Metrics: `loss` (the step's StableMax CE, global), and with `collapse_metrics` the
    softmax-collapse fractions of the same logits (as `collapse_monitor`)."""

    name = "stablemax"
    replaces_loss = True

    class Params(StatHook.Params):
        collapse_metrics: bool = True

    params: "StableMax.Params"

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        target, valid = valid_targets(batch)
        tok = stablemax_cross_entropy(out, target, reduction="none")
        terms.per_sample = per_sample_mean(tok, valid)
        if ctx.metrics_on():
            stats = [(terms.weight.detach().to(F64) * terms.per_sample.detach()).sum().reshape(1)]
            if self.params.collapse_metrics:
                stats.append(_collapse_counts(out, target, valid))
            self.accumulate(torch.cat(stats))
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        if not ctx.metrics_on():
            return
        c = self.reduced(ctx, 4 if self.params.collapse_metrics else 1)
        self.values = {"loss": float(c[0])}
        if self.params.collapse_metrics:
            n = max(float(c[3]), 1.0)
            self.values.update(softmax_collapse=float(c[1]) / n, zero_loss=float(c[2]) / n)


# --------------------------------------------------------------------------- z-losses


@register
class ZLossLogit(StatHook):
    """PaLM auxiliary z-loss (spec 5.2): adds kappa * (logsumexp_v o_v)^2 per valid token to
    the loss (in fp32), i.e. kappa * mean over the step's valid tokens with token
    reduction. Metrics: `value` (the term's contribution to the step loss), `log_z_sq`
    (its mean (log Z)^2), `kappa`."""

    name = "z_loss_logit"

    class Params(StatHook.Params):
        kappa: float = Field(1e-4, ge=0)

    params: "ZLossLogit.Params"

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        _, valid = valid_targets(batch)
        tok = z_loss_logit(out, self.params.kappa, valid=valid, reduction="none")
        z = per_sample_mean(tok, valid)
        terms.per_sample = terms.per_sample + z
        if ctx.metrics_on():
            self.accumulate((terms.weight.detach().to(F64) * z.detach().to(F64)).sum().reshape(1))
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        if not ctx.metrics_on():
            return
        value = float(self.reduced(ctx, 1)[0])
        k = self.params.kappa
        self.values = {"value": value, "log_z_sq": value / k if k else math.nan, "kappa": k}


@register
class ZLossSpherical(StatHook):
    """Spherical Z-loss of de Brebisson & Vincent (spec 5.1) replacing cross-entropy:
    z_c = (o_c - mean o) / (std o + eps), loss = softplus(a (b - z_c)) / a. `a` and `b`
    are required: the paper's tuned values could not be read (spec open item 4; the
    authors' timing example uses a = 1, b = 0). A b >= sqrt(D - 1) (unreachable z_c) is a
    config-time warning from the core at the first step. Metrics: `loss`, `a`, `b`."""

    name = "z_loss_spherical"
    replaces_loss = True

    class Params(StatHook.Params):
        a: float = Field(gt=0, description="sharpness (required)")
        b: float = Field(description="location (required)")
        eps: float = Field(1e-12, ge=0)

    params: "ZLossSpherical.Params"

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        p = self.params
        target, valid = valid_targets(batch)
        tok = z_loss_spherical(out, target, p.a, p.b, p.eps, reduction="none")
        terms.per_sample = per_sample_mean(tok, valid)
        if ctx.metrics_on():
            self.accumulate((terms.weight.detach().to(F64) * terms.per_sample.detach().to(F64)).sum().reshape(1))
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        if not ctx.metrics_on():
            return
        self.values = {"loss": float(self.reduced(ctx, 1)[0]), "a": self.params.a, "b": self.params.b}
