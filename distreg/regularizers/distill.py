"""Distillation cores: MEAL V2 ensemble soft targets, the soft-target cross-entropy, the
MEAL V2 discriminator term, and the soft-hard label adaptation of FerKD as far as it is
confirmed (spec regularizers.md section 13).

Everything is per row (class dimension last, any leading shape: [N, C] for classification,
[B, T, V] for token models), with no state and no collectives: a hook turns rows into its
per-sample losses and the Trainer's reduction weights make the batch mean global (P1).

MEAL V2 [CODE: szq0214/MEAL-V2 @59e6bca, `extensions/teacher_wrapper.py`,
`extensions/kd_loss.py`, `loss.py`, `models/discriminator.py`, `train.py`]:
- target ``p_T = (1/m) sum_k softmax(T_k(x))`` at temperature 1 (no temperature in the code);
- loss ``-sum_c p_T,c log softmax(z_S)_c`` per sample, batch mean; no hard labels;
- discriminator "real" input: the teacher *logit* average ``z_T = (1/m) sum_k T_k(x)``;
  D = three 1x1 convs C -> C/8 -> C/64 -> 2 with a ReLU after every layer (the last too),
  trained with BCEWithLogits against [1, 0] for student rows and [0, 1] for teacher rows,
  mean over the 2N x 2 entries.

FerKD [PAPER abstract only; spec 13.3, open item 3]: "calibrates the less-confident regions
to be the context using softened hard groundtruth labels". Confirmed: *some* rows keep the
teacher's soft label and the others get a softened one-hot of the ground truth. NOT
confirmed (paper section 3 could not be read): which confidence measure selects the rows,
the band edges (thresholds or quantiles), whether the easiest crops are dropped, and the
softening. `soft_hard_adapt` therefore takes the selection as an explicit mask and the
softening as standard label smoothing ``(1 - eps) onehot(y) + eps / C`` with a caller-given
``eps`` (the spec's transform test vector); it does not decide which rows are "hard".
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _stack(teacher_logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """[m, ..., C] from a list of equally shaped teacher outputs (or an already stacked tensor)."""
    if isinstance(teacher_logits, torch.Tensor):
        return teacher_logits
    if not teacher_logits:
        raise ValueError("at least one teacher output is needed")
    shapes = {tuple(t.shape) for t in teacher_logits}
    if len(shapes) != 1:
        raise ValueError(f"teacher outputs differ in shape: {sorted(shapes)}")
    return torch.stack(list(teacher_logits))


def ensemble_soft_targets(teacher_logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """MEAL V2 target: the mean over teachers of softmax(logits) (temperature 1), at least
    float32. `teacher_logits`: a list of [..., C] tensors or one [m, ..., C] tensor."""
    return F.softmax(_fp32(_stack(teacher_logits)), dim=-1).mean(0)


def ensemble_logits(teacher_logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The mean teacher logits (MEAL V2's discriminator input for the teacher side)."""
    return _fp32(_stack(teacher_logits)).mean(0)


def soft_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row ``-sum_c t_c log softmax(z_S)_c`` (MEAL V2's KLLoss before its batch mean; it
    equals KL(t || p_S) + H(t), the same gradient as the KL). Computed in float32 at least."""
    if student_logits.shape != targets.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and targets {tuple(targets.shape)} differ")
    return -(targets * F.log_softmax(_fp32(student_logits), dim=-1)).sum(-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per row ``-sum_c p_c log p_c`` (0 log 0 = 0)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


class MealDiscriminator(nn.Module):
    """MEAL V2's discriminator on logits: 1x1 convs C -> C//K -> C//K^2 -> 2 (K = 8 in the
    reference's `create_discriminator_criterion`), written as linear layers (a 1x1 conv on a
    [N, C, 1, 1] input is a linear map), with the reference's ReLU after every layer,
    including the last (so its logits are >= 0). Rows in, [..., 2] out."""

    def __init__(self, num_classes: int, reduction: int = 8):
        super().__init__()
        h1, h2 = num_classes // reduction, num_classes // reduction // reduction
        if h2 < 1:
            raise ValueError(f"discriminator: {num_classes} classes leave no hidden units at reduction {reduction} "
                             f"(C // {reduction}^2 = 0)")
        self.fc1 = nn.Linear(num_classes, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, 2)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(logits))
        x = F.relu(self.fc2(x))
        return F.relu(self.fc3(x))


def discriminator_loss(d_student: torch.Tensor, d_teacher: torch.Tensor) -> torch.Tensor:
    """Per row: the MEAL V2 BCEWithLogits term of one sample, i.e. the mean of its four
    entries (student row against [1, 0], teacher row against [0, 1]); the batch mean of
    this equals the reference's mean over the 2N x 2 matrix."""
    if d_student.shape[-1] != 2 or d_teacher.shape != d_student.shape:
        raise ValueError(f"discriminator outputs must both be [..., 2], got {tuple(d_student.shape)} "
                         f"and {tuple(d_teacher.shape)}")
    s, t = _fp32(d_student), _fp32(d_teacher)
    real = torch.tensor([1.0, 0.0], dtype=s.dtype, device=s.device).expand_as(s)
    fake = torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device).expand_as(t)
    bce = F.binary_cross_entropy_with_logits
    return (bce(s, real, reduction="none").sum(-1) + bce(t, fake, reduction="none").sum(-1)) / 4


def smoothed_onehot(labels: torch.Tensor, num_classes: int, epsilon: float) -> torch.Tensor:
    """``(1 - eps) onehot(y) + eps / C`` per row (float32)."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    onehot = F.one_hot(labels.long(), num_classes).to(torch.float32)
    return onehot * (1.0 - epsilon) + epsilon / num_classes


def soft_hard_adapt(soft: torch.Tensor, labels: torch.Tensor, calibrate: torch.Tensor,
                    epsilon: float) -> torch.Tensor:
    """FerKD's soft-hard label adaptation, mechanism only: rows where `calibrate` is True get
    the softened ground truth ``smoothed_onehot(y, C, eps)``, the others keep `soft`. Which
    rows to calibrate is the caller's choice (FerKD's own mining rule is unconfirmed)."""
    if calibrate.shape != soft.shape[:-1] or labels.shape != soft.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} and mask {tuple(calibrate.shape)} must match the rows "
                         f"of {tuple(soft.shape)}")
    hard = smoothed_onehot(labels, soft.shape[-1], epsilon).to(soft.dtype)
    return torch.where(calibrate.unsqueeze(-1), hard, soft)
