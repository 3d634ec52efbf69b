"""Exact top-k selections (per column over every rank's tokens, per row) and the sparse
simplex projection used by the sparsity-constrained OT solvers."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distreg.moe.ot_core import _Scope


# ----------------------------------------------------------------------------- top-k selection


def _sorted_topk(X: Tensor, k: int, dim: int):
    """Largest ``k`` along ``dim`` in descending order (``torch.topk``: far faster than a
    full sort for small k; which of exactly tied values is taken is unspecified, so tie
    canonicality is only guaranteed for the cross-rank merge, see :func:`_topk_cols`)."""
    if k >= X.shape[dim]:
        return torch.sort(X, dim=dim, descending=True, stable=True)
    return torch.topk(X, k, dim=dim, largest=True, sorted=True)


def _topk_cols(X: Tensor, k: int, scope: _Scope):
    """Per-expert top-k over all tokens of every column of ``X [..., n, m]``.

    Returns ``(mask [..., n, m], top [..., k, m])`` with ``top`` the global k largest
    values per column in descending order (replicated). Global scope: each rank sends its
    own top-k candidates (value, global index)
    per column — ``W·k·m`` pairs in one all-gather — and every rank merges them with the
    same stable sort (exact ties: lower rank first; within a rank as ``torch.topk``), so
    the selection is exact (a global top-k element is necessarily in
    its owner's local top-k) and identical on every rank. Cost grows with ``k``: meant for
    small capacities; prefer routing groups otherwise.
    """
    n = X.shape[-2]
    k = min(k, scope.N)
    if not scope.glob:
        top, idx = _sorted_topk(X, k, -2)
        mask = torch.zeros_like(X, dtype=torch.bool).scatter_(-2, idx, True)
        return mask, top
    kl = min(k, n)
    vals, idx = _sorted_topk(X, kl, -2)
    shape = (*X.shape[:-2], k, X.shape[-1])
    pv = torch.full(shape, -math.inf, dtype=torch.float64, device=X.device)
    pi = torch.full(shape, -1.0, dtype=torch.float64, device=X.device)
    pv[..., :kl, :] = vals.double()
    pi[..., :kl, :] = (idx + scope.offset).double()
    both = scope.gather_cat(torch.stack([pv, pi]), -2)  # [2, ..., W*k, m], rank order
    order = torch.sort(both[0], dim=-2, descending=True, stable=True).indices[..., :k, :]
    top = both[0].gather(-2, order).to(X.dtype)
    loc = both[1].gather(-2, order).long() - scope.offset
    loc = torch.where((loc >= 0) & (loc < n), loc, torch.full_like(loc, n))  # n = trash row
    mask = torch.zeros((*X.shape[:-2], n + 1, X.shape[-1]), dtype=torch.bool, device=X.device)
    mask.scatter_(-2, loc, True)
    return mask[..., :n, :], top


# The radix rounds stop once every expert's threshold bucket holds at most this many
# tokens over all ranks; the buckets are then all-gathered (<= 64 x E x W (key, row)
# pairs) and finished locally: 2-3 collectives per selection instead of 9 (float64).
_BUCKET_GATHER = 64


def _global_positive_topk_cols(X: Tensor, k: int, scope: _Scope) -> Tensor:
    """Global scope: the positive entries among the k largest of each column over every
    rank's rows, by the exact distributed selection of the sparsity package (S1 radix
    select, `select_bottom_k_columns`). Per-expert histograms travel (one all-reduce of
    ``[m, 256]`` counts per key byte) until each expert's threshold bucket holds at most
    `_BUCKET_GATHER` tokens over all ranks, then those buckets' keys are all-gathered:
    the traffic is bounded by neither k nor the whole token set, only by the buckets.

    Each rank first keeps, per column, only its entries ``>=`` its own k-th largest
    positive value (an entry below it has k strictly larger ones on its own rank, so it
    cannot be in the global top-k; ties at that value stay in): the radix rounds then
    run on ``[~k, m]`` candidates instead of ``[n, m]``. Per column the smallest
    ``C_j − k`` of the ``C_j`` candidates (counted over all ranks) are dropped; ties at a
    column's threshold keep the higher global token index (the lower ones go first) —
    a canonical rule, identical for every split of the tokens."""
    from distreg.sparsity.topk import select_bottom_k_columns

    batch = X.shape[:-2]
    n, m = X.shape[-2:]
    b = math.prod(batch)
    flat = X.reshape(b, n, m).transpose(0, 1).reshape(n, b * m)  # problems side by side as columns
    idx, elig = _local_candidates(flat, k)
    padded = torch.cat([flat, flat.new_zeros(1, b * m)])
    drop = select_bottom_k_columns(padded.gather(0, idx), lambda count: (count - k).clamp_min(0), scope.comm,
                                   eligible=elig, gather_below=_BUCKET_GATHER)
    keep = torch.zeros(n + 1, b * m, dtype=torch.bool, device=X.device).scatter_(0, idx, elig & ~drop)[:n]
    return keep.reshape(n, b, m).transpose(0, 1).reshape(*batch, n, m)


def _local_candidates(flat: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per column, this rank's positive entries >= its own k-th largest positive value, as
    row indices in row order ``[K, cols]`` (unused slots = the spare row ``n``) and their
    eligibility. Usually the local top-k itself; the packing pass runs only when a
    column has positive ties at its k-th value beyond the top-k."""
    n, cols = flat.shape
    if n == 0:
        return flat.new_zeros(0, cols, dtype=torch.long), flat.new_zeros(0, cols, dtype=torch.bool)
    top_v, top_i = torch.topk(flat, min(k, n), dim=0)  # all positives are in it when fewer than k
    kth = top_v[-1]
    if not bool((((flat >= kth) & (flat > 0)).sum(0) > top_v.shape[0]).any()):
        idx = top_i.sort(dim=0).values
        return idx, flat.gather(0, idx) > 0
    cand = (flat > 0) & (flat >= kth)
    K = int(cand.sum(0).max())
    slot = torch.where(cand, cand.long().cumsum(0) - 1, torch.full_like(flat, K, dtype=torch.long))
    rows = torch.arange(n, device=flat.device).unsqueeze(1).expand(n, cols)
    idx = torch.full((K + 1, cols), n, dtype=torch.long, device=flat.device).scatter_(0, slot, rows)[:K]
    elig = torch.zeros(K + 1, cols, dtype=torch.bool, device=flat.device).scatter_(0, slot, cand)[:K]
    return idx, elig


