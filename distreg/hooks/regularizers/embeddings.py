"""Embedding-space losses on the features the model's head sees: `normalized_softmax`
(hyperspherical embedding / NormSoftmax, spec regularizers.md section 16), `tcm`
(Threshold-Consistent Margin, section 11) and `cs_ib` (Cauchy-Schwarz information
bottleneck for regression, section 12).

Features. `prepare_model` (before sharding) puts a forward pre-hook on the head module
(`head`: the Llama's `output`, a torchvision classifier's `fc`, a regression model's last
layer) that keeps the head's input of the latest forward. It runs inside the forward, so
it sees each sample's whole feature vector under DDP, FSDP2 and ZeRO-3 alike; the loss
hooks read it in `loss` for the same micro-batch. Hooks on the same head share one tap.

Order in a step: forward (the tap fills; `normalized_softmax` computes the cosine logits
inside the head) -> per-sample CE (Trainer) -> `loss` hooks in list order (`tcm`, `cs_ib`
add penalties; `cs_ib` replaces the sample loss) -> backward -> `after_backward` (metrics:
at most one small all-reduce) -> step. Nothing edits gradients or parameters after the
backward, so there is no P7 ordering issue; clipping sees the penalties' gradients.

Distributed conventions (spec P1, P5), each checked against one process on the same
global micro-batch:
- `normalized_softmax`: a per-sample loss, reduced by the Trainer's global weights (P1).
  The class weights are row-normalised inside the head's forward, where FSDP2 and ZeRO-3
  have gathered the full matrix (P2a); the gradient reaches it through the strategy's own
  reduction. The vocabulary is not split across ranks (no class-parallel softmax).
- `tcm`: pairs span the *global* micro-batch (spec 11): embeddings and labels are
  all-gathered (detached), each rank sums the pairs of its own anchors against all
  references over global pair counts (`tcm_terms`, "partial" convention); the penalty is
  world * share, so the strategies' gradient average gives the single-process gradient
  and the logged step loss sums to the global value. Memory O(N_local x N_global).
- `cs_ib`: every term is a log of all-pairs kernel sums over the global micro-batch:
  x, y, y_hat and t are all-gathered with this rank's rows spliced back (grad-carrying),
  so every rank computes the identical global value and its backward reaches only local
  samples; the penalty's value is that value and its gradient world * that, which the
  average over ranks turns into the single-process gradient. O(N_global^2) memory.
With gradient accumulation `tcm` and `cs_ib` are computed per global micro-batch
(micro-batch m of every rank) and averaged over the step's micro-batches by the Trainer.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distreg.hooks.base import HookContext, LossTerms
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import F64
from distreg.hooks.regularizers._common import StatHook, valid_targets
from distreg.regularizers.losses import cs_ib_terms, normalized_softmax_logits, normsoftmax_embedding, tcm_terms
from distreg.sparsity.masks import index_uniform_at


class HeadTap:
    """The head module's input of its latest forward (`features`) and, when
    `normalized_softmax` wraps the head, the unit embedding it scored (`embedding`)."""

    def __init__(self):
        self.features: torch.Tensor | None = None
        self.embedding: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.features, self.embedding = args[0], None


def head_tap(model: nn.Module, head: str, hook: str) -> tuple[nn.Module, HeadTap]:
    """The head module and its (shared) tap, installed on first use."""
    try:
        mod = model.get_submodule(head)
    except AttributeError:
        raise ValueError(f"{hook}.head: no module {head!r} in the model") from None
    tap = getattr(mod, "_distreg_head_tap", None)
    if tap is None:
        tap = HeadTap()
        mod.register_forward_pre_hook(tap)
        mod._distreg_head_tap = tap
    return mod, tap


class _HeadHook(StatHook):
    """A `StatHook` reading the head's features; counts its micro-batches per step."""

    class Params(StatHook.Params):
        head: str = Field("output", description="the model's head module (its input is the feature vector)")

    def __init__(self, params):
        super().__init__(params)
        self.tap: HeadTap | None = None
        self.micro = 0

    def prepare_model(self, model: nn.Module, ctx: HookContext) -> None:
        _, self.tap = head_tap(model, self.params.head, self.name)

    def features(self) -> torch.Tensor:
        if self.tap is None or self.tap.features is None:
            raise RuntimeError(f"{self.name}: no features captured: did the forward call head {self.params.head!r}?")
        return self.tap.features


# --------------------------------------------------------------------------- normalized softmax (16)


