"""`self_distill_gt`: one round of self-distillation with ground-truth weighting (core and
sources in `distreg.regularizers.self_distill_gt`); `distreg self-distill` runs the rounds.

The teacher is the previous round's model, built whole, frozen and in eval mode on every
rank from its checkpoint with the `distillation` hook's loader (`teacher: {checkpoint,
config, set}`; config null = the student's architecture). The loss replaces the Trainer's
cross-entropy: per row (token or image) `soft_ce` or `mse_softmax` against
q = α·onehot(y) + (1-α)·softmax(teacher), a sample's loss the mean over its valid rows, so the
Trainer's reduction weights make the step loss the global mean (nothing is communicated for
the loss: each rank's teacher sees only its own samples, hence rank invariance).
Metrics (one 3-float all-reduce per step): `loss`, `ce_labels` (the student's plain
cross-entropy on the labels), `teacher_acc`.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from distreg.hooks.base import HookContext, LossTerms
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import F64, StatHook, per_sample_mean, valid_targets
from distreg.hooks.regularizers.distillation import TeacherSpec, build_teacher, student_model_config, teacher_paths
from distreg.regularizers.self_distill_gt import mixed_targets, mse_softmax_rows, soft_ce_rows

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@register
class SelfDistillGT(StatHook):
    name = "self_distill_gt"
    replaces_loss = True

    @classmethod
    def resolve_paths(cls, params: dict, resolve) -> dict:
        return {**params, "teacher": teacher_paths(params["teacher"], resolve)} if "teacher" in params else params

    class Params(StatHook.Params):
        teacher: TeacherSpec = Field(description="the previous round's checkpoint (and config; null: the student's)")
        alpha: float = Field(ge=0, le=1, description="weight of the ground truth in the targets (required)")
        loss: Literal["soft_ce", "mse_softmax"] = Field(
            "soft_ce", description="cross-entropy with the mixed soft targets, or the reference's MSE on softmax")
        teacher_dtype: Literal["fp32", "bf16"] = "fp32"

    params: "SelfDistillGT.Params"

    def __init__(self, params):
        super().__init__(params)
        self.teacher: nn.Module | None = None  # never a submodule of the student
        self._device: torch.device | None = None

    def prepare_model(self, model: nn.Module, ctx: HookContext) -> None:
        self.teacher = build_teacher(f"{self.name}: teacher", self.params.teacher, student_model_config(ctx, model),
                                     _DTYPES[self.params.teacher_dtype])

    @torch.no_grad()
    def teacher_logits(self, inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError(f"{self.name}: the teacher is loaded in prepare_model, which has not run")
        if self._device != device:
            self.teacher.to(device)
            self._device = device
        dtype = _DTYPES[self.params.teacher_dtype]
        return self.teacher(inputs.to(dtype) if inputs.is_floating_point() else inputs)

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        z_t = self.teacher_logits(batch["input"], out.device)
        if z_t.shape != out.shape:
            raise ValueError(f"{self.name}: the teacher gives logits {tuple(z_t.shape)}, the student {tuple(out.shape)}")
        labels, valid = valid_targets(batch)
        q = mixed_targets(labels, z_t, self.params.alpha)
        rows = soft_ce_rows(out, q) if self.params.loss == "soft_ce" else mse_softmax_rows(out, q)
        terms.per_sample = per_sample_mean(rows, valid)
        if not ctx.metrics_on():
            return terms  # statistics for the logging step only
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(out.float().flatten(0, -2), labels.flatten(), reduction="none")
            acc = (z_t.argmax(-1) == labels).float()
            w = terms.weight.detach().to(F64)
            per_row = [rows, ce.view(labels.shape), acc]
            self.accumulate(torch.stack([(w * per_sample_mean(r.to(F64), valid)).sum() for r in per_row]))
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        if not ctx.metrics_on():
            return
        self.values = dict(zip(["loss", "ce_labels", "teacher_acc"], self.reduced(ctx, 3).tolist()))
