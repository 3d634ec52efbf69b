"""`hpm`: Hard Patches Mining for masked image modeling (Wang et al., CVPR 2023; core and
sources in distreg.regularizers.hpm). Needs `model.kind: mae`.

Why a hook on the `mae` model kind (not a model kind of its own): the MAE trains alone
with random masks; HPM adds three separable things, each a hook event:
- `prepare_model`: the loss-prediction branch (`MaskedAutoencoder.add_loss_predictor`), a
  model submodule built before the strategy wraps the model, so DDP replicates, FSDP2 /
  ZeRO-3 shard, the optimizer updates and checkpoints save it like any other parameter.
- `prepare_batches` (once per step, before the first forward): the masks. The reference
  predicts every patch's loss with an EMA copy of the model (the *teacher*) on the
  unmasked image, masks the n_hard patches it predicts hardest and the rest at random
  (keyed uniforms: (seed, step, global sample index, patch), as the trainer's random mask,
  so any sharding draws the same masks). The EMA weights are held as each rank's slice of
  every parameter (`ParamShard`), so the teacher forward is the strategy's own forward
  with the EMA slices written in and the live ones written back after (exact: fp32 copies;
  FSDP2's root is resharded after the teacher forward, under ZeRO-3 the writes release the
  gathered parameters; the training forward re-gathers the live weights).
  Cost: one no-grad forward per micro-batch on all L patches, two writes of the local
  parameter slices per step; none while n_hard = 0 (the schedule's first steps).
- `loss`: the relative (ranking) loss of the predicted vs the actual (detached) per-patch
  reconstruction losses over the masked patches, per sample, added as a penalty with
  `weight` (reference: 1, plain sum with the reconstruction loss); it trains the predictor
  branch and, as in the reference, reaches the encoder through the decoder input.
- `after_step`: the EMA update ema = d·ema + (1 - d)·w on the local slices (elementwise:
  rank-invariant), d from `ema_decay`.

Everything per patch and per pair is per sample; the schedule and EMA decay are functions
of the global step. So 1 or N ranks, DDP / FSDP2 / ZeRO-3 compute the same masks, losses
and updates (tests/hooks/test_hpm_hook.py).

Confirmed from the reference code and defaulted here: the hard-fraction cap 0.5
(`max_hard_fraction`), the ranking loss and its weight 1, the EMA decays 0.999 -> 0.9999,
the mask ratio 0.75 (`model.mae.mask_ratio`). Required, no default (the reference counts
them in epochs, whose length in steps depends on the data set and batch): `schedule_steps`
(reference: the whole run, 800 epochs for ViT-B) and `ema_ramp_steps` (reference: 100
epochs). Not offered: the reference's feature-target variants (CLIP / DINO) and UM-MAE's
secondary visible masking (`vis_mask_ratio`, 0 in the reference script).

Metrics (logging steps only: one 6-float all-reduce after the backward, none otherwise):
`hpm/reconstruction_loss` (mean over samples of the masked-patch loss), `hpm/ranking_loss`,
`hpm/ranking_accuracy` (correctly ordered untied pairs of masked patches, all ranks; 0.5 is
chance), `hpm/masked_hard_fraction` (masked patches chosen by predicted loss / masked
patches), `hpm/ema_decay`.

State (checkpoint, per rank): the EMA slices (shape-checked on load: resume needs the same
strategy and world size, as the model's own shards do) and the last metric values.
"""
from __future__ import annotations

import torch
from pydantic import Field

from distreg.hooks.base import HookContext, LossTerms
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import F64, StatHook, release_gathered
from distreg.models.mae import MaskedAutoencoder, mask_uniforms, num_visible
from distreg.regularizers.hpm import (ema_decay, hard_fraction, masked_values, num_hard, ranking_counts,
                                      ranking_loss, select_visible)

STAT_KEYS = ("reconstruction_loss", "ranking_loss", "correct_pairs", "pairs", "hard_fraction", "n")