def _positive_topk_mask(X: Tensor, k: int, dim: int, scope: _Scope | None, col_select: str = "radix") -> Tensor:
    """Mask of the entries that are positive *and* among the k largest of their column
    (``dim=-2``) or row (``dim=-1``) — all the dual plan ``[X]₊/γ`` needs. Locally only
    the columns/rows with more than k positive entries (the binding ones) are sorted,
    which skips the top-k entirely once the cap is slack."""
    if scope is not None and scope.glob and dim == -2:
        if col_select == "gather":
            return _topk_cols(X, k, scope)[0] & (X > 0)
        return _global_positive_topk_cols(X, k, scope)
    pos = X > 0
    over = pos.sum(dim) > k
    if not bool(over.any()):
        return pos
    Xd = X.movedim(dim, -1)
    flat = Xd.reshape(-1, Xd.shape[-1])
    rows = over.reshape(-1).nonzero().squeeze(-1)
    sub = torch.zeros(rows.numel(), flat.shape[-1], dtype=torch.bool, device=X.device)
    sub.scatter_(-1, torch.topk(flat[rows], k, dim=-1).indices, True)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[rows] = sub
    return pos & keep.view(Xd.shape).movedim(-1, dim)


def _positive_topk_weights(X: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Local ``[X]₊`` restricted to the k largest entries of each column, and its 0/1
    indicator, both in ``X``'s dtype: the same selection as :func:`_positive_topk_mask`
    (``dim=-2``, local) without boolean tensors — on CPU a masked ``where`` or a bool→float
    cast costs ~20× a multiply. Only the columns with more than k positive entries (the
    binding ones) are touched: near the optimum they hold a few positives beyond k, so
    the ``excess`` smallest positives are dropped (a top-``excess`` of the smallest
    instead of a top-k over the column). Exact ties at the threshold (common: every
    token with one active expert has the same ``X = γ a_i`` after a row fit) drop the
    lower token indices first."""
    Xp = X.clamp_min(0)
    W = Xp.sign()
    excess = (W.sum(-2) - k).clamp_min(0)  # [..., m]
    worst = int(excess.max()) if excess.numel() else 0
    if worst == 0:
        return Xp, W
    B3 = Xp.reshape(-1, *Xp.shape[-2:])  # [problems, n, m] (a view)
    m = Xp.shape[-1]
    cols = (excess.reshape(-1) > 0).nonzero().squeeze(-1)
    prob, col = cols // m, cols % m
    sub = B3[prob, :, col]  # [binding columns, n]: only those columns are copied
    # non-positives pushed past every positive value; the `excess`-th smallest positive
    # is the column's threshold v: positives below v go, and of those equal to v the
    # lower token indices go first (a canonical rule: the same selection whatever the
    # batch or the number of ranks, as in `_global_positive_topk_cols`)
    low = sub + (1 - sub.sign()) * torch.finfo(sub.dtype).max / 4
    e = excess.reshape(-1)[cols].unsqueeze(-1)  # [cols, 1]
    vals = torch.topk(low, min(worst, low.shape[-1]), dim=-1, largest=False, sorted=True).values
    v = vals.gather(-1, (e - 1).long())
    below = (low < v).to(sub.dtype)
    tied = (low == v).to(sub.dtype)
    quota = e - below.sum(-1, keepdim=True)
    keep = 1 - below - tied * (tied.cumsum(-1) <= quota).to(sub.dtype)
    Wk = torch.ones_like(B3)
    Wk[prob, :, col] = keep
    Wk = Wk.view(Xp.shape)
    return Xp * Wk, W * Wk


def _topk_rows(X: Tensor, k: int):
    """Per-token top-k over experts (always local)."""
    k = min(k, X.shape[-1])
    top, idx = _sorted_topk(X, k, -1)
    return torch.zeros_like(X, dtype=torch.bool).scatter_(-1, idx, True), top


def _simplex_theta(top: Tensor, dim: int) -> Tensor:
    """Threshold θ of the simplex projection from the selected values sorted descending
    along ``dim`` (Duchi et al.; POT ``projection_sparse_simplex``)."""
    k = top.shape[dim]
    shape = [1] * top.dim()
    shape[dim] = k
    ind = torch.arange(1, k + 1, dtype=top.dtype, device=top.device).view(shape)
    cssv = top.cumsum(dim) - 1.0
    rho = (top - cssv / ind > 0).sum(dim, keepdim=True).clamp_min(1)
    return cssv.gather(dim, rho - 1) / rho.to(top.dtype)


def sparse_simplex_projection(V: Tensor, max_nz: int, dim: int = -1) -> Tensor:
    """Euclidean projection of each slice of ``V`` along ``dim`` onto the probability
    simplex with at most ``max_nz`` nonzeros: keep the ``max_nz`` largest entries, project
    them onto the simplex, zero the rest (Kyrillidis et al. 2013; POT ``ot.utils``)."""
    dim = dim % V.dim()
    k = min(max_nz, V.shape[dim])
    top, idx = _sorted_topk(V, k, dim)
    theta = _simplex_theta(top, dim)
    mask = torch.zeros_like(V, dtype=torch.bool).scatter_(dim, idx, True)
    return torch.where(mask, (V - theta).clamp_min(0), torch.zeros_like(V))
