"""ELR and PS-KD target / loss math (spec `methods/regularizers.md` §3, §4).

Pure functions (tensors in, tensors out) plus two store-driven step helpers
(`elr_step`, `pskd_step`) that do the read → compute → write cycle on a
`ShardedSampleStore`; those are collective (every rank calls them together).

Batch means follow spec P1: ``global_mean`` returns ``W · Σ_{B_r} / N_g`` so that the
rank-average of the returned losses (and of their gradients) equals the single-process
value on the global batch, also for uneven local batch sizes. With ``comm=None`` (or world
size 1) every function is the plain single-process formula.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distreg.reweighting.store import ShardedSampleStore
from distreg.reweighting.weights import global_mean
from distreg.runtime.comm import Comm

__all__ = [
    "ELR_PRESETS",
    "elr_loss",
    "elr_probs",
    "elr_regularizer",
    "elr_step",
    "elr_target_update",
    "pskd_alpha",
    "pskd_loss",
    "pskd_step",
    "pskd_targets",
]

# --------------------------------------------------------------------------------- ELR
ELR_PRESETS: dict[str, dict[str, float]] = {
    "cifar10": {"beta": 0.7, "lam": 3.0},        # symmetric noise (also ELR+ Clothing1M/WebVision)
    "cifar100": {"beta": 0.9, "lam": 7.0},
    "cifar10_asym": {"beta": 0.9, "lam": 1.0},
}
"""ELR (β, λ) from the reference configs (shengliu66/ELR). Defaults below = ``cifar10``."""


def elr_probs(logits: torch.Tensor, clamp: float = 1e-4) -> torch.Tensor:
    """``clamp(softmax(z), ε, 1−ε)`` as in the ELR reference (gradient flows through)."""
    return torch.clamp(F.softmax(logits.float(), dim=-1), clamp, 1.0 - clamp)


def elr_target_update(targets: torch.Tensor, probs: torch.Tensor, beta: float = 0.7) -> torch.Tensor:
    """Temporal ensembling ``t ← β·t + (1−β)·p̂`` with ``p̂ = stopgrad(p)/Σ_c stopgrad(p)``
    (the clamped probabilities renormalised). Returns the new (detached) targets."""
    p = probs.detach()
    return beta * targets.to(p.dtype) + (1.0 - beta) * (p / p.sum(dim=-1, keepdim=True))


def elr_regularizer(probs: torch.Tensor, targets: torch.Tensor, valid_mask: torch.Tensor | None = None,
                    comm: Comm | None = None, *, lam: float = 3.0, scale_by_world: bool = True) -> torch.Tensor:
    """``λ · mean_{B_g} log(1 − ⟨t_i, p_i⟩)`` with ``t`` constant (≤ 0; minimising it pulls
    predictions towards the running targets). P1 global mean."""
    per = torch.log(1.0 - (targets.detach().to(probs.dtype) * probs).sum(dim=-1))
    return lam * global_mean(per, valid_mask, comm, scale_by_world=scale_by_world)


def elr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
             valid_mask: torch.Tensor | None = None, comm: Comm | None = None, *, beta: float = 0.7,
             lam: float = 3.0, clamp: float = 1e-4, scale_by_world: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """ELR loss ``CE(z, y) + λ·R`` for one batch whose stored targets are ``targets``.

    The targets are updated BEFORE the regulariser (reference order). Returns
    ``(loss, new_targets, {"ce", "reg"})``; ``ce``/``reg`` are detached and in the same
    per-rank convention as ``loss`` (their rank-mean is the global value). CE uses the raw
    logits and the (possibly noisy) hard labels."""
    p = elr_probs(logits, clamp)
    t_new = elr_target_update(targets, p, beta)
    ce = global_mean(F.cross_entropy(logits.float(), labels, reduction="none"), valid_mask, comm,
                     scale_by_world=scale_by_world)
    reg = elr_regularizer(p, t_new, valid_mask, comm, lam=lam, scale_by_world=scale_by_world)
    return ce + reg, t_new, {"ce": ce.detach(), "reg": reg.detach()}


def elr_step(store: ShardedSampleStore, indices: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
             valid_mask: torch.Tensor | None = None, *, beta: float = 0.7, lam: float = 3.0,
             clamp: float = 1e-4, scale_by_world: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Collective ELR step on a target store: read ``t[indices]``, compute `elr_loss`,
    write the new targets (padded samples, ``valid_mask`` False, are not written).
    The write happens now, before backward; it is detached so the order does not matter."""
    t = store.read(indices).to(logits.device)
    loss, t_new, parts = elr_loss(logits, labels, t, valid_mask, store.comm, beta=beta, lam=lam, clamp=clamp,
                                  scale_by_world=scale_by_world)
    store.write(indices, t_new, valid_mask)
    return loss, parts


# -------------------------------------------------------------------------------- PS-KD
def pskd_alpha(epoch: int, num_epochs: int, alpha_T: float = 0.8) -> float:
    """``α = α_T · (epoch + 1) / num_epochs`` for a 0-based ``epoch`` (the reference code;
    the paper's ``α_t = α_T · t/T`` with 1-based ``t``). Clamped at 0 from below."""
    if num_epochs <= 0:
        raise ValueError(f"num_epochs must be > 0, got {num_epochs}")
    return max(0.0, alpha_T * (epoch + 1) / num_epochs)


def pskd_targets(labels: torch.Tensor, prev_probs: torch.Tensor | None, alpha: float,
                 num_classes: int | None = None) -> torch.Tensor:
    """Soft targets ``(1 − α)·onehot(y) + α·P_prev``; ``prev_probs=None`` (first epoch, where
    the reference sets ``P ← onehot(y)``) gives the one-hot targets."""
    if num_classes is None:
        if prev_probs is None:
            raise ValueError("num_classes is required when prev_probs is None")
        num_classes = prev_probs.shape[-1]
    onehot = F.one_hot(labels.long(), num_classes).float()
    if prev_probs is None:
        return onehot
    return (1.0 - alpha) * onehot + alpha * prev_probs.detach().float()


def pskd_loss(logits: torch.Tensor, soft_targets: torch.Tensor, valid_mask: torch.Tensor | None = None,
              comm: Comm | None = None, *, scale_by_world: bool = True) -> torch.Tensor:
    """Soft-target cross-entropy ``mean_{B_g} Σ_c −ỹ_c log softmax(z)_c`` (P1 global mean)."""
    per = -(soft_targets.detach().float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    return global_mean(per, valid_mask, comm, scale_by_world=scale_by_world)


def pskd_step(store: ShardedSampleStore, indices: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
              epoch: int, num_epochs: int, valid_mask: torch.Tensor | None = None, *, alpha_T: float = 0.8,
              scale_by_world: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective PS-KD step on a prediction store (width = num_classes): read the previous
    epoch's predictions (skipped at epoch 0, where targets are one-hot), build targets, loss,
    then write ``softmax(z).detach()`` for the next epoch. Returns ``(loss, soft_targets)``.

    Writing before backward is equivalent to the reference's after-step write because each
    index is read once per epoch and all reads of a step precede its writes."""
    alpha = pskd_alpha(epoch, num_epochs, alpha_T)
    prev = store.read(indices).to(logits.device) if epoch > 0 else None
    targets = pskd_targets(labels, prev, alpha, store.width)
    loss = pskd_loss(logits, targets, valid_mask, store.comm, scale_by_world=scale_by_world)
    store.write(indices, F.softmax(logits.detach().float(), dim=-1), valid_mask)
    return loss, targets
