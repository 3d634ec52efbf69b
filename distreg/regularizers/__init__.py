"""Regularizers, losses and gradient transforms: the pure functional cores.

Specs: ../shared/methods/regularizers.md (sections 2, 5, 7-12, 14-16) and the TRP section of
../shared/methods/sparsity-reweighting-ot.md. Every function is tensor in, tensor out, with
no state; collectives only through an optional `Comm` (nothing happens for `comm=None` or a
world-size-1 `Comm`). Distributed gradient conventions ("replicated" parameter terms vs
"partial" data terms) are described in `_dist.py` and named in each docstring.

- `losses`: StableMax CE, spherical Z-loss, PaLM logit z-loss, normalized softmax, TCM, CS-IB.
- `grad_ops`: ⊥Grad projection, Softmax-Collapse counters.
- `orthogonality`: soft orthogonality (whole or from row shards), conv-kernel orthogonality.
- `lowrank`: TRP energy-rank projection and nuclear subgradient (SVD, or Gram all-reduce).
- `group_sparsity`: WGSEF value, DC gap and proximal operator.
- `embedding`: DIN mini-batch-aware L2 (counts, global presence) and Dice.
- `wdr`: EQ-Net weight-distribution regulariser.
- `nested_dropout`: half-Gaussian nested dropout with a step-keyed draw.
- `hessian`: Hutchinson trace with index-keyed probes, finite-difference variants.
- `sorsa`: SORSA SVD split, orthonormal regulariser (value + closed-form gradient), merge.
- `distill`: teacher-ensemble soft targets and distillation losses (MEAL V2, FerKD).
"""
from distreg.regularizers.embedding import (
    batch_presence,
    dice,
    dice_batch_moments,
    dice_reference,
    feature_counts,
    mba_l2,
)
from distreg.regularizers.grad_ops import orthograd, softmax_collapse_counts
from distreg.regularizers.sorsa import SvdSplit, gram, orth_norm, principal, svd_split
from distreg.regularizers.sorsa import merge as sorsa_merge
from distreg.regularizers.sorsa import orth_loss as sorsa_orth_loss
from distreg.regularizers.group_sparsity import group_sq_norms, sparse_envelope, sparse_envelope_gap, wgsef_prox, wgsef_scale
from distreg.regularizers.hessian import (
    TraceEstimate,
    hutchinson_trace,
    hvp,
    rademacher,
    stability_ratio,
    vhv_from_gradients,
    vhv_from_losses,
)
from distreg.regularizers.losses import (
    cs_divergence,
    cs_ib_loss,
    cs_qmi,
    cs_qmi_normalized,
    gaussian_gram,
    normalized_softmax_logits,
    normalized_softmax_loss,
    normsoftmax_embedding,
    stablemax,
    stablemax_cross_entropy,
    stablemax_s,
    tcm_loss,
    z_loss_logit,
    z_loss_spherical,
)
from distreg.regularizers.lowrank import (
    LowRank,
    energy_rank,
    low_rank_project,
    low_rank_project_gram,
    nuclear_subgradient,
    trp_matrix,
    trp_unmatrix,
)
from distreg.regularizers.nested_dropout import nested_dropout, nested_dropout_keep, nested_dropout_probs
from distreg.regularizers.orthogonality import conv_orthogonality, soft_orthogonality, soft_orthogonality_grad
from distreg.regularizers.wdr import standardized_moments, wdr_loss

__all__ = [
    "stablemax_s", "stablemax", "stablemax_cross_entropy", "z_loss_spherical", "z_loss_logit",
    "normsoftmax_embedding", "normalized_softmax_logits", "normalized_softmax_loss", "tcm_loss",
    "gaussian_gram", "cs_divergence", "cs_qmi", "cs_qmi_normalized", "cs_ib_loss",
    "orthograd", "softmax_collapse_counts",
    "soft_orthogonality", "soft_orthogonality_grad", "conv_orthogonality",
    "LowRank", "energy_rank", "trp_matrix", "trp_unmatrix", "low_rank_project", "low_rank_project_gram",
    "nuclear_subgradient",
    "group_sq_norms", "sparse_envelope", "sparse_envelope_gap", "wgsef_prox", "wgsef_scale",
    "feature_counts", "batch_presence", "mba_l2", "dice_batch_moments", "dice", "dice_reference",
    "standardized_moments", "wdr_loss",
    "nested_dropout_probs", "nested_dropout_keep", "nested_dropout",
    "SvdSplit", "svd_split", "principal", "gram", "orth_norm", "sorsa_orth_loss", "sorsa_merge",
    "TraceEstimate", "rademacher", "hvp", "hutchinson_trace", "vhv_from_gradients", "vhv_from_losses",
    "stability_ratio",
]
