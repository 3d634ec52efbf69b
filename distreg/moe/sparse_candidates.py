"""Semi-smooth Newton for sparse OT on a per-token candidate set, verified on the dense
matrix (active-set screening; issue 14).

The optimal plan of the routing problem is sparse: a token's entry ``(i, j)`` is positive
only where ``X_ij = α_i + β_j − C_ij > 0``, a few experts per token. Each token therefore
keeps a candidate set of ``c`` experts (its ``c`` largest ``β_j − C_ij`` under the
warm-start potentials, the order of ``X`` in its row) and the Newton solve runs on
``c × n`` tensors instead of ``n × m`` ones: the dual restricted to the candidates, with
the column cap (``k`` largest positives of each expert) applied among them.

Layout: candidate tensors are *slot-major*, ``[..., c, n]`` (``J[..., s, i]`` = the expert
of token i's slot s): per-token values broadcast along the outer dimension and per-token
sums add ``c`` contiguous vectors — on CPU a per-token broadcast or sum over a trailing
dimension of 8 costs 4-5× as much. :func:`row_candidates` and :func:`threshold_candidates`
return token-major ``[..., n, c]`` (``.mT`` converts).

Exactness: at the candidate optimum one check finds each row's positive ``X`` outside its
candidates (first round: a bound from the warm start clears most rows, the rest get their
exact row, :func:`_missed_outside`; later rounds: a dense pass). If no
row has a positive entry outside its candidates, the dense positive set *is* the candidate
positive set, so the dense column top-k selects the same entries (same values, same
canonical tie rule: see :func:`candidate_positive_topk`) and the dense plan equals the
candidate plan. A problem whose check fails is solved again from its candidate optimum
on a wider set (``2c`` slots: every positive entry and those within ``2γa_i`` below
zero), then on all ``m`` experts, where it is the dense problem and passes by
construction. A restricted problem can also be infeasible (an expert no candidate
reaches: Newton then ascends along it without end), so a round on a partial set is
bounded (`_ROUND_STEPS`) and a problem ending it at ``>= 10·tol`` is solved again from
the warm start on the wider set. Problems of a batch are verified and expanded
independently, with fixed widths (a batch gives each problem its result
alone); local scope only (global scope keeps the dense Newton of ``sparse_ot_plan``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distreg.moe.ot_core import SparsePlan
from distreg.moe.sparse_newton import _newton_dual_ascent


# Newton steps of a round on a partial candidate set (a warm start needs ~5, a cold one ~12)
_ROUND_STEPS = 20


def row_candidates(U: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's ``c`` largest entries of ``U [..., n, m]``: ``(values [..., n, c], experts
    J [..., n, c], rest [..., n])``, in descending order up to near-ties (see below);
    ``rest`` is an upper bound of every other entry of the row (−inf if none). ``U`` is
    the caller's scratch: it may be overwritten.

    On CPU ``torch.topk`` over many short rows costs ~0.75 µs a row (3 ms for 4096 × 64,
    k = 8: more than the whole top-k router), so there ``c + 1`` rounds of a row maximum
    pick them instead, in ``U``'s own buffer (a fresh ``[n, m]`` buffer costs as much as
    the search): each entry's float bits keep all but their lowest ``b = ⌈log2 m⌉``
    mantissa bits and carry the column index there, so every key in a row is distinct
    and its maximum names its column; that entry is then set to −inf (a scatter of one
    value per row). Values and order are exact up to ``2^(b−23)`` relative (``rest`` adds
    that margin): the candidate Newton only needs a good set (its check widens a wrong
    one), and the row fit only a start. ±inf entries are ranked as the largest finite
    values (the key of an inf would be a NaN). Other devices, or rows too long for the
    key: ``torch.topk``, exact."""
    m = U.shape[-1]
    bits = max(1, (m - 1).bit_length())
    if U.device.type != "cpu" or U.dtype != torch.float32 or bits > 12 or c >= m:
        top, J = torch.topk(U, min(c + 1, m), dim=-1)
        if c >= m:
            return top, J, torch.full_like(top[..., 0], -math.inf)
        return top[..., :c], J[..., :c], top[..., c]
    low = (1 << bits) - 1
    big = torch.finfo(U.dtype).max
    keys = U.clamp_(-big, big).view(torch.int32).bitwise_and_(~low)
    keys = keys.bitwise_or_(torch.arange(m, dtype=torch.int32, device=U.device)).view(torch.float32)
    picked = torch.empty((c + 1, *U.shape[:-1], 1), dtype=U.dtype, device=U.device)
    for s in range(c + 1):
        top = torch.amax(keys, -1, keepdim=True, out=picked[s])
        if s < c:
            keys.scatter_(-1, top.view(torch.int32).bitwise_and(low).long(), -math.inf)
    picked = picked.squeeze(-1).movedim(0, -1)  # [..., n, c + 1] keys, descending
    J = picked.view(torch.int32).bitwise_and(low).long()
    nxt = picked[..., c]
    return picked[..., :c], J[..., :c].contiguous(), nxt + nxt.abs() * 2.0 ** (bits - 22)


