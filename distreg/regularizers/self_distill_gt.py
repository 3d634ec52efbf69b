"""Self-distillation with ground-truth weighting (Borup & Andersen, "Even your Teacher Needs
Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation",
NeurIPS 2021; code: Kennethborup/self_distillation).

Round k trains a fresh model of the same architecture on targets that mix the ground truth
with the previous round's (frozen) model:

    q = α · onehot(y) + (1 - α) · softmax(f_{k-1}(x))

The reference's classification loss is `α·MSE(softmax(z), onehot(y)) + (1-α)·MSE(softmax(z),
softmax(t))` (`self_distiller.py`, MSE averaged over classes); that equals `MSE(softmax(z), q)`
plus a constant `α(1-α)·mean((onehot - softmax(t))²)`, so both have the same gradient
(`mse_softmax` here reports the mixture form). `soft_ce` is the cross-entropy with the soft
targets q (the issue's classification form). α = 1 is plain training on labels, α = 0 pure
self-distillation (Mobahi et al. 2020), whose repeated rounds over-regularise.

Not offered: the paper's closed-form optimal α (derived for kernel ridge regression; its
deep-learning estimate is in the paper's body, which we could not read) -- α is required.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mixed_targets(labels: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·onehot(labels) + (1 - α)·softmax(teacher_logits), float32 [..., C]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    p_t = torch.softmax(teacher_logits.float(), dim=-1)
    onehot = F.one_hot(labels, p_t.shape[-1]).to(p_t.dtype)
    return alpha * onehot + (1.0 - alpha) * p_t


def soft_ce_rows(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-Σ_c q_c log softmax(z)_c for every row."""
    return -(targets * torch.log_softmax(student_logits.float(), dim=-1)).sum(-1)


def mse_softmax_rows(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_c (softmax(z)_c - q_c)² for every row (the reference's MSE on probabilities)."""
    return ((torch.softmax(student_logits.float(), dim=-1) - targets) ** 2).mean(-1)