@register
class HardPatchesMining(StatHook):
    name = "hpm"

    class Params(StatHook.Params):
        schedule_steps: int = Field(gt=0, description="optimizer steps over which the hard fraction grows "
                                                      "linearly to max_hard_fraction (reference: the whole run; "
                                                      "required)")
        ema_ramp_steps: int = Field(gt=0, description="optimizer steps over which the EMA teacher decay goes "
                                                      "from ema_decay_start to ema_decay_end (reference: 100 "
                                                      "epochs; required)")
        max_hard_fraction: float = Field(0.5, ge=0, le=1, description="share of masked patches chosen by "
                                                                      "predicted loss at the end (reference 0.5)")
        weight: float = Field(1.0, ge=0, description="ranking loss weight (reference 1)")
        ema_decay_start: float = Field(0.999, ge=0, le=1)
        ema_decay_end: float = Field(0.9999, ge=0, le=1)
        seed: int | None = Field(None, description="mask and predictor-init seed (default: train.seed)")

    params: "HardPatchesMining.Params"

    def __init__(self, params):
        super().__init__(params)
        self.seed = params.seed if params.seed is not None else torch.initial_seed()
        self.ema: list[torch.Tensor] | None = None  # this rank's slice of every parameter
        self.mae: MaskedAutoencoder | None = None
        self.mask_ratio = 0.75
        self._hard = 0.0  # share of this step's masked patches chosen by predicted loss

    # -- wiring ---------------------------------------------------------------------------
    def prepare_model(self, model, ctx: HookContext) -> None:
        if not isinstance(model, MaskedAutoencoder):
            raise ValueError(f"hpm: needs model.kind=mae (the model is a {type(model).__name__})")
        cfg = ctx.model_config
        if cfg is not None:
            self.mask_ratio = cfg.mae.mask_ratio
        model.add_loss_predictor(self.seed + 1)
        self.mae = model

    def _ensure_ema(self, ctx: HookContext) -> None:
        if self.ema is None:  # the teacher starts as a copy of the model (timm ModelEma)
            self.ema = [s.data().detach().clone().float() for s in ctx.local_shards()]

    # -- masks ----------------------------------------------------------------------------
    def prepare_batches(self, ctx: HookContext, micro_batches: list[dict]) -> list[dict]:
        self._ensure_ema(ctx)
        n = self.mae.num_patches
        n_keep = num_visible(n, self.mask_ratio)
        k = num_hard(n - n_keep, hard_fraction(ctx.step, self.params.schedule_steps, self.params.max_hard_fraction))
        self._hard = k / (n - n_keep)  # the realised share (int rounding), for the metric
        # k = 0: the reference masks at random, and so does select_visible (no teacher forward)
        preds = self._teacher_predictions(ctx, micro_batches) if k else [None] * len(micro_batches)
        return [{**b, "visible": select_visible(p, mask_uniforms(self.seed, ctx.step, b["index"], n), n_keep, k)}
                for b, p in zip(micro_batches, preds)]

    @torch.no_grad()
    def _teacher_predictions(self, ctx: HookContext, micro_batches: list[dict]) -> list[torch.Tensor]:
        """The EMA teacher's predicted loss of every patch ([B, L] per micro-batch), the
        image unmasked (the reference's `visible_mask` of zeros)."""
        shards = ctx.local_shards()
        live = [s.data().detach().clone() for s in shards]
        for s, e, w in zip(shards, self.ema, live):
            s.write(e.to(w.dtype))
        try:
            return [ctx.model(b["input"])["loss_pred"].float() for b in micro_batches]
        finally:
            release_gathered(ctx.model)  # FSDP2 keeps the root's gathered (EMA) weights otherwise
            for s, w in zip(shards, live):
                s.write(w)

    # -- loss -----------------------------------------------------------------------------
    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        mask = out["mask"]
        n_masked = self.mae.num_patches - num_visible(self.mae.num_patches, self.mask_ratio)
        pred = masked_values(out["loss_pred"], mask, n_masked)
        target = masked_values(out["patch_loss"], mask, n_masked).detach()
        per_sample = ranking_loss(pred, target)
        # weights sum to 1 over the step (all ranks, micro-batches); the strategies average
        # over ranks and the trainer divides penalties by the micro-batch count
        scale = self.params.weight * ctx.world_size * ctx.grad_accum_steps
        terms.penalties[self.name] = scale * (terms.weight.detach().to(per_sample.dtype) * per_sample).sum()
        if ctx.metrics_due:
            with torch.no_grad():
                correct, pairs = ranking_counts(pred, target)
                recon = (out["patch_loss"] * mask).sum(dim=1) / mask.sum(dim=1)
                b = torch.tensor(float(len(per_sample)), dtype=F64, device=per_sample.device)
                self.accumulate(torch.stack([recon.double().sum(), per_sample.detach().double().sum(),
                                             correct.double().sum(), pairs.double().sum(), b * self._hard, b]))
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        if not ctx.metrics_due:
            return
        c = dict(zip(STAT_KEYS, self.reduced(ctx, len(STAT_KEYS)).tolist()))
        n = max(c["n"], 1.0)
        self.values = {"reconstruction_loss": c["reconstruction_loss"] / n, "ranking_loss": c["ranking_loss"] / n,
                       "ranking_accuracy": c["correct_pairs"] / max(c["pairs"], 1.0),
                       "masked_hard_fraction": c["hard_fraction"] / n,
                       "ema_decay": ema_decay(ctx.step, self.params.ema_decay_start, self.params.ema_decay_end,
                                              self.params.ema_ramp_steps)}

    # -- teacher --------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, ctx: HookContext) -> None:
        self._ensure_ema(ctx)
        d = ema_decay(ctx.step - 1, self.params.ema_decay_start, self.params.ema_decay_end,
                      self.params.ema_ramp_steps)
        for e, s in zip(self.ema, ctx.local_shards()):
            e.mul_(d).add_(s.data().detach().float(), alpha=1 - d)

    def plan_memory_bytes(self, total_local: int) -> int:
        """`distreg plan`: the EMA teacher, fp32, one per local parameter element (the plan's
        model lacks the loss-predictor branch, about the decoder's size, in both counts)."""
        return 4 * total_local

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "seed": self.seed,
                "ema": None if self.ema is None else [e.detach().cpu().clone() for e in self.ema]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seed = state.get("seed", self.seed)
        ema = state.get("ema")
        if ema is not None:
            self.ema = [e.clone() for e in ema]

    def on_train_start(self, ctx: HookContext) -> None:
        if self.ema is not None:  # a resumed teacher: its slices must match this rank's
            shards = ctx.local_shards()
            bad = [s.name for s, e in zip(shards, self.ema) if e.numel() != s.numel]
            if len(shards) != len(self.ema) or bad:
                raise ValueError(f"hpm: the checkpoint's EMA teacher does not match this run's parameter slices "
                                 f"({bad[:3] or 'parameter count'}): resume with the same strategy and world size")
            device = shards[0].data().device if shards else None
            self.ema = [e.to(device) for e in self.ema]
