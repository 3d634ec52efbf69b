"""`nested_dropout`: nested dropout on the penultimate feature (Chen et al., "Compressing
Features for Learning with Noisy Labels", spec regularizers.md section 9).

A forward pre-hook on `module` (default the Llama's `output` head; a classifier's last
Linear in a vision model) keeps the first j features of its input and zeroes the rest (no
rescaling), with one j per global batch drawn from p(j) ∝ exp(-((j - mu) / sigma)^2),
j = 1..D. The draw is keyed by (seed, optimizer step) (spec P6): every rank and every
micro-batch of a step use the same j with no communication, and a resumed run redraws it.
Only in training mode; at evaluation the features pass unchanged unless `eval_keep` is
set (the reference picks j* on validation data and keeps that mask at test time).
sigma has per-dataset reference values (10 for CIFAR-10, 100 for CIFAR-100 / Clothing1M /
ANIMAL-10N) and no general default: required. Installed in `prepare_model` (before
sharding); the pre-hook sees the full feature vector of each token under every strategy.
Metrics: `keep` (j of the last step), `keep_fraction` (j / D).
"""
from __future__ import annotations

import torch
from pydantic import Field

from distreg.hooks.base import Hook, HookContext
from distreg.hooks.registry import register
from distreg.regularizers import nested_dropout, nested_dropout_keep


@register
class NestedDropout(Hook):
    name = "nested_dropout"

    class Params(Hook.Params):
        sigma: float = Field(gt=0, description="half-Gaussian width (reference 10 or 100; required)")
        mu: float = 0.0
        module: str = Field("output", description="the module whose input is the feature vector")
        seed: int | None = Field(None, description="draw seed (default: train.seed)")
        eval_keep: int | None = Field(None, gt=0, description="features kept at evaluation (default: all)")
        metrics_prefix: str | None = None

    params: "NestedDropout.Params"

    def __init__(self, params):
        super().__init__(params)
        self.seed = params.seed if params.seed is not None else torch.initial_seed()
        self.keep: int | None = None
        self.dim: int | None = None

    def prepare_model(self, model, ctx: HookContext) -> None:
        try:
            target = model.get_submodule(self.params.module)
        except AttributeError as e:
            raise ValueError(f"nested_dropout: no module {self.params.module!r} in the model") from e

        def pre_hook(mod, args):
            h = args[0]
            dim = h.shape[-1]
            if mod.training:
                keep = nested_dropout_keep(self.seed, ctx.step, dim, self.params.sigma, self.params.mu)
                self.keep, self.dim = keep, dim
            elif self.params.eval_keep is not None:
                keep = min(self.params.eval_keep, dim)
            else:
                return None
            return (nested_dropout(h, keep), *args[1:])

        target.register_forward_pre_hook(pre_hook)

    def metrics(self) -> dict[str, float]:
        if self.keep is None:
            return {}
        prefix = self.params.metrics_prefix or self.name
        return {f"{prefix}/keep": float(self.keep), f"{prefix}/keep_fraction": self.keep / self.dim}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "keep": self.keep, "dim": self.dim}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state.get("seed", self.seed)
        self.keep, self.dim = state.get("keep"), state.get("dim")