def threshold_candidates(U: Tensor, delta: float, width: int, floor: Tensor | None = None):
    """Per row of ``U [..., n, m]`` the entries ``>= min(max_row − delta, floor)`` as
    ``(J [..., n, width] experts, valid [..., n, width])``, padded slots ``valid=False``
    (expert 0; callers make them inert). Rows with more than ``width`` such entries keep
    their ``width`` largest (an exact top-k on those rows only). A row's set depends on
    that row alone, and the width is fixed: a problem gets the same candidates alone or
    in a batch. Used for the widening step (the first set is each token's top 8)."""
    m = U.shape[-1]
    flat = U.reshape(-1, m)
    lim = flat.amax(-1, keepdim=True) - delta
    if floor is not None:
        lim = torch.minimum(lim, floor.reshape(-1, 1))
    mask = flat >= lim
    cnt = mask.sum(-1)
    over = (cnt > width).nonzero().squeeze(-1)
    if over.numel():
        top = torch.topk(flat[over], width, dim=-1).indices
        mask[over] = torch.zeros((over.numel(), m), dtype=torch.bool, device=U.device).scatter_(-1, top, True)
        cnt[over] = width
    rows, cols = mask.nonzero(as_tuple=True)
    slot = torch.arange(rows.numel(), device=U.device) - (cnt.cumsum(0) - cnt)[rows]
    J = torch.zeros((flat.shape[0], width), dtype=torch.long, device=U.device).index_put_((rows, slot), cols)
    valid = torch.zeros((flat.shape[0], width), dtype=torch.bool, device=U.device).index_put_(
        (rows, slot), torch.ones_like(rows, dtype=torch.bool))
    return J.view(*U.shape[:-1], width), valid.view(*U.shape[:-1], width)


def column_sums(V: Tensor, J: Tensor, m: int, col: Tensor | None = None) -> Tensor:
    """Per-expert sums ``[..., m]`` of candidate values ``V`` at experts ``J`` (any layout)
    (``col``: :func:`batch_columns` of ``J``, when the caller keeps it: a flat scatter is
    cheaper than a batched one)."""
    if col is None:
        out = torch.zeros((*V.shape[:-2], m), dtype=V.dtype, device=V.device)
        return out.scatter_add_(-1, J.flatten(-2), V.flatten(-2))
    out = torch.zeros(math.prod(V.shape[:-2]) * m, dtype=V.dtype, device=V.device)
    return out.scatter_add_(0, col, V.reshape(-1)).view(*V.shape[:-2], m)


