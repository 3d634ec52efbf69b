"""SORSA cores (spec regularizers.md section 6; Cao, arXiv:2409.00055; reference
Gunale0926/SORSA `sorsalib/src/sorsa/layer.py`): the SVD split of a pretrained weight into a
trainable principal part and a frozen residual, the orthonormal regulariser with its
closed-form gradient, and the merge back into a plain weight.

Naming follows the spec and the reference (which keeps the names in checkpoints):
for W [out, in] = U diag(sigma) V^T,
  B = U[:, :r]   [out, r]   ("sorsa_B")
  S = sigma[:r]  [r]        ("sorsa_S")
  A = V[:, :r]^T [r, in]    ("sorsa_A")
  W_res = W - s * B diag(S) A   (frozen),   s = alpha / r, or 1 without alpha.

Regulariser (non-squared Frobenius norms, averaged over the 2L matrices, [CODE] `calc_ortho`):
  L_orth = 1 / (2L) * sum_layers ( ||A A^T - I_r||_F + ||B^T B - I_r||_F ).
Both Grams are r x r. `orth_norm` gives one term and its gradient; for B it also works from
a block of whole rows of B with the r x r Gram all-reduced ("replicated" convention of
`_dist.py`: same value on every rank, each rank gets its exact rows of the full gradient).
A's Gram couples whole rows of A (r x in), so A is taken whole (the hook gathers it: r x in
is small, and row shards along r cannot form A A^T from local products).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distreg.regularizers._dist import active
from distreg.runtime.comm import Comm

F64 = torch.float64


@dataclass
class SvdSplit:
    """The principal rank-r factors and the residual of one weight (float64 unless cast)."""

    A: torch.Tensor  # [r, in]
    S: torch.Tensor  # [r]
    B: torch.Tensor  # [out, r]
    residual: torch.Tensor  # [out, in]


def svd_split(weight: torch.Tensor, rank: int, scale: float = 1.0) -> SvdSplit:
    """Thin SVD in float64, the `rank` largest singular triplets as (A, S, B) and
    W_res = W - scale * B diag(S) A, so that W_res + scale * B diag(S) A = W.

    Signs are made canonical (the largest-magnitude entry of each column of B is positive,
    A's row flipped with it) so that the split does not depend on the LAPACK build; the
    product B diag(S) A is unaffected. `scale` (alpha / r) only enters the residual: the
    factors are the plain singular vectors and values, as in the reference.
    """
    if weight.dim() != 2:
        raise ValueError(f"sorsa: weight must be a matrix [out, in], got shape {tuple(weight.shape)}")
    limit = min(weight.shape)
    if not 0 < rank <= limit:
        raise ValueError(f"sorsa: rank {rank} must be in 1..min(out, in) = {limit} for a weight of shape "
                         f"{tuple(weight.shape)}")
    w = weight.detach().to(F64)
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    b, s, a = u[:, :rank], sigma[:rank], vh[:rank]
    pivot = b.abs().argmax(dim=0)
    sign = torch.sign(b[pivot, torch.arange(rank)])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    b, a = b * sign, a * sign[:, None]
    residual = w - scale * principal(a, s, b)
    return SvdSplit(a.contiguous(), s.contiguous(), b.contiguous(), residual)


def principal(A: torch.Tensor, S: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * B diag(S) A  ([out, in])."""
    return scale * ((B * S) @ A)


def merge(residual: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor,
          scale: float = 1.0) -> torch.Tensor:
    """The plain weight W = W_res + scale * B diag(S) A, formed in float64 and returned in
    the residual's dtype (what inference loads in place of the adapted layer)."""
    w = residual.to(F64) + principal(A.to(F64), S.to(F64), B.to(F64), scale)
    return w.to(residual.dtype)


def gram(m: torch.Tensor, side: str) -> torch.Tensor:
    """M M^T ("rows", for A) or M^T M ("cols", for B) in float64. For "cols" a block of
    whole rows gives this block's partial sum of the full Gram."""
    m = m.to(F64)
    if side == "rows":
        return m @ m.t()
    if side == "cols":
        return m.t() @ m
    raise ValueError(f"side must be 'rows' or 'cols', got {side!r}")


def orth_norm(m: torch.Tensor, side: str, full_gram: torch.Tensor | None = None,
              comm: Comm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, gradient) of ||G - I||_F, G = M M^T ("rows", A) or M^T M ("cols", B).

    Gradient [DERIVED, checked against autograd and finite differences in the tests]:
      rows: d/dM = 2 (G - I) M / ||G - I||,   cols: d/dM = 2 M (G - I) / ||G - I||
    ((G - I) is symmetric), and 0 where the norm is exactly 0 (autograd's convention for
    the norm at 0). Note the norm is not squared: its gradient has size ~2||M|| even when
    M is nearly orthonormal, so near init its direction is set by round-off (spec quirk).

    Sharded B ("cols" only): `m` is this rank's block of whole rows; pass the completed Gram
    as `full_gram` (sum of every rank's `gram(block, "cols")`) or a `comm` to all-reduce it
    here. The gradient returned is this block's rows of the full gradient.
    """
    m = m.to(F64)
    if full_gram is None:
        full_gram = gram(m, side)
        if active(comm):
            if side != "cols":
                raise ValueError("orth_norm: a sharded M is supported for side 'cols' only (gather A whole)")
            full_gram = comm.all_reduce(full_gram)
    diff = full_gram.to(F64) - torch.eye(full_gram.shape[0], dtype=F64, device=full_gram.device)
    value = torch.linalg.matrix_norm(diff)
    if value == 0:
        return value, torch.zeros_like(m)
    grad = (2.0 / value) * (diff @ m if side == "rows" else m @ diff)
    return value, grad


def orth_loss(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> torch.Tensor:
    """L_orth = 1 / (2L) * sum_l (||A_l A_l^T - I|| + ||B_l^T B_l - I||) on whole matrices,
    differentiable (the reference formula; the hook uses `orth_norm` for the gradients)."""
    if len(As) != len(Bs) or not As:
        raise ValueError(f"orth_loss: needs one B per A and at least one layer, got {len(As)} A and {len(Bs)} B")
    total = torch.zeros((), dtype=F64, device=As[0].device)
    for a, b in zip(As, Bs):
        eye = torch.eye(a.shape[0], dtype=F64, device=a.device)
        total = total + torch.linalg.matrix_norm(a.to(F64) @ a.to(F64).t() - eye)
        total = total + torch.linalg.matrix_norm(b.to(F64).t() @ b.to(F64) - eye)
    return total / (2 * len(As))