@register
class NormalizedSoftmax(_HeadHook):
    """Normalized softmax (NormSoftmax, Zhai & Wu; the loss of Pereira et al.'s
    hyperspherical embedding, spec 16): the head's forward is replaced by
    logit_c = <e, W_c / ||W_c||> / T with e = normalize(LayerNorm_noaffine(h)) [CODE]
    (`layer_norm: false`: e = normalize(h)), T = 0.05, so the loss - the Trainer's
    cross-entropy over the returned logits - becomes CE(s cos theta, y), s = 1 / T; eval
    predictions are the nearest class by cosine. Declared loss-replacing (cannot be combined
    with stablemax / z_loss_spherical / cs_ib). The reference's optional bias-free remap
    layer is not added (the layer before the head plays its role); a head bias is unused
    (kept in the graph with gradient 0, so DDP sees every parameter used). The paper's own
    "constraint" on the latents is unverified (spec open item 6): this is the NormSoftmax
    reference. Metrics (global, over valid tokens / samples): `cos_target` (mean cosine to
    the target class), `cos_max` (mean largest cosine), `accuracy`, `scale` (1 / T)."""

    name = "normalized_softmax"
    replaces_loss = True

    class Params(_HeadHook.Params):
        temperature: float = Field(0.05, gt=0, description="T; the cosine scale is 1 / T")
        layer_norm: bool = Field(True, description="LayerNorm without affine before the L2 normalisation [CODE]")
        ln_eps: float = Field(1e-5, gt=0)

    params: "NormalizedSoftmax.Params"

    def prepare_model(self, model: nn.Module, ctx: HookContext) -> None:
        mod, tap = head_tap(model, self.params.head, self.name)
        self.tap = tap
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise ValueError(f"{self.name}.head: module {self.params.head!r} has no 2-D `weight` (class weights)")
        if getattr(mod, "_distreg_normalized", False):
            raise ValueError(f"{self.name}: head {self.params.head!r} is already normalized by another hook")
        p = self.params

        def forward(h: torch.Tensor) -> torch.Tensor:
            x = h.float()
            e = normsoftmax_embedding(x, None, p.ln_eps) if p.layer_norm else F.normalize(x, dim=-1)
            tap.embedding = e
            # `mod.weight` is read here, inside the forward: the full matrix under FSDP2 / ZeRO-3.
            logits = normalized_softmax_logits(e, mod.weight.float(), p.temperature)
            if getattr(mod, "bias", None) is not None:
                logits = logits + 0.0 * mod.bias.sum()
            return logits

        mod.forward = forward
        mod._distreg_normalized = True

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        target, valid = valid_targets(batch)
        if not ctx.metrics_on():
            return terms  # statistics for the logging step only
        cos = out.detach().to(F64) * self.params.temperature
        cos_target = cos.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        cos_max, best = cos.max(-1)
        self.accumulate(torch.stack([cos_target[valid].sum(), cos_max[valid].sum(),
                                     (best == target)[valid].sum().to(F64), valid.sum().to(F64)]))
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        if not ctx.metrics_on():
            return
        c = self.reduced(ctx, 4)
        n = max(float(c[3]), 1.0)
        self.values = {"cos_target": float(c[0]) / n, "cos_max": float(c[1]) / n, "accuracy": float(c[2]) / n,
                       "scale": 1.0 / self.params.temperature}


# --------------------------------------------------------------------------- TCM (11)


@register
class ThresholdConsistentMargin(_HeadHook):
    """TCM (Zhang et al. 2023, spec 11, PML port [CODE]): adds
    coef * [lambda+ mean over hard positive pairs of (m+ - s_ij) + lambda- mean over hard
    negative pairs of (s_ij - m-)] over all ordered pairs i != j of the global micro-batch's
    valid tokens / samples, s = cosine similarity of the head's features (of the unit
    embedding when `normalized_softmax` wraps the same head), labels = the targets.
    Defaults m+ = 0.9, m- = 0.5, lambda+- = 1, coef = 1 (L = L_base + L_TCM). Metrics:
    `value` (coef * L_TCM, mean over the step's micro-batches), `pos_part`, `neg_part`
    (the unweighted means), `hard_pos_fraction`, `hard_neg_fraction` (qualifying pairs among
    all positive / negative pairs). At LLM batch sizes all pairs do not fit:
    `token_fraction` keeps a rank-invariant random subset of the tokens (each pair mean
    then estimated from the pairs among them)."""

    name = "tcm"

    class Params(_HeadHook.Params):
        coef: float = Field(1.0, ge=0)
        pos_margin: float = Field(0.9, ge=-1, le=1, description="m+: positive pairs with s <= m+ are hard")
        neg_margin: float = Field(0.5, ge=-1, le=1, description="m-: negative pairs with s >= m- are hard")
        pos_weight: float = Field(1.0, ge=0)
        neg_weight: float = Field(1.0, ge=0)
        token_fraction: float = Field(1.0, gt=0, le=1, description=(
            "pairs among a random fraction of the valid tokens only (memory O(f^2 N_local N_global)); "
            "a token's draw is keyed by (seed, step, micro-step, its global position), so every "
            "split of the batch over ranks samples the same tokens"))
        seed: int = 0

    params: "ThresholdConsistentMargin.Params"

    def sampled(self, ctx: HookContext, batch: dict, valid: torch.Tensor) -> torch.Tensor:
        """`valid`, thinned to `token_fraction` of the tokens by a rank-invariant draw."""
        f = self.params.token_fraction
        if f >= 1.0:
            return valid
        index = batch["index"].to(valid.device).reshape(-1, *([1] * (valid.dim() - 1)))
        if valid.dim() > 1:  # token models: global position = sample index * length + offset
            length = valid.shape[-1]
            index = index * length + torch.arange(length, device=valid.device)
        # integer hashing: the same draw on any device (no copy back to the host)
        draw = index_uniform_at(self.params.seed, f"tcm/{ctx.step}/{ctx.micro_step}", index)
        return valid & (draw < f)

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        p = self.params
        feats = self.tap.embedding if self.tap is not None and self.tap.embedding is not None else self.features()
        target, valid = valid_targets(batch)
        if feats.shape[:-1].numel() != target.numel():
            raise ValueError(f"tcm: head features {tuple(feats.shape)} do not match targets {tuple(target.shape)}")
        keep = self.sampled(ctx, batch, valid).reshape(-1)
        emb = feats.reshape(-1, feats.shape[-1])[keep].float()
        value, stats = tcm_terms(emb, target.reshape(-1)[keep], p.pos_margin, p.neg_margin, p.pos_weight,
                                 p.neg_weight, ctx.comm)
        terms.penalties[self.prefix] = p.coef * ctx.world_size * value
        if ctx.metrics_on():
            self.accumulate(stats)
        self.micro += 1
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        k = max(self.micro, 1)
        self.micro = 0
        if not ctx.metrics_on():
            return
        p, c = self.params, self.reduced(ctx, 6)
        pos, neg = float(c[0]) / k, float(c[1]) / k
        self.values = {"value": p.coef * (p.pos_weight * pos + p.neg_weight * neg), "pos_part": pos,
                       "neg_part": neg, "hard_pos_fraction": float(c[2]) / max(float(c[4]), 1.0),
                       "hard_neg_fraction": float(c[3]) / max(float(c[5]), 1.0)}


