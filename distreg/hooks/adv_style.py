"""`adv_style`: Adversarial Style Augmentation (AdvStyle, Zhang et al., arXiv 2301.12643;
core, formula and sources in `distreg.regularizers.adv_style`).

At each chosen layer (`layers`: module names whose output feature map [B, C, H, W] is
re-styled; the reference's `resnet*_advs_lc01234` backbone perturbs, in torchvision
ResNet naming, the outputs of `conv1`, `maxpool`, `layer1` .. `layer4`) the per-sample
channel mean / std are perturbed by unit normals times learnable per-channel scales
(s_mu, s_sig), and the scales are trained by gradient ascent on the task loss. What the
reference's classification trainer does per batch, and this hook per optimizer step:

1. `ascent_steps` (reference: 3) inner iterations, each a forward of the whole batch with
   fresh noise, the task loss, and s <- s + lr * adv_weight * dL/ds (the reference's SGD
   through a gradient-reversal layer). Model gradients of these passes are discarded.
   Here they are never formed: the Trainer's inner-maximisation step (hooks/base.py,
   `adversarial`) gives `loss_fn`, and the hook takes `torch.autograd.grad(loss, scales)`.
2. One real pass with fresh noise; the model is trained on its loss only. The reference
   adds no clean-batch loss: clean features enter training only through the per-layer
   branch draw below.

Per layer and per forward the reference draws a branch (`random.random()`): the
AdvStyle perturbation with probability 1/3, identity 1/3 and DSU (statistics noise scaled
by the batch's own cross-sample std) 1/3 (its re-identification variant: AdvStyle 1/2,
identity 1/2, with normalised scales). Here a layer is perturbed with probability `p_adv`
(required: which mix to take is not settled by the code we could read, and the DSU branch
is not offered, so the reference's 1/3 split cannot be reproduced as is) and left as is
otherwise; the draw is shared by all samples of the pass, as the reference's is by its batch.

Scales persist across steps (the reference's `nn.Parameter`s, saved with its model):
they are this hook's state, in the checkpoint, resumed exactly. They are initialised at the
first step, before the first inner pass, from the step's whole batch with the layers
un-perturbed (the reference initialises from the first batch that draws the AdvStyle
branch at that layer, inside that forward). Ascent learning rate: `ascent_lr`, or (None)
the run's current learning rate, as the reference, whose adversarial optimizer shares the
model's lr and schedule; `adv_weight` defaults to the reference script's 10 (its module's
own default is 1). The reference's Adam variant (Adam on the scales when the model uses
Adam) is not offered: the ascent is always its SGD form.

Distributed: the statistics and the noise are per sample (normals keyed by (seed, step,
pass, layer, global sample index, channel)); the branch draws by (seed, step, pass,
layer); the scales' ascent gradient is this rank's sum over its micro-batches, all-reduced
(one all-reduce of 2·sum(C) floats per ascent step); the initial scales come from
all-reduced moment sums (once). Hence the update is the single-process one for any world
size, strategy and gradient accumulation (BatchNorm's batch statistics remain per rank
and micro-batch: the backbone's, not this hook's).

Cost: `ascent_steps` extra forward + backward (to the first perturbed layer) per
micro-batch per step; on metrics steps one more no-grad forward with the layers clean
(BatchNorm buffers restored after it).

Metrics (metrics steps only; one 3-float all-reduce): `clean_loss` (un-perturbed forward,
same weights), `perturbed_loss` (the real pass), `loss_gap` (perturbed - clean),
`ascent_loss` (the last inner pass that ran; 0 when every layer drew identity in every
pass), `mean_scale_norm` / `std_scale_norm` (L2 norm of the
scales over all layers), `ascent_grad_norm` (of the last ascent step).
"""
from __future__ import annotations

import random

import torch
from pydantic import Field
from torch import nn

from distreg.hooks.base import Hook, HookContext, LossTerms
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import F64, buffers_unchanged, release_gathered
from distreg.regularizers.adv_style import EPS, ascent, init_scales, keyed_normal, moment_sums, perturb