def densify(V: Tensor, J: Tensor, m: int) -> Tensor:
    """``[..., n, m]`` matrix with the slot-major candidate values ``V [..., c, n]`` at
    ``J`` and zeros elsewhere."""
    return SparsePlan(V.mT, J.mT, m).dense()


def batch_columns(J: Tensor, m: int) -> Tensor:
    """Flat column id over the batch (``problem · m + expert``) of every candidate entry
    (in ``J``'s flat order)."""
    problems = math.prod(J.shape[:-2])
    shift = torch.arange(problems, device=J.device).unsqueeze(-1) * m
    return (J.reshape(problems, -1) + shift).reshape(-1)


def at_candidates(v: Tensor, col: Tensor, J: Tensor) -> Tensor:
    """Per-expert values ``v [..., m]`` at the candidate entries, shaped like ``J`` (``col``
    = :func:`batch_columns` of J; a flat ``index_select`` costs a third of a batched
    ``gather`` on CPU)."""
    return v.reshape(-1).index_select(0, col).view(J.shape)


def candidate_positive_topk(X: Tensor, J: Tensor, k: int | None, m: int,
                            col: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``[X]₊`` of slot-major candidate entries ``X [..., c, n]`` (expert ``J``; ``col`` =
    :func:`batch_columns`) kept among the ``k`` largest positives of their expert column,
    its 0/1 indicator (``X``'s dtype) and the kept count per expert ``[..., m]``.

    The rule of :func:`distreg.moe.ot_select._positive_topk_weights` on the dense matrix:
    a column with ``e`` positives beyond ``k`` drops its ``e`` smallest, exact ties
    dropping the lower token indices first. Here only the positives of the binding
    columns (~``n``) are sorted, by column, value, then token (a token holds an expert in
    one real slot; padded slots are never positive): fp32, one sort of the integer key
    ``(column, the value's bits, token)``, order-preserving for non-negative floats; else
    three stable sorts. Each column then drops its first ``e``. Runs at every evaluation
    of the Newton, so it is written for few operations: one ``nonzero`` over the
    candidates, flat ``index_select``s, dropped entries zeroed in place."""
    Xp = X.clamp_min(0)
    W = Xp.sign()
    col = batch_columns(J, m) if col is None else col
    cnt = column_sums(W, J, m, col)
    if k is None:
        return Xp, W, cnt
    excess = (cnt - k).clamp_min(0)  # [..., m]
    if not bool(excess.any()):
        return Xp, W, cnt
    ex = excess.reshape(-1)
    # the positive entries of binding columns (slot-major flat positions), sorted by
    # column, value, then token: one integer key where it fits in 63 bits (fp32 values
    # are non-negative here, so their bits order them), else three stable sorts
    c, n = X.shape[-2:]
    sel = (W * at_candidates(ex.sign(), col, J)).reshape(-1).nonzero().squeeze(-1)
    scol = col.index_select(0, sel)
    vals = Xp.reshape(-1).index_select(0, sel)
    token = sel.remainder(n)
    tb, cb = max(1, (n - 1).bit_length()), max(1, (ex.numel() - 1).bit_length())
    if vals.dtype == torch.float32 and cb + 31 + tb <= 63:
        order = torch.sort((scol << (31 + tb)) | (vals.view(torch.int32).long() << tb) | token).indices
    else:
        order = torch.sort(token, stable=True).indices
        order = order[torch.sort(vals.index_select(0, order), stable=True).indices]
        order = order[torch.sort(scol.index_select(0, order), stable=True).indices]
    cols = scol.index_select(0, order)
    count = torch.bincount(scol, minlength=ex.numel())
    rank = torch.arange(cols.numel(), device=X.device) - (count.cumsum(0) - count).index_select(0, cols)
    drop = sel.index_select(0, order)[rank < ex.index_select(0, cols)]  # each column's first `e`
    Xp.view(-1).index_fill_(0, drop, 0)
    W.view(-1).index_fill_(0, drop, 0)
    return Xp, W, cnt - excess


def candidate_newton(S: Tensor, a: Tensor, b: Tensor, x0: list[Tensor], J: Tensor, valid: Tensor, scope,
                     gamma: float, kc: int | None, max_iter: int, tol: float, first_step: float = 1.0,
                     rest: Tensor | None = None, floor: float | None = None):
    """Newton on the candidate sets ``J`` (``valid``: real slots; padded ones get cost
    +inf, so ``X = −inf`` there) from ``x0 = [α, β]``, verified and expanded until no
    positive entry lies outside them and no problem ends a round (at most `_ROUND_STEPS`
    on a partial set) at ``>= 10·tol`` (then from ``x0`` again): first to twice the width
    (every positive entry and those within ``2γa_i`` below zero), then to all experts.
    ``S = −C``: the scores (the routers' logits, read as they are). ``J``, ``valid``:
    slot-major ``[..., c, n]``. Returns ``(x, iterations, evaluations,
    stalled, (γT at the candidates [..., c, n], their experts J), (objective, residual) at
    x, expansions)``; :func:`densify` makes the dense matrix.

    ``rest [..., n]``: an upper bound of ``β0_j − C_ij`` over each token's experts outside
    the first ``J`` (``β0 = x0[1]``; :func:`row_candidates`). The first check then
    computes only the tokens it does not clear (see :func:`_missed_outside`). ``floor``
    (default ``10·tol``) replaces ``10·tol`` above (see ``sparse_ot_plan``)."""
    floor = 10 * tol if floor is None else floor
    m = S.shape[-1]
    batch = S.shape[:-2]
    frozen = torch.zeros(batch, dtype=torch.bool, device=S.device)
    x = x0
    it = nevals = expansions = 0
    stalled = torch.zeros_like(frozen)
    while True:
        Cc = S.gather(-1, J.mT).mT.contiguous().neg_().masked_fill_(~valid, math.inf)
        col = batch_columns(J, m)

        def reduced(x_):
            return x_[0].unsqueeze(-2) + at_candidates(x_[1], col, J) - Cc

        last: dict = {}  # the latest evaluation: Newton ends on an evaluated point

        def evaluate(x_):
            if last.get("x") is not None and all(u is v for u, v in zip(last["x"], x_)):
                return last["out"]
            Xc = reduced(x_)
            GT, W, cnt = candidate_positive_topk(Xc, J, kc, m, col)
            ga = a - GT.sum(-2) / gamma
            loc_obj = (x_[0] * a).sum(-1) - (0.5 / gamma) * (GT * GT).sum((-2, -1))
            gb = b - column_sums(GT, J, m, col) / gamma
            obj = loc_obj + (x_[1] * b).sum(-1)
            out = obj, [ga, gb], ga.abs().sum(-1) + gb.abs().sum(-1), W, cnt
            last.update(x=list(x_), out=out, Xc=Xc, GT=GT)
            return out

        # on a partial set, a bounded round: a restricted problem can be infeasible (an
        # expert no candidate reaches), and Newton then ascends along it without end
        budget = max_iter - it if J.shape[-2] >= m else min(max_iter - it, _ROUND_STEPS)
        xs, its, nev, st = _newton_dual_ascent(evaluate, x, scope, gamma, budget, tol, J=J, col=col, frozen=frozen,
                                               first_step=first_step if expansions == 0 else 1.0, floor=floor)
        it, nevals = it + its, nevals + nev
        stalled = torch.where(frozen, stalled, st)
        x = xs
        # the check: a positive X outside the candidates means the set was too small (first
        # round: a bound, exact rows where it does not clear; later: one dense pass, X with
        # the real candidate slots masked to −inf, then its row maxima). Candidate entries
        # are computed by the same operations, so X and Xc agree bit for bit
        obj, _, res, _, _ = evaluate(x)
        if rest is not None and expansions == 0:
            missed = _missed_outside(S, x, x0[1], J, rest)
        else:
            # in place: one [n, m] buffer; + S = − C bit for bit (negation is exact)
            X = (x[0].unsqueeze(-1) + x[1].unsqueeze(-2)).add_(S)
            if bool(valid.all()):
                outside = X.scatter_(-1, J.mT, -math.inf)
            else:  # padded slots (expert 0) leave their entry as it is
                mask = torch.full_like(Cc, math.inf).masked_fill_(valid, -math.inf)
                outside = X.scatter_reduce_(-1, J.mT, mask.mT, "amin")
            missed = (outside.amax(-1) > 0).any(-1)
        # a stall or an unfinished round far from tol may be the candidates' doing too (a
        # token without the alternative the optimum reroutes it to): solved again, from x0
        lost = ~frozen & (res >= floor)
        grow = missed | lost
        if J.shape[-2] >= m or not bool(grow.any()) or it >= max_iter:
            return x, it, nevals, stalled, (last["GT"], J), (obj, res), expansions
        expansions += 1
        frozen = ~grow
        if bool(lost.any()):
            x = [torch.where(lost.unsqueeze(-1), u, v) for u, v in zip(x0, x)]
        X = (x[0].unsqueeze(-1) + x[1].unsqueeze(-2)).add_(S)  # the check masked the candidates
        width = 2 * J.shape[-2]
        if width >= m or expansions > 1:
            J = torch.arange(m, device=S.device).unsqueeze(-1).expand(X.mT.shape).contiguous()
            valid = torch.ones_like(J, dtype=torch.bool)
        else:  # every positive entry, and those within 2·γa_i below zero
            J, valid = threshold_candidates(X, 0.0, width, floor=(-2 * gamma * a).unsqueeze(-1))
            J, valid = J.mT.contiguous(), valid.mT.contiguous()


def _missed_outside(S: Tensor, x: list[Tensor], beta0: Tensor, J: Tensor, rest: Tensor) -> Tensor:
    """Per problem: does a token have a positive ``X_ij = (α_i + β_j) + S_ij`` (``S = −C``) at an
    expert outside its candidates ``J [..., c, n]`` (all real slots)? Outside ``J``,
    ``β0_j − C_ij <= rest_i``, and β rose by at most ``shift = max_j (β_j − β0_j)``, so
    ``X_ij <= α_i + shift + rest_i``: tokens whose bound is below zero by more than the
    round-off of the terms are cleared without computing their row; the others (none to
    a few per call at E = 64) get the exact row, computed by the same operations as the
    dense check, so with the same bits. Round-off: ``rest`` is relative-accurate (each
    step rounds its own result), and computing ``X = (α_i + β_j) − C_ij`` errs by ulps of
    ``|α_i| + |β_j|`` and of ``|X|``, so 1e-5 (hundreds of fp32 ulps) of
    ``|α_i| + |rest_i| + max|β| + |shift|`` covers it."""
    n, m = S.shape[-2:]
    shift = (x[1] - beta0).amax(-1, keepdim=True)
    size = x[0].abs() + rest.abs() + x[1].abs().amax(-1, keepdim=True) + shift.abs()
    rows = (x[0] + shift + rest + 1e-5 * size > 0).reshape(-1).nonzero().squeeze(-1)
    missed = torch.zeros(math.prod(S.shape[:-2]), dtype=torch.bool, device=S.device)
    if rows.numel():
        problem = rows // n
        X = (x[0].reshape(-1).index_select(0, rows).unsqueeze(-1) + x[1].reshape(-1, m).index_select(0, problem))
        Jrows = J.movedim(-2, 0).reshape(J.shape[-2], -1).index_select(1, rows).t()
        X = X.add_(S.reshape(-1, m).index_select(0, rows)).scatter_(-1, Jrows, -math.inf)
        missed.index_fill_(0, problem[X.amax(-1) > 0], True)
    return missed.view(S.shape[:-2])