# --------------------------------------------------------------------------- CS-IB (12)


def _rows(a: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, prod(...)] in fp32 (also for an empty local batch)."""
    return a.reshape(a.shape[0], math.prod(a.shape[1:])).float()


@register
class CauchySchwarzIB(_HeadHook):
    """CS-IB for regression (Yu et al., ICLR 2024, spec 12 [CODE]): replaces the loss by
    D_CS(y, y_hat | x) + beta * I_CS(x; t) / sqrt(I_CS(x; x) I_CS(t; t)) (bits, Gaussian
    kernels of width sigma = 1), with x = batch[`input_key`] flattened per sample, y =
    batch["target"] (float, [N] or [N, k]), y_hat = the model output, t = the head's input
    (the bottleneck; the reference's deterministic `enc_mean` output feeds its decoder).
    1-D targets use the per-sample kernel (as [N, 1]); `prediction: reference_1d`
    reproduces what the reference script actually computes with its 1-D targets (a scaled
    sum of squared errors, `cs_divergence_reference_1d`). The per-sample loss is set to 0
    (the value is non-decomposable) and the term goes in as a penalty. The Trainer's
    per-sample cross-entropy does not accept float targets: use through the hook API (or
    a Trainer with a regression loss). Metrics: `loss`, `d_cs`, `i_xt` (normalised),
    `beta`, mean over the step's micro-batches (identical on every rank: no all-reduce)."""

    name = "cs_ib"
    replaces_loss = True

    class Params(_HeadHook.Params):
        beta: float = Field(0.01, ge=0)
        sigma: float = Field(1.0, gt=0, description="width of every Gaussian kernel")
        denominator: Literal["sum_sq", "sq_sum"] = Field("sum_sq", description="sum_sq: the code; sq_sum: the paper")
        prediction: Literal["cs_div", "reference_1d"] = "cs_div"
        input_key: str = Field("input", description="batch key of x, the input the compression term measures")

    params: "CauchySchwarzIB.Params"

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        p = self.params
        y = batch["target"]
        if not y.is_floating_point():
            raise ValueError(f"cs_ib: batch['target'] must hold float regression targets, got {y.dtype}")
        if p.input_key not in batch:
            raise ValueError(f"cs_ib.input_key: the batch has no {p.input_key!r} (keys: {sorted(batch)})")
        y2, y_hat, x, t = (_rows(a) for a in (y, out, batch[p.input_key], self.features()))
        if y_hat.shape != y2.shape:
            raise ValueError(f"cs_ib: model output {tuple(out.shape)} does not match the targets {tuple(y.shape)}")
        d_cs, i_xt = cs_ib_terms(x, y2, y_hat, t, p.sigma, p.denominator, ctx.comm, p.prediction)
        value = d_cs + p.beta * i_xt
        w = ctx.world_size
        # Value: the global loss (the same on every rank); gradient: world * this rank's
        # part, which the strategies' average over ranks turns into the full gradient.
        terms.penalties[self.prefix] = w * value - (w - 1) * value.detach()
        terms.per_sample = torch.zeros_like(terms.weight)
        self.accumulate(torch.stack([value.detach(), d_cs.detach(), i_xt.detach()]))
        self.micro += 1
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        c = self._acc if self._acc is not None else torch.zeros(3, dtype=F64)
        k = max(self.micro, 1)
        self._acc, self.micro = None, 0
        self.values = {"loss": float(c[0]) / k, "d_cs": float(c[1]) / k, "i_xt": float(c[2]) / k,
                       "beta": self.params.beta}