@register
class AdvStyle(Hook):
    name = "adv_style"
    adversarial = True

    class Params(Hook.Params):
        layers: list[str] = Field(min_length=1, description="modules whose output feature map is re-styled "
                                  "(reference lc01234 on a torchvision ResNet: conv1, maxpool, layer1..layer4)")
        p_adv: float = Field(gt=0, le=1, description="probability that a layer is perturbed in a pass (required; "
                                                     "the reference: 1/3 AdvStyle + 1/3 DSU + 1/3 identity)")
        adv_weight: float = Field(10.0, gt=0, description="gradient-reversal coefficient (reference script: 10)")
        ascent_lr: float | None = Field(None, gt=0, description="ascent learning rate (None: the run's current lr, "
                                                                 "as the reference)")
        ascent_steps: int = Field(3, ge=1, description="inner ascent iterations per step (reference: 3)")
        eps: float = Field(EPS, gt=0, description="variance epsilon (reference 1e-6)")
        seed: int | None = Field(None, description="noise / branch seed (default: train.seed)")
        metrics_prefix: str | None = None

    params: "AdvStyle.Params"

    def __init__(self, params):
        super().__init__(params)
        self.seed = params.seed if params.seed is not None else torch.initial_seed()
        self.scales: dict[str, torch.Tensor] = {}  # layer -> [2, C] (s_mu, s_sig); empty until initialised
        self.mode = "off"  # off | stats | inner | real: what the layer hooks do
        self.step = 0
        self.pass_id = 0  # 0 .. ascent_steps - 1: inner passes; ascent_steps: the real pass
        self.index: torch.Tensor | None = None  # global sample indices of the micro-batch in flight
        self.live: dict[str, torch.Tensor] = {}  # the inner pass's differentiable scales
        self.sums: dict[str, torch.Tensor] = {}  # moment sums of the initialising pass
        self.values: dict[str, float | torch.Tensor] = {}
        self._local: torch.Tensor | None = None  # metrics step: clean, perturbed, ascent loss (this rank)

    @property
    def prefix(self) -> str:
        return self.params.metrics_prefix or self.name

    # -- install ----------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, ctx: HookContext) -> None:
        if len(set(self.params.layers)) != len(self.params.layers):
            raise ValueError(f"adv_style: layers: a module is listed twice in {self.params.layers}")
        for layer in self.params.layers:
            try:
                mod = model.get_submodule(layer)
            except AttributeError:
                raise ValueError(f"adv_style: layers: no module {layer!r} in the model") from None
            mod.register_forward_hook(self._restyle(layer))

    def _applies(self, layer: str, pass_id: int) -> bool:
        # One draw per (step, pass, layer), the same on every rank and micro-batch.
        return random.Random(f"{self.seed}/adv_style/{layer}/{self.step}/{pass_id}").random() < self.params.p_adv

    def _restyle(self, layer: str):
        def hook(mod, args, out):
            if not mod.training or self.mode == "off" or self.index is None:
                return out
            if self.mode == "stats":
                sums = moment_sums(out, self.params.eps)
                self.sums[layer] = sums if layer not in self.sums else self.sums[layer] + sums
                return out
            if not self._applies(layer, self.pass_id):
                return out
            scales = self.live[layer] if self.mode == "inner" else self.scales[layer]
            c = out.shape[1]
            noise = keyed_normal(self.seed, f"adv_style/{layer}/{self.step}/{self.pass_id}", self.index, 2 * c)
            return perturb(out, scales[0], scales[1], noise[:, :c], noise[:, c:], self.params.eps)

        return hook

    # -- the inner maximisation ---------------------------------------------------------
    def inner_step(self, ctx: HookContext, micro_batches: list[dict], loss_fn) -> None:
        self.step = ctx.step
        p = self.params
        device = micro_batches[0]["input"].device
        self.scales = {k: v.to(device) for k, v in self.scales.items()}
        initialising = not self.scales
        clean = self._clean_pass(ctx, micro_batches, loss_fn, initialising) if initialising or ctx.metrics_due else None
        lr = p.ascent_lr if p.ascent_lr is not None else ctx.lr
        if lr is None:
            raise ValueError("adv_style: ascent_lr is unset and the Trainer gave no learning rate")
        ascent_loss = torch.zeros((), dtype=F64, device=device)
        grad_norm = torch.zeros((), dtype=F64, device=device)
        self.mode = "inner"
        try:
            for k in range(p.ascent_steps):
                self.pass_id = k
                used = [layer for layer in p.layers if self._applies(layer, k)]
                if not used:  # every layer drew identity: the loss does not depend on the scales
                    continue
                self.live = {layer: self.scales[layer].detach().clone().requires_grad_(True) for layer in used}
                leaves = [self.live[layer] for layer in used]
                grads = [torch.zeros_like(t) for t in leaves]
                pass_loss = torch.zeros((), dtype=F64, device=device)
                for batch in micro_batches:
                    self.index = batch["index"]
                    loss = loss_fn(batch)
                    for g, d in zip(grads, torch.autograd.grad(loss, leaves, allow_unused=True)):
                        if d is not None:
                            g += d
                    pass_loss += loss.detach().to(F64)
                flat = ctx.comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]))  # global-mean gradient
                for layer, g in zip(used, flat.split([t.numel() for t in leaves])):
                    self.scales[layer] = ascent(self.scales[layer], g.view_as(self.scales[layer]), lr, p.adv_weight)
                if ctx.metrics_due:
                    ascent_loss, grad_norm = pass_loss, flat.double().norm()
        finally:
            self.mode, self.live, self.index = "off", {}, None
        release_gathered(ctx.model)
        if ctx.metrics_due:
            self._local = torch.stack([clean, torch.zeros_like(clean), ascent_loss])
            self.values["ascent_grad_norm"] = grad_norm

    @torch.no_grad()
    def _clean_pass(self, ctx: HookContext, micro_batches: list[dict], loss_fn, initialising: bool) -> torch.Tensor:
        """No-grad forwards with the layers un-perturbed: this rank's share of the clean
        loss, and (first step) the moment sums that initialise the scales. BatchNorm's
        running statistics are restored after it: a metric must not change training."""
        self.mode, self.sums = ("stats" if initialising else "off"), {}
        total = torch.zeros((), dtype=F64, device=micro_batches[0]["input"].device)
        try:
            with buffers_unchanged(ctx.model):
                for batch in micro_batches:
                    self.index = batch["index"]
                    total += loss_fn(batch).to(F64)
        finally:
            self.mode, self.index = "off", None
        release_gathered(ctx.model)
        if initialising:
            missing = [layer for layer in self.params.layers if layer not in self.sums]
            if missing:
                raise ValueError(f"adv_style: layers {missing} were not called in the model's forward")
            sizes = [self.sums[layer].numel() for layer in self.params.layers]
            flat = ctx.comm.all_reduce(torch.cat([self.sums[layer].reshape(-1) for layer in self.params.layers]))
            for layer, part in zip(self.params.layers, flat.split(sizes)):
                self.scales[layer] = init_scales(part.view(5, -1), self.params.eps)
            self.sums = {}
        return total

    # -- the real pass -------------------------------------------------------------------
    def before_forward(self, ctx: HookContext, batch: dict) -> None:
        self.mode, self.pass_id, self.index = "real", self.params.ascent_steps, batch["index"]

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        if ctx.metrics_due and self._local is not None:
            self._local[1] += (terms.weight * terms.per_sample).detach().to(F64).sum()
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        self.mode, self.index = "off", None  # later forwards (probes, eval) are left clean
        if not ctx.metrics_due or self._local is None:
            return
        clean, perturbed, ascent_loss = ctx.comm.all_reduce(self._local)
        self._local = None
        mean_sq = sum((self.scales[layer][0].double() ** 2).sum() for layer in self.params.layers)
        std_sq = sum((self.scales[layer][1].double() ** 2).sum() for layer in self.params.layers)
        self.values.update(clean_loss=clean, perturbed_loss=perturbed, loss_gap=perturbed - clean,
                           ascent_loss=ascent_loss, mean_scale_norm=mean_sq.sqrt(), std_scale_norm=std_sq.sqrt())

    def metrics(self) -> dict[str, float]:
        # Values are 0-dim device tensors: read back here, on logging steps only.
        return {f"{self.prefix}/{k}": float(v) for k, v in self.values.items()}

    # -- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "scales": {k: v.detach().cpu().clone() for k, v in self.scales.items()},
                "values": {k: float(v) for k, v in self.values.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state.get("seed", self.seed)
        scales = state.get("scales", {})
        if scales and set(scales) != set(self.params.layers):
            raise ValueError(f"adv_style: the checkpoint holds scales for layers {sorted(scales)}, "
                             f"the config perturbs {sorted(self.params.layers)}")
        self.scales = {k: v.clone() for k, v in scales.items()}
        self.values = dict(state.get("values", {}))
