"""`quant_noise`: train against the noise of b-bit uniform weight quantization (QuantNAS;
core and sources in `distreg.regularizers.quant_noise`).

Every participating nn.Linear / nn.Conv{1,2,3}d computes its forward with `w + noise`,
noise = Δ·(U - 1/2) (or Δ·Z/2), Δ = (max w - min w) / (2^bits - 1) over the tensor or each
output channel; the weight gradient is straight-through. The noise is added inside the
module's own forward, where every strategy holds the *full* weight (DDP's replica,
FSDP2's unsharded block, ZeRO-3's gathered parameter): ranges are exact whole-tensor
min/max with no collective, and the optimizer's copy is never touched. Draws are keyed by
(seed, parameter, optimizer step, global element index), so 1 or N ranks, any strategy
and a resumed run draw the same noise; all micro-batches of a step share it.

Not offered (unconfirmed in what we could read): QuantNAS's noise on activations (the
reference code takes the activation range over the whole batch, which depends on how the
batch is split across ranks) and the ADQ module for normalisation layers.

Report (`report_every` steps, 0 = off): after the optimizer step, on the step's first
micro-batch of every rank, three no-grad forwards give the global token-mean loss with
noise, without noise, and with the real b-bit quantized weights (`fake_quantize`), plus
the mean Δ: metrics `noisy_loss`, `clean_loss`, `quantized_loss`, `quantization_gap`
(quantized - clean), `step_size`. One 4-float all-reduce per report.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distreg.hooks.base import Hook, HookContext, LossTerms
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import F64, buffers_unchanged, release_gathered
from distreg.regularizers.quant_noise import fake_quantize, quant_noise, quant_step
from distreg.runtime.loss import per_sample_loss, valid_counts

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _call_with_weight(mod: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Linear):
        return F.linear(x, w, mod.bias)
    return mod._conv_forward(x, w, mod.bias)


@register
class QuantNoise(Hook):
    name = "quant_noise"

    class Params(Hook.Params):
        bits: int = Field(ge=1, le=16, description="bit width b of the quantizer simulated (QuantNAS searches 4 and 8)")
        noise: Literal["uniform", "gaussian"] = Field(
            "uniform", description="Δ·(U - 1/2) (variance of rounding error) or Δ·Z/2 (the reference code's default)")
        granularity: Literal["tensor", "channel"] = "tensor"
        include: list[str] = Field(["*"], description="fnmatch patterns of module names (Linear / Conv layers)")
        exclude: list[str] = Field([], description="fnmatch patterns of module names left alone")
        seed: int | None = Field(None, description="noise seed (default: train.seed)")
        report_every: int = Field(0, ge=0, description="steps between noisy / clean / quantized loss reports (0: off)")
        metrics_prefix: str | None = None

    params: "QuantNoise.Params"

    def __init__(self, params):
        super().__init__(params)
        self.seed = params.seed if params.seed is not None else torch.initial_seed()
        self.mode = "noise"  # noise | clean | quantized: what the wrapped forwards use
        self.step = 0
        self.layers: list[str] = []
        self.values: dict[str, float] = {}
        self.probe: dict | None = None
        self._deltas: list[torch.Tensor] = []

    # -- install ----------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, ctx: HookContext) -> None:
        p = self.params
        for name, mod in model.named_modules():
            if not isinstance(mod, _LAYERS) or not isinstance(mod.weight, nn.Parameter):
                continue
            if not any(fnmatchcase(name, pat) for pat in p.include) or any(fnmatchcase(name, pat) for pat in p.exclude):
                continue
            self._wrap(name, mod)
            self.layers.append(name)
        if not self.layers:
            raise ValueError(f"quant_noise: no Linear / Conv layer matches include={p.include} exclude={p.exclude}")

    def _wrap(self, name: str, mod: nn.Module) -> None:
        # Replace the instance's forward (not a pre-hook): its body runs after every
        # strategy's pre-forward hooks, when FSDP2 / ZeRO-3 have the full weight in place.
        plain = mod.forward
        per_channel = self.params.granularity == "channel"

        def forward(x, *args, **kwargs):
            if self.mode == "clean" or (self.mode == "noise" and not mod.training):
                return plain(x, *args, **kwargs)
            w = mod.weight
            if self.mode == "quantized":
                return _call_with_weight(mod, x, fake_quantize(w, self.params.bits, per_channel).to(w.dtype))
            key = f"quant_noise/{name}/{self.step}"
            noise = quant_noise(w.detach(), self.params.bits, self.seed, key, self.params.noise, per_channel)
            if self.probe is not None and self.probe.get("deltas") is not None:
                self.probe["deltas"].append(quant_step(w, self.params.bits, per_channel).double().mean())
            return _call_with_weight(mod, x, w + noise)

        mod.forward = forward

    # -- events -----------------------------------------------------------------------
    def on_train_start(self, ctx: HookContext) -> None:
        self.step = ctx.step

    def _reporting(self, ctx: HookContext) -> bool:
        return bool(self.params.report_every) and (ctx.step + 1) % self.params.report_every == 0

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        if ctx.micro_step == 0 and self._reporting(ctx):
            self.probe = {"input": batch["input"].detach(), "target": batch["target"].detach()}
        return terms

    def after_step(self, ctx: HookContext) -> None:
        if self.probe is not None:
            self._report(ctx)
            self.probe = None
        self.step = ctx.step  # the next step's noise

    @torch.no_grad()
    def _report(self, ctx: HookContext) -> None:
        b = self.probe
        n = valid_counts(b["target"]).to(F64)
        sums = []
        for mode in ("noise", "clean", "quantized"):
            self.mode = mode
            b["deltas"] = [] if mode == "noise" else None
            try:
                with buffers_unchanged(ctx.model):  # a report must not move BatchNorm's statistics
                    out = ctx.model(b["input"])
            finally:
                self.mode = "noise"
            sums.append((per_sample_loss(out, b["target"]).to(F64) * n).sum())
            if mode == "noise":
                deltas = torch.stack(b["deltas"]).mean() if b["deltas"] else torch.zeros((), dtype=F64)
        release_gathered(ctx.model)
        local = torch.stack([*sums, n.sum()]).to(F64)
        glob = ctx.comm.all_reduce(local).cpu()
        noisy, clean, quant = (glob[:3] / glob[3]).tolist()
        prefix = self.params.metrics_prefix or self.name
        self.values = {f"{prefix}/noisy_loss": noisy, f"{prefix}/clean_loss": clean,
                       f"{prefix}/quantized_loss": quant, f"{prefix}/quantization_gap": quant - clean,
                       f"{prefix}/step_size": float(deltas)}

    def metrics(self) -> dict[str, float]:
        return dict(self.values)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "values": dict(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state.get("seed", self.seed)
        self.values = dict(state.get("values", {}))
