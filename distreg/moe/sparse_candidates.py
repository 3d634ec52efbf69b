"""Semi-smooth Newton for sparse OT on a per-token candidate set, verified on the dense
matrix (active-set screening; issue 14).

The optimal plan of the routing problem is sparse: a token's entry ``(i, j)`` is positive
only where ``X_ij = α_i + β_j − C_ij > 0``, a few experts per token. Each token therefore
keeps a candidate set of ``c`` experts (``J [..., n, c]``: its ``c`` largest ``β_j − C_ij``
under the warm-start potentials, the order of ``X`` in its row) and the Newton solve runs on
``[n, c]`` tensors instead of ``[n, m]`` ones: the dual restricted to the candidates, with
the column cap (``k`` largest positives of each expert) applied among them.

Exactness: at the candidate optimum one dense pass counts each row's positive ``X``. If no
row has a positive entry outside its candidates, the dense positive set *is* the candidate
positive set, so the dense column top-k selects the same entries (same values, same
canonical tie rule: see :func:`candidate_positive_topk`) and the dense plan equals the
candidate plan. A problem whose check fails is solved again from its candidate optimum
with twice as many candidates (the top ``2c`` of its current ``X`` per row), until it
passes (at ``c = m`` it is the dense problem and passes by construction). Problems of a
batch are verified and expanded independently (a batch gives each problem its result
alone); local scope only (global scope keeps the dense Newton of ``sparse_ot_plan``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distreg.moe.sparse_newton import _newton_dual_ascent


def column_sums(V: Tensor, J: Tensor, m: int) -> Tensor:
    """Per-expert sums ``[..., m]`` of candidate values ``V [..., n, c]`` at experts ``J``."""
    out = torch.zeros((*V.shape[:-2], m), dtype=V.dtype, device=V.device)
    return out.scatter_add_(-1, J.flatten(-2), V.flatten(-2))


def densify(V: Tensor, J: Tensor, m: int) -> Tensor:
    """``[..., n, m]`` matrix with the candidate values ``V`` at ``J`` and zeros elsewhere."""
    out = torch.zeros((*V.shape[:-1], m), dtype=V.dtype, device=V.device)
    return out.scatter_(-1, J, V)


def candidate_positive_topk(X: Tensor, J: Tensor, k: int | None, m: int) -> tuple[Tensor, Tensor]:
    """``[X]₊`` of candidate entries ``X [..., n, c]`` (expert ``J``) kept among the ``k``
    largest positives of their expert column, and its 0/1 indicator (``X``'s dtype).

    The rule of :func:`distreg.moe.ot_select._positive_topk_weights` on the dense matrix:
    a column with ``e`` positives beyond ``k`` drops its ``e`` smallest, exact ties
    dropping the lower token indices first. Here the positives of the binding columns
    are sorted by value, then stably by column (flat order = token order within a
    column, as a token holds each expert at most once), and each column drops its first
    ``e``: only the positives of binding columns (~``n``) are sorted."""
    Xp = X.clamp_min(0)
    W = Xp.sign()
    if k is None:
        return Xp, W
    excess = (column_sums(W, J, m) - k).clamp_min(0)  # [..., m]
    if not bool((excess > 0).any()):
        return Xp, W
    n, c = X.shape[-2:]
    problems = math.prod(X.shape[:-2])
    shift = torch.arange(problems, device=X.device).unsqueeze(-1) * m
    col = (J.reshape(problems, n * c) + shift).reshape(-1)  # column id over the batch
    ex = excess.reshape(-1)
    sel = ((W.reshape(-1) > 0) & (ex[col] > 0)).nonzero().squeeze(-1)
    order = torch.sort(Xp.reshape(-1)[sel], stable=True).indices
    order = order[torch.sort(col[sel][order], stable=True).indices]
    cols = col[sel][order]
    count = torch.bincount(cols, minlength=problems * m)
    rank = torch.arange(cols.numel(), device=X.device) - (count.cumsum(0) - count)[cols]
    keep = torch.ones_like(Xp).reshape(-1).index_fill_(0, sel[order[rank < ex[cols]]], 0).view_as(Xp)
    return Xp * keep, W * keep


def candidate_newton(C: Tensor, a: Tensor, b: Tensor, x0: list[Tensor], J: Tensor, scope, gamma: float,
                     kc: int | None, max_iter: int, tol: float):
    """Newton on the candidate sets ``J`` from ``x0 = [α, β]``, verified and expanded until
    no positive entry lies outside them. Returns ``(x, iterations, evaluations, stalled,
    γT dense, (objective, residual) at x, expansions)``."""
    m = C.shape[-1]
    batch = C.shape[:-2]
    frozen = torch.zeros(batch, dtype=torch.bool, device=C.device)
    x = x0
    it = nevals = expansions = 0
    stalled = torch.zeros_like(frozen)
    while True:
        Cc = C.gather(-1, J)
        Jf = J.flatten(-2)

        def reduced(x_):
            return x_[0].unsqueeze(-1) + x_[1].gather(-1, Jf).view_as(J) - Cc

        def evaluate(x_):
            GT, W = candidate_positive_topk(reduced(x_), J, kc, m)
            ga = a - GT.sum(-1) / gamma
            loc_obj = (x_[0] * a).sum(-1) - (0.5 / gamma) * (GT * GT).sum((-2, -1))
            gb = b - column_sums(GT, J, m) / gamma
            obj = loc_obj + (x_[1] * b).sum(-1)
            return obj, [ga, gb], ga.abs().sum(-1) + gb.abs().sum(-1), W, column_sums(W, J, m)

        xs, its, nev, st = _newton_dual_ascent(evaluate, x, scope, gamma, max_iter - it, tol, J=J, frozen=frozen)
        it, nevals = it + its, nevals + nev
        stalled = torch.where(frozen, stalled, st)
        x = xs
        # one dense pass: a positive X outside the candidates means the set was too small
        X = x[0].unsqueeze(-1) + x[1].unsqueeze(-2) - C
        missed = ((X > 0).sum(-1) != (reduced(x) > 0).sum(-1)).any(-1)
        if J.shape[-1] >= m or not bool(missed.any()) or it >= max_iter:
            obj, _, res, _, _ = evaluate(x)
            GT = densify(candidate_positive_topk(reduced(x), J, kc, m)[0], J, m)
            return x, it, nevals + 1, stalled, GT, (obj, res), expansions
        expansions += 1
        frozen = ~missed
        J = torch.topk(X, min(m, 2 * J.shape[-1]), dim=-1).indices
