"""Optimal-transport solvers for MoE routing: the pure functional core (spec §10, §11, S5).

Every solver takes a cost ``C`` of shape ``[..., n, m]`` (``n`` tokens, ``m`` experts; the
leading dims are independent routing groups solved in one batched call), a token marginal
``a`` (``[..., n]``, default uniform) and an expert marginal ``b`` (``[..., m]``, default
uniform = equal capacity share), and returns an :class:`OTResult`.

Two scopes (spec S5):

* **local** (``comm`` is None or has world size 1): each problem lives on this process.
  This is the routing-group mode: with a fixed group size ``G`` the result does not
  depend on the world size and no collective is issued.
* **global** (``comm`` with world size > 1): the token rows of every problem are split
  across ranks in rank order (rank r holds rows ``[offset_r, offset_r + n_r)``, ``n_r``
  may differ). Row variables stay on their rank; only per-expert (column) statistics are
  exchanged. Every loop decision (stop, line-search acceptance) is taken on replicated
  values (all ranks compute it from identical all-reduced / all-gathered numbers), so all
  ranks run the same iteration count and issue the same collectives (no deadlock).
  Default ``a`` is then ``1/N`` with ``N`` the global token count.

Costs are used detached (routing decisions carry no gradient); arithmetic runs in fp32
unless ``dtype=torch.float64`` is asked for (or the cost is already fp64). For routing,
``C = -logits``; adding a per-token constant to ``C`` (logits vs log-probabilities) does
not change any plan below because row marginals are fixed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "OTResult",
    "sinkhorn_plan",
    "sparse_ot_plan",
    "sns_plan",
    "sparse_simplex_projection",
    "marginal_residual",
]


@dataclass
class OTResult:
    """Solution of one batched OT solve.

    plan: ``[..., n, m]`` transport plan (global scope: this rank's token rows).
    f, g: row / column dual potentials (``None`` for the one a semi-dual eliminates);
        ``g`` is replicated in global scope.
    iterations: solver iterations run (identical on every rank; for SNS warm-up +
        Newton steps).
    residual: ``max`` over problems of ``‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁`` of the returned plan
        (global sums; replicated).
    converged: ``residual < tol`` for every problem.
    info: solver-specific replicated diagnostics (per-problem residuals, sparsity, ...).
    """

    plan: Tensor
    f: Tensor | None
    g: Tensor | None
    iterations: int
    residual: float
    converged: bool
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- scope


class _Scope:
    """Local/global bookkeeping: global token count, this rank's row offset, reductions."""

    def __init__(self, comm, n: int, device):
        self.comm = comm
        self.glob = comm is not None and comm.world_size > 1
        self.n = n
        if self.glob:
            sizes = [int(s) for s in comm.all_gather(torch.tensor([n], dtype=torch.int64, device=device))]
            self.offset = sum(sizes[: comm.rank])
            self.N = sum(sizes)
        else:
            self.offset, self.N = 0, n

    def sum_(self, t: Tensor) -> Tensor:
        """In-place global sum (no-op locally)."""
        if self.glob:
            self.comm.all_reduce(t, "sum")
        return t

    def max_(self, t: Tensor) -> Tensor:
        if self.glob:
            self.comm.all_reduce(t, "max")
        return t

    def gather_cat(self, t: Tensor, dim: int) -> Tensor:
        """All-gather equal-shaped tensors and concatenate them in rank order along ``dim``."""
        if not self.glob:
            return t
        return torch.cat(self.comm.all_gather(t.contiguous()), dim=dim)


def _setup(cost, scores, a, b, comm, dtype, check_finite=True):
    """Cost in the working dtype, marginals, scope. Validation (a collective in global
    scope) is skipped for what cannot be wrong: uniform default marginals, and a cost
    whose finiteness the caller checks itself (``check_finite=False``, the scaling
    Sinkhorn: its row spread is NaN/inf exactly when the cost is not finite)."""
    if (cost is None) == (scores is None):
        raise ValueError("pass exactly one of cost or scores")
    C = (-scores if cost is None else cost).detach()
    if C.dim() < 2:
        raise ValueError(f"cost must have shape [..., n, m], got {tuple(C.shape)}")
    dt = dtype or (torch.float64 if C.dtype == torch.float64 else torch.float32)
    C = C.to(dt)
    n, m = C.shape[-2:]
    batch = C.shape[:-2]
    scope = _Scope(comm, n, C.device)
    if scope.N == 0 or m == 0:
        raise ValueError("empty OT problem")
    uniform = a is None and b is None
    if a is None:
        a = torch.full((*batch, n), 1.0 / scope.N, dtype=dt, device=C.device)
    else:
        a = a.detach().to(dt).expand(*batch, n).contiguous()
    if b is None:
        b = torch.full((*batch, m), 1.0 / m, dtype=dt, device=C.device)
    else:
        b = b.detach().to(dt).expand(*batch, m).contiguous()
    if uniform and not check_finite and not scope.glob:
        return C, a, b, scope
    # validation on replicated numbers (one all-reduce) so every rank raises together
    flags = torch.stack([(~torch.isfinite(C)).sum(), (a <= 0).sum()]).to(dt)
    buf = scope.sum_(torch.cat([a.sum(-1).reshape(-1), flags]))
    if buf[-2] > 0:
        raise ValueError("cost contains NaN or inf")
    if buf[-1] > 0 or (b <= 0).any():
        raise ValueError("marginals must be positive")
    if not torch.allclose(buf[:-2], b.sum(-1).reshape(-1), rtol=1e-4, atol=1e-6):
        raise ValueError("balanced OT needs sum(a) == sum(b) (over all ranks in global scope)")
    return C, a, b, scope


def _finish(plan, a, b, scope, tol):
    """Replicated marginal residual ‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁ per problem (one all-reduce)."""
    row = (plan.sum(-1) - a).abs().sum(-1, keepdim=True)
    buf = scope.sum_(torch.cat([plan.sum(-2), row], -1))
    per = (buf[..., :-1] - b).abs().sum(-1) + buf[..., -1]
    res = float(per.max()) if per.numel() else 0.0
    return per, res, bool((per < tol).all())


def marginal_residual(plan: Tensor, a: Tensor, b: Tensor, comm=None) -> Tensor:
    """``‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁`` per problem (global sums when ``comm`` spans ranks)."""
    scope = _Scope(comm, plan.shape[-2], plan.device)
    return _finish(plan, a.to(plan.dtype), b.to(plan.dtype), scope, 0.0)[0]


# ----------------------------------------------------------------------------- Sinkhorn


def _row_lse(C, g, eps):
    return torch.logsumexp((g.unsqueeze(-2) - C) / eps, dim=-1)


def _sinkhorn_loop(C, la, lb, eps, f, g, max_iter, tol, scope):
    """Log-domain Sinkhorn. Columns need the log-sum-exp over *all* tokens: each rank
    computes its local per-column LSE, the ``[W, m]`` LSEs are all-gathered and combined
    identically on every rank (one collective per iteration, carrying the row-residual
    partial too). The stopping test at iteration t uses the row residual of the iterate
    after t−1 (free by-product of the row LSE); the loop still finishes iteration t."""
    a = la.exp()
    it = 0
    done = torch.zeros((*C.shape[:-2], 1), dtype=torch.bool, device=C.device)  # per problem
    for it in range(1, max_iter + 1):
        lse_r = _row_lse(C, g, eps)
        row_err = ((f / eps + lse_r).exp() - a).abs().sum(-1, keepdim=True)
        f_new = eps * (la - lse_r)
        lse_c = torch.logsumexp((f_new.unsqueeze(-1) - C) / eps, dim=-2)
        if scope.glob:
            parts = scope.gather_cat(torch.cat([lse_c, row_err], -1).unsqueeze(0), 0)
            lse_c = torch.logsumexp(parts[..., :-1], dim=0)
            row_err = parts[..., -1:].sum(0)
        # A problem that has met the test keeps its potentials while others go on, so a
        # batch of problems (routing groups) gives each the result it gets alone - the
        # group-scope plan does not depend on how groups are spread over ranks.
        f = torch.where(done, f, f_new)
        g = torch.where(done, g, eps * (lb - lse_c))
        if it > 1:
            done = done | (row_err < tol)
        if bool(done.all()):
            break
    return f, g, it


# Largest spread (in units of eps) of one row of the cost, plus the spread of the
# warm-start column potentials, for which the scaling-domain iteration is used: the
# kernel's entries then stay >= e^-spread, far from underflow in fp32 (e^-87).
_SCALING_MAX_SPREAD = {torch.float32: 30.0, torch.float64: 100.0}


def _sinkhorn_scaling(C, a, b, eps, g, max_iter, tol):
    """Sinkhorn in the scaling domain (local scope): ``P = diag(u) K diag(v)`` with the
    row-shifted kernel ``K_ij = exp(-(C_ij - min_j C_ij)/eps)`` computed once, then two
    multiply-sum passes per iteration instead of two log-sum-exps (each an exp over the
    whole matrix: two BLAS matrix-vector products). The iterates are those of :func:`_sinkhorn_loop` (f from g, then g
    from f; same stopping rule, same per-problem freezing), only rounded differently.
    Returns None when the cost's spread could underflow the kernel (small eps): the
    caller then runs the log-domain loop."""
    limit = _SCALING_MAX_SPREAD.get(C.dtype)
    if limit is None:
        return None
    S = C / -eps
    smax = S.amax(-1, keepdim=True)
    smin = S.amin(-1, keepdim=True)
    gs = g / eps
    spread = torch.stack([(smax - smin).amax(), (gs.amax(-1) - gs.amin(-1)).amax() if gs.numel() else smax.new_zeros(())])
    if not bool(torch.isfinite(spread).all() & (spread.sum() < limit)):
        return None  # NaN/inf costs are reported by _setup's check in the log-domain path
    K = (S - smax).exp_()
    v = (gs - gs.amax(-1, keepdim=True)).exp()  # a constant shift of g leaves P unchanged
    u = torch.zeros_like(a)
    done = torch.zeros((*C.shape[:-2], 1), dtype=torch.bool, device=C.device)
    it = 0
    batched = done.numel() > 1  # one problem: nothing to freeze, no masking per iteration
    for it in range(1, max_iter + 1):
        Kv = (K @ v.unsqueeze(-1)).squeeze(-1)  # BLAS matrix-vector products
        row_err = (u * Kv - a).abs().sum(-1, keepdim=True)
        u_new = a / Kv
        v_new = b / (u_new.unsqueeze(-2) @ K).squeeze(-2)
        u = torch.where(done, u, u_new) if batched else u_new
        v = torch.where(done, v, v_new) if batched else v_new
        if it > 1:
            done = done | (row_err < tol)
        if bool(done.all()):
            break
    plan = u.unsqueeze(-1) * K * v.unsqueeze(-2)
    f = eps * (u.log() - smax.squeeze(-1))
    return plan, f, eps * v.log(), it


def sinkhorn_plan(
    cost: Tensor | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    scores: Tensor | None = None,
    eps: float = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-6,
    comm=None,
    dtype: torch.dtype | None = None,
    init: tuple[Tensor | None, Tensor] | None = None,
) -> OTResult:
    """Balanced entropic OT ``min ⟨P,C⟩ + eps·Σ P(log P − 1)`` s.t. ``P1 = a, Pᵀ1 = b``.

    Log-domain Sinkhorn (stable for small ``eps``); plan ``P = exp((f_i + g_j − C_ij)/eps)``,
    matching POT ``ot.sinkhorn(a, b, C, eps, method="sinkhorn_log")``. Stops when the row
    residual (columns are exact after each iteration) is below ``tol`` for every problem,
    or after ``max_iter`` iterations. Global scope: see the module docstring; one
    all-gather of ``W·(m+1)`` floats per iteration (per problem).
    """
    local = comm is None or comm.world_size == 1
    C, a, b, scope = _setup(cost, scores, a, b, comm, dtype, check_finite=not local)
    f = torch.zeros_like(a) if init is None or init[0] is None else init[0].detach().to(C.dtype).expand_as(a).clone()
    g = torch.zeros_like(b) if init is None else init[1].detach().to(C.dtype).expand_as(b).clone()
    fast = _sinkhorn_scaling(C, a, b, eps, g, max_iter, tol) if local else None
    if fast is None and local:
        _setup(C, None, a, b, None, C.dtype)  # the checks the scaling path skipped (raises on NaN/inf)
    if fast is not None:
        plan, f, g, it = fast
    else:
        f, g, it = _sinkhorn_loop(C, a.log(), b.log(), eps, f, g, max_iter, tol, scope)
        plan = ((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps).exp()
    per, res, ok = _finish(plan, a, b, scope, tol)
    return OTResult(plan, f, g, it, res, ok, {"residuals": per})


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


# ----------------------------------------------------------------------------- L-BFGS


def _lbfgs_ascent(
    evaluate: Callable[[list[Tensor]], tuple[Tensor, list[Tensor], Tensor, list[Tensor]]],
    x: list[Tensor],
    sharded: Sequence[bool],
    scope: _Scope,
    max_iter: int,
    tol: float,
    history: int,
    max_ls: int = 30,
    c1: float = 1e-4,
    patience: int = 10,
):
    """Batched L-BFGS maximisation with a backtracking/expanding line search.

    ``x``: variable parts ``[..., d_i]``; parts flagged ``sharded`` are split across ranks
    (their dot products are all-reduced), the others replicated. ``evaluate(x)`` returns
    replicated ``(objective [...], gradient parts, residual [...], diagonal parts)``; the
    diagonal (an inverse-curvature estimate per variable, e.g. ``γ / #active entries``) is
    the initial inverse Hessian of the two-loop recursion — it removes the ``n/m`` scale
    gap between token and expert potentials. A problem stops when its residual (=
    ‖gradient‖₁, the marginal violation) is below ``tol`` or when it makes no progress
    (precision floor, or a kink the line search cannot pass: line search fails right
    after a restart, or ``patience`` iterations in which neither the residual improved by
    0.1 % nor the objective by ``0.1·sqrt(ulp)`` relative). Every rank takes the same branches.
    """
    any_sharded = any(sharded) and scope.glob

    def dot(u, v):
        loc = sum((ui * vi).sum(-1) for ui, vi, s in zip(u, v, sharded) if s)
        rep = sum((ui * vi).sum(-1) for ui, vi, s in zip(u, v, sharded) if not s)
        if any_sharded and isinstance(loc, Tensor):
            loc = scope.sum_(loc.clone())
        return loc + rep

    def axpy(t, u, v):  # v + t*u with t [...] broadcast over the last dim
        return [vi + t.unsqueeze(-1) * ui for ui, vi in zip(u, v)]

    def gram(hist, grad, diag):
        """All inner products of one two-loop recursion, in one all-reduce (sharded parts):
        g·Dg, S·g, Y·Dg, diag(Y·Y), S·Yᵀ, Y·D·Yᵀ (``[..., h]`` / ``[..., h, h]``)."""
        h = len(hist)
        rep, loc = 0, 0
        for p, sh in enumerate(sharded):
            g, D = grad[p], diag[p]
            Dg = D * g
            cols = [(g * Dg).sum(-1, keepdim=True)]
            if h:
                S = torch.stack([s_[p] for s_, _, _ in hist], -2)  # [..., h, d]
                Y = torch.stack([y_[p] for _, y_, _ in hist], -2)
                Yt = Y.transpose(-1, -2)
                cols += [(S @ g.unsqueeze(-1)).squeeze(-1), (Y @ Dg.unsqueeze(-1)).squeeze(-1), (Y * Y).sum(-1),
                         (S @ Yt).flatten(-2), ((Y * D.unsqueeze(-2)) @ Yt).flatten(-2)]
            v = torch.cat(cols, -1)
            if sh and any_sharded:
                loc = loc + v
            else:
                rep = rep + v
        tot = rep + (scope.sum_(loc) if isinstance(loc, Tensor) else 0)
        sizes = [1] + ([h, h, h, h * h, h * h] if h else [])
        parts = list(torch.split(tot, sizes, -1))
        if not h:
            return parts[0].squeeze(-1), None, None, None, None, None
        gDg, SG, YDG, YY, SY, YDY = parts
        return gDg.squeeze(-1), SG, YDG, YY, SY.unflatten(-1, (h, h)), YDY.unflatten(-1, (h, h))

    def pick(mask, new, old):
        if isinstance(new, list):
            return [torch.where(mask.unsqueeze(-1), n_, o_) for n_, o_ in zip(new, old)]
        return torch.where(mask, new, old)

    obj, grad, res, diag = evaluate(x)
    fin = torch.finfo(obj.dtype).eps
    done = res < tol
    stalled = torch.zeros_like(done)
    hist: list[tuple[list[Tensor], list[Tensor], Tensor]] = []  # (s, y, usable mask)
    fresh = torch.ones_like(done)  # no curvature pairs yet (direction = scaled gradient)
    best, best_obj, idle = res.clone(), obj.clone(), torch.zeros_like(res, dtype=torch.int64)
    ftol = 0.1 * math.sqrt(fin)  # relative objective gain that still counts as progress
    nevals, it = 1, 0
    while it < max_iter and not bool(done.all()):
        it += 1
        # two-loop recursion d = H·grad (H ≈ inverse Hessian of −objective, H0 = diag),
        # run on scalars: every inner product it needs comes from one collective.
        h = len(hist)
        gDg, SG, YDG, YY, SY, YDY = gram(hist, grad, diag)
        r = [di * gi for di, gi in zip(diag, grad)]
        slope = gDg
        if h:
            sy = torch.diagonal(SY, dim1=-2, dim2=-1)
            keep = torch.stack([k_ for _, _, k_ in hist], -1)
            valid = keep & (sy > fin * YY) & (YY > 0)
            rho = torch.where(valid, 1.0 / torch.where(valid, sy, torch.ones_like(sy)), torch.zeros_like(sy))
            al = [torch.zeros_like(gDg)] * h
            for i in reversed(range(h)):
                sq = SG[..., i] - sum((al[j] * SY[..., i, j] for j in range(i + 1, h)), torch.zeros_like(gDg))
                al[i] = rho[..., i] * sq
            cf = [torch.zeros_like(gDg)] * h
            for i in range(h):
                yr = YDG[..., i] - sum(al[j] * YDY[..., i, j] for j in range(h))
                yr = yr + sum((cf[j] * SY[..., j, i] for j in range(i)), torch.zeros_like(gDg))
                cf[i] = al[i] - rho[..., i] * yr
            for j, (s_, y_, _) in enumerate(hist):
                r = [ri - al[j].unsqueeze(-1) * di * yi + cf[j].unsqueeze(-1) * si
                     for ri, di, yi, si in zip(r, diag, y_, s_)]
            slope = gDg - sum(al[j] * YDG[..., j] - cf[j] * SG[..., j] for j in range(h))
        bad = slope <= 0  # not an ascent direction: fall back to the scaled gradient
        if bool(bad.any()):
            r = pick(bad, [di * gi for di, gi in zip(diag, grad)], r)
            slope = torch.where(bad, gDg, slope)
        d = [torch.where(done.unsqueeze(-1), torch.zeros_like(ri), ri) for ri in r]
        slope = torch.where(done, torch.zeros_like(slope), slope)
        noise = 8 * fin * (obj.abs() + 1)
        t = torch.ones_like(obj)
        acc = done.clone()
        first = torch.zeros_like(done)  # accepted by Armijo at t = 1 (may expand)
        nx, no, ng, nr, nd, nslope = list(x), obj.clone(), list(grad), res.clone(), list(diag), slope.clone()
        for ls in range(max_ls):
            xt = axpy(t, d, x)
            o, g, rs, dg = evaluate(xt)
            nevals += 1
            # Armijo, or — once objective differences drown in round-off — the approximate
            # Wolfe test of Hager & Zhang (objective not worse beyond noise, directional
            # derivative not overshot), which keeps the residual decreasing past the
            # objective's resolution (residual floor ~ sqrt(ulp) otherwise).
            ds = dot(g, d)
            armijo = o >= obj + c1 * t * slope
            ok = (armijo | ((o >= obj - noise) & (ds >= -0.8 * slope))) & ~acc
            nx, ng, nd = pick(ok, xt, nx), pick(ok, g, ng), pick(ok, dg, nd)
            no, nr, nslope = pick(ok, o, no), pick(ok, rs, nr), pick(ok, ds, nslope)
            if ls == 0:
                first = ok & armijo
            acc |= ok
            if bool(acc.all()):
                break
            t = torch.where(acc, t, t / 2)
        # expansion: full step accepted and the objective still rising steeply along d
        # (e.g. in a flat region where the plan is empty) → double the step.
        grow = first & (nslope >= 0.9 * slope)
        for _ in range(20):
            if not bool(grow.any()):
                break
            t = torch.where(grow, 2 * t, t)
            xt = axpy(t, d, x)
            o, g, rs, dg = evaluate(xt)
            nevals += 1
            ds = dot(g, d)
            ok = grow & (o >= obj + c1 * t * slope) & (o >= no)
            nx, ng, nd = pick(ok, xt, nx), pick(ok, g, ng), pick(ok, dg, nd)
            no, nr = pick(ok, o, no), pick(ok, rs, nr)
            grow = ok & (ds >= 0.9 * slope)
        # line search failed: first restart from a scaled gradient step (drop this
        # problem's curvature pairs); failing again right after a restart → stop it.
        flat = ~done & ~acc
        s_new = [a_ - b_ for a_, b_ in zip(nx, x)]
        y_new = [b_ - a_ for a_, b_ in zip(ng, grad)]  # gradient change of −objective
        hist.append((s_new, y_new, ~flat))
        if len(hist) > history:
            hist.pop(0)
        restart = flat & ~fresh
        stop = flat & fresh
        if bool(restart.any()):
            hist = [(s_, y_, k_ & ~restart) for s_, y_, k_ in hist]
        fresh = restart
        better = (nr < 0.999 * best) | (no > best_obj + ftol * (best_obj.abs() + 1))
        x, obj, grad, res, diag = nx, no, ng, nr, nd
        best = torch.where(better, torch.minimum(res, best), best)
        best_obj = torch.where(better, torch.maximum(obj, best_obj), best_obj)
        idle = torch.where(better, torch.zeros_like(idle), idle + 1)
        stop |= ~done & (idle >= patience)
        stalled |= stop
        done |= (res < tol) | stop
    return x, it, nevals, stalled


# ----------------------------------------------------------------------------- sparse OT


def sparse_ot_plan(
    cost: Tensor | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    scores: Tensor | None = None,
    gamma: float = 1.0,
    max_nz_col: int | None = None,
    max_nz_row: int | None = None,
    formulation: str = "dual",
    max_iter: int = 500,
    tol: float = 1e-6,
    history: int = 10,
    comm=None,
    dtype: torch.dtype | None = None,
    col_select: str = "radix",
    init: tuple[Tensor | None, Tensor] | None = None,
) -> OTResult:
    """Sparsity-constrained, squared-L2-regularised OT (Liu, Puigcerver, Blondel 2023).

    ``min ⟨T,C⟩ + (γ/2)‖T‖²`` s.t. ``T ≥ 0, T1 = a, Tᵀ1 = b`` and at most ``max_nz_col``
    nonzeros per column (tokens per expert) or ``max_nz_row`` per row (experts per
    token); neither = quadratically regularised OT. Solved by batched L-BFGS on

    * ``formulation="dual"`` over (α, β): ``⟨α,a⟩ + ⟨β,b⟩ − Σ δ_k(α_i + β_j − C_ij)``
      with δ_k applied per column (or per row); plan ``[X]₊/γ`` on the top-k entries
      (POT ``smooth_ot_dual(..., reg_type="sparsity_constrained", max_nz=k)``);
    * ``formulation="semi_dual"``: the constrained side is solved exactly by a sparse
      simplex projection, so its marginal holds by construction (column constraint:
      variable α, columns exact — POT ``smooth_ot_semi_dual``; row constraint: variable
      β, every token's mass exactly ``a_i`` on ≤ k experts).

    With both caps, the column-constrained problem is solved and each row is then
    truncated to its ``max_nz_row`` largest entries (spec §10: "enforce by keeping each
    row's topk plan entries"); the mass removed is ``info["row_truncated_mass"]``.
    Requires ``k·m ≥ N`` for a column cap (every token needs an expert) and ``k·N ≥ m``
    for a row cap. ``γ`` multiplies ``‖T‖²`` with ``T`` summing to 1, so its useful range
    scales with ``n`` (the routers pass ``gamma_per_token · n``).

    The capped problem is non-convex: when the cap binds hard, the dual optimum can sit
    on a kink of the top-k conjugate where no recovered plan meets the marginals (POT's
    L-BFGS-B stops there too). The solver then stops with ``info["stalled"]`` set and
    ``converged=False``; the plan still respects the caps and the routers' capacity rule
    handles the remaining imbalance.

    Initialisation: α fits every row exactly (β = 0); the L-BFGS initial Hessian is
    ``γ / #active entries`` per variable (tokens and experts differ by ~n/m in curvature).
    Global scope, per evaluation: the exact per-expert top-k over all tokens by the
    distributed radix selection of the sparsity package (dual: 4 all-reduces of
    ``[m, 256]`` histograms + one all-gather of ``m`` tie counts, independent of k and of
    the number of ranks; the semi-dual column form also needs the selected values and
    all-gathers every rank's ``k·m`` candidates instead — keep k small there; row caps
    need none) and one all-reduce of ``2m+2`` floats. ``col_select="gather"`` makes
    the dual use the candidate all-gather too: fewer bytes and rounds when ``k·W`` is
    small (a few hundred), but its buffer grows with ``k·m·W`` on every rank; per iteration one all-reduce
    of the ``O(history²)`` inner products of the two-loop recursion; per line-search
    trial one scalar all-reduce.

    ``init``: ``(ignored, β)`` warm start of the expert potentials (dual formulation;
    α is fitted to it row by row), e.g. ``OTResult.g`` of the previous micro-step of
    the same routing layer: routing changes slowly, so far fewer iterations remain.

    ``info``: ``evaluations``, ``stalled`` (per problem: stopped without progress),
    ``nnz_col_max``/``nnz_row_max``/``density`` of the plan, per-problem ``residuals``.
    """
    C, a, b, scope = _setup(cost, scores, a, b, comm, dtype)
    n, m = C.shape[-2:]
    N = scope.N
    if max_nz_col is not None and max_nz_col * m < N:
        raise ValueError(f"infeasible: max_nz_col·m = {max_nz_col * m} < {N} tokens (each needs an expert)")
    if max_nz_row is not None and max_nz_row * N < m:
        raise ValueError(f"infeasible: max_nz_row·n = {max_nz_row * N} < {m} experts")
    if formulation not in ("dual", "semi_dual"):
        raise ValueError(f"unknown formulation {formulation!r}")
    if col_select not in ("radix", "gather"):
        raise ValueError(f"col_select: expected 'radix' or 'gather', got {col_select!r}")
    kc = None if max_nz_col is None or max_nz_col >= N else int(max_nz_col)
    kr = None if max_nz_row is None or max_nz_row >= m else int(max_nz_row)
    truncate_rows = kc is not None and kr is not None
    axis = "col" if kc is not None else ("row" if kr is not None else "none")

    def pack(T, extra):
        """One all-reduce: column sums and column support sizes of T, per-problem scalars."""
        return scope.sum_(torch.cat([T.sum(-2), (T > 0).sum(-2).to(T.dtype), torch.stack(extra, -1)], -1))

    def inv_curv(count):
        """Inverse-curvature estimate γ / #active entries (L-BFGS initial Hessian)."""
        return gamma / count.clamp_min(1)

    def row_fit(beta):
        """α with every row's unconstrained plan [α_i + β_j − C_ij]₊/γ summing to a_i: the
        exact row block-maximiser for the given β, a far better start than α = 0. The
        simplex threshold needs each row's support only: from its top 8 values when the
        support is smaller than that (the usual routing case), else from a full sort."""
        U = (beta.unsqueeze(-2) - C) / (gamma * a.unsqueeze(-1))
        kk = min(m, 8)
        top = torch.topk(U, kk, dim=-1).values if kk < m else torch.sort(U, dim=-1, descending=True).values
        theta = _simplex_theta(top, -1)
        if kk < m and bool((top[..., -1:] > theta).any()):  # a support of kk or more: sort all
            theta = _simplex_theta(torch.sort(U, dim=-1, descending=True).values, -1)
        return -gamma * a * theta.squeeze(-1)

    if formulation == "dual":

        def plan_of(x):
            X = x[0].unsqueeze(-1) + x[1].unsqueeze(-2) - C
            if axis == "none":
                return X.clamp_min(0) / gamma
            mask = (_positive_topk_mask(X, kc, -2, scope, col_select) if axis == "col"
                    else _positive_topk_mask(X, kr, -1, None))
            return torch.where(mask, X, torch.zeros_like(X)) / gamma

        def evaluate(x):
            T = plan_of(x)
            ga = a - T.sum(-1)
            loc_obj = (x[0] * a).sum(-1) - 0.5 * gamma * (T * T).sum((-2, -1))
            buf = pack(T, [loc_obj, ga.abs().sum(-1)])
            gb = b - buf[..., :m]
            obj = buf[..., 2 * m] + (x[1] * b).sum(-1)
            diag = [inv_curv((T > 0).sum(-1).to(T.dtype)), inv_curv(buf[..., m:2 * m])]
            return obj, [ga, gb], buf[..., 2 * m + 1] + gb.abs().sum(-1), diag

        beta0 = torch.zeros_like(b) if init is None else init[1].detach().to(C.dtype).expand_as(b).clone()
        x0 = [row_fit(beta0), beta0]
        sharded = [True, False]
    else:
        if axis in ("col",):
            # variable α (rows, sharded); every column projected with b_j·P_k(X/(γ b_j))
            def plan_of(x):
                U = (x[0].unsqueeze(-1) - C) / (gamma * b.unsqueeze(-2))
                mask, top = _topk_cols(U, kc, scope)
                theta = _simplex_theta(top, -2)
                return torch.where(mask, (U - theta).clamp_min(0), torch.zeros_like(U)) * b.unsqueeze(-2)

            def evaluate(x):
                T = plan_of(x)
                X = x[0].unsqueeze(-1) - C
                ga = a - T.sum(-1)
                loc_obj = (x[0] * a).sum(-1) - (X * T).sum((-2, -1)) + 0.5 * gamma * (T * T).sum((-2, -1))
                buf = pack(T, [loc_obj, ga.abs().sum(-1)])
                res = buf[..., 2 * m + 1] + (buf[..., :m] - b).abs().sum(-1)
                return buf[..., 2 * m], [ga], res, [inv_curv((T > 0).sum(-1).to(T.dtype))]

            x0, sharded = [row_fit(torch.zeros_like(b))], [True]
        else:
            # variable β (columns, replicated); every row projected with a_i·P_k(X/(γ a_i))
            k_row = kr if kr is not None else m

            def plan_of(x):
                U = (x[0].unsqueeze(-2) - C) / (gamma * a.unsqueeze(-1))
                return sparse_simplex_projection(U, k_row, -1) * a.unsqueeze(-1)

            def evaluate(x):
                T = plan_of(x)
                X = x[0].unsqueeze(-2) - C
                loc_obj = -(X * T).sum((-2, -1)) + 0.5 * gamma * (T * T).sum((-2, -1))
                buf = pack(T, [loc_obj, (T.sum(-1) - a).abs().sum(-1)])
                gb = b - buf[..., :m]
                obj = buf[..., 2 * m] + (x[0] * b).sum(-1)
                return obj, [gb], buf[..., 2 * m + 1] + gb.abs().sum(-1), [inv_curv(buf[..., m:2 * m])]

            x0, sharded = [torch.zeros_like(b)], [False]

    x, it, nevals, stalled = _lbfgs_ascent(evaluate, x0, sharded, scope, max_iter, tol, history)
    T = plan_of(x)
    info: dict[str, Any] = {"evaluations": nevals, "stalled": stalled, "formulation": formulation}
    if truncate_rows:
        before = T.sum()
        T = T * _topk_rows(T, kr)[0]
        info["row_truncated_mass"] = float(scope.sum_((before - T.sum()).reshape(1)))
    per, res, ok = _finish(T, a, b, scope, tol)
    nz = T > 0
    cnt = scope.sum_(nz.sum(-2).to(torch.int64))
    rows = nz.sum(-1).amax(-1, keepdim=True) if n else torch.zeros((*C.shape[:-2], 1), dtype=torch.int64)
    rmax = scope.max_(rows.to(torch.int64))
    info.update(
        residuals=per,
        nnz_col_max=int(cnt.max()),
        nnz_row_max=int(rmax.max()),
        density=float(cnt.sum()) / float(max(1, N * m * max(1, math.prod(C.shape[:-2])))),
    )
    f = x[0] if formulation == "dual" or axis == "col" else None
    g = x[1] if formulation == "dual" else (x[0] if axis != "col" else None)
    return OTResult(T, f, g, it, res, ok, info)


# ----------------------------------------------------------------------------- SNS


def _safe_div(num: Tensor, den: Tensor, ok: Tensor) -> Tensor:
    """``num / den`` where ``ok``, 0 elsewhere (no inf/NaN from masked-out entries)."""
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _cg(matvec, rhs: list[Tensor], rtol: float, maxit: int):
    """Batched conjugate gradient for SPD(-ish) systems; problems stop independently."""
    def dot(u, v):
        return sum((ui * vi).sum(-1) for ui, vi in zip(u, v))

    x = [torch.zeros_like(r) for r in rhs]
    r = [ri.clone() for ri in rhs]
    p = [ri.clone() for ri in rhs]
    rs = dot(r, r)
    stop = rs * rtol * rtol
    k = 0
    for k in range(1, maxit + 1):
        active = rs > stop
        if not bool(active.any()):
            break
        Ap = matvec(p)
        pAp = dot(p, Ap)
        alpha = _safe_div(rs, pAp, active & (pAp > 0))
        x = [xi + alpha.unsqueeze(-1) * pi for xi, pi in zip(x, p)]
        r = [ri - alpha.unsqueeze(-1) * api for ri, api in zip(r, Ap)]
        rs_new = dot(r, r)
        beta = _safe_div(rs_new, rs, active & (rs > 0))
        p = [ri + beta.unsqueeze(-1) * pi for ri, pi in zip(r, p)]
        rs = torch.where(active & (pAp > 0), rs_new, torch.zeros_like(rs))
    return x, k


def sns_plan(
    cost: Tensor | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    scores: Tensor | None = None,
    eps: float = 1.0,
    warmup_iters: int = 20,
    max_newton: int = 50,
    tol: float = 1e-6,
    rho: float | None = None,
    threshold: float | None = None,
    cg_rtol: float = 1e-10,
    cg_max_iter: int | None = None,
    variant: str = "auto",
    comm=None,
    dtype: torch.dtype | None = None,
    init: tuple[Tensor | None, Tensor] | None = None,
) -> OTResult:
    """Sinkhorn-Newton-Sparse (Tang et al., ICLR 2024) for the entropic problem of
    :func:`sinkhorn_plan` (same ``eps``; the spec's ``η = 1/eps``).

    Stage 1: up to ``warmup_iters`` log-domain Sinkhorn iterations (early stop at ``tol``).
    Stage 2: up to ``max_newton`` Newton steps on the concave dual potential
    ``L(f,g) = −eps·ΣP + ⟨a,f⟩ + ⟨b,g⟩`` with Armijo backtracking (halving from 1).
    Stops when ``‖P1−a‖₁ + ‖Pᵀ1−b‖₁ < tol``.

    * ``variant="sparse"`` (local scope): the Hessian ``(1/eps)[[diag(P1), P], [Pᵀ,
      diag(Pᵀ1)]]`` keeps both diagonal blocks exactly and only the top
      ``ceil(rho·n·m)`` entries of P (or those ``≥ threshold``) in the off-diagonal blocks;
      the system is solved by CG to ``cg_rtol·‖grad‖`` (floored at 100 ulp) on the
      complement of the potentials' shift direction ``(1, −1)``. Default
      ``rho = 2/min(n, m)`` (spec proposal ``2/n`` for square problems, about two entries
      per row) — the paper's exact rule is unconfirmed. The kept entries are an
      (row, col, value) list, so a CG step costs ``O(kept + n + m)``.
    * ``variant="schur"`` (spec "routing-shaped variant", local or global): rows are
      eliminated exactly, Newton runs on the m expert potentials with the ``m×m`` Schur
      complement ``(1/eps)(diag(Pᵀ1) − Pᵀdiag(1/a)P)`` — a sum over tokens, so one
      all-reduce of ``m² + m + 1`` floats per step (+ one scalar per line-search trial).
    * ``"auto"``: sparse when local, schur when global.

    ``info``: ``warmup_iters`` run, ``newton_steps``, ``residuals``, ``variant``.
    """
    C, a, b, scope = _setup(cost, scores, a, b, comm, dtype)
    n, m = C.shape[-2:]
    if variant == "auto":
        variant = "schur" if scope.glob else "sparse"
    if variant not in ("sparse", "schur"):
        raise ValueError(f"unknown variant {variant!r}")
    if variant == "sparse" and scope.glob:
        raise ValueError("variant='sparse' is single-process; use variant='schur' in global scope")
    la, lb = a.log(), b.log()
    f = torch.zeros_like(a) if init is None or init[0] is None else init[0].detach().to(C.dtype).expand_as(a).clone()
    g = torch.zeros_like(b) if init is None else init[1].detach().to(C.dtype).expand_as(b).clone()
    f, g, n1 = _sinkhorn_loop(C, la, lb, eps, f, g, warmup_iters, tol, scope) if warmup_iters > 0 else (f, g, 0)
    fin = torch.finfo(C.dtype).eps
    c1 = 1e-4
    steps = 0
    stuck = torch.zeros(C.shape[:-2], dtype=torch.bool, device=C.device)

    def plan(f, g):
        return ((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps).exp()

    if variant == "sparse":
        keep = math.ceil((rho if rho is not None else 2.0 / min(n, m)) * n * m)
        keep = max(1, min(keep, n * m))
        cg_max = cg_max_iter or min(2 * (n + m), 500)
        cg_tol = max(cg_rtol, 100 * torch.finfo(C.dtype).eps)  # fp32 cannot reach 1e-10

        def lyap(f, g, P):
            return -eps * P.sum((-2, -1)) + (a * f).sum(-1) + (b * g).sum(-1)

        P = plan(f, g)
        for _ in range(max_newton):
            r, c = P.sum(-1), P.sum(-2)
            gf, gg = a - r, b - c
            res = gf.abs().sum(-1) + gg.abs().sum(-1)
            done = (res < tol) | stuck
            if bool(done.all()):
                break
            steps += 1
            # sparsified off-diagonal block as an entry list (rows, cols, vals) [..., K]:
            # the CG matvec costs O(K + n + m) instead of O(n·m)
            flat = P.flatten(-2)
            if threshold is not None:
                kk = max(1, int((flat >= threshold).sum(-1).max()))
                vals, idx = flat.topk(kk, dim=-1)
                vals = torch.where(vals >= threshold, vals, torch.zeros_like(vals))
            else:
                vals, idx = flat.topk(keep, dim=-1)
            rows, cols = idx // m, idx % m

            def perp(v):
                """Remove the (1, −1) component: shifting (f + c, g − c) leaves P unchanged
                and spans the null space of the exact Hessian, so CG works on its
                complement (keeps CG well posed when the Hessian is not sparsified)."""
                c_ = (v[0].sum(-1) - v[1].sum(-1)) / (n + m)
                return [v[0] - c_.unsqueeze(-1), v[1] + c_.unsqueeze(-1)]

            def matvec(v, rows=rows, cols=cols, vals=vals, r=r, c=c):
                px = torch.zeros_like(v[0]).scatter_add_(-1, rows, vals * v[1].gather(-1, cols))
                py = torch.zeros_like(v[1]).scatter_add_(-1, cols, vals * v[0].gather(-1, rows))
                return perp([(r * v[0] + px) / eps, (py + c * v[1]) / eps])

            (df, dg), _ = _cg(matvec, perp([gf, gg]), cg_tol, cg_max)
            df = torch.where(done.unsqueeze(-1), torch.zeros_like(df), df)
            dg = torch.where(done.unsqueeze(-1), torch.zeros_like(dg), dg)
            slope = (gf * df).sum(-1) + (gg * dg).sum(-1)
            bad = slope <= 0
            df = torch.where(bad.unsqueeze(-1), eps * gf, df)  # safeguard: gradient step
            dg = torch.where(bad.unsqueeze(-1), eps * gg, dg)
            slope = torch.where(bad, eps * ((gf * gf).sum(-1) + (gg * gg).sum(-1)), slope)
            L0 = lyap(f, g, P)
            t = torch.ones_like(L0)
            acc = done.clone()
            nf, ng, nP = f, g, P
            for _ls in range(40):
                ft, gt = f + t.unsqueeze(-1) * df, g + t.unsqueeze(-1) * dg
                Pt = plan(ft, gt)
                ok = (lyap(ft, gt, Pt) >= L0 + c1 * t * slope - 8 * fin * (L0.abs() + eps)) & ~acc
                nf = torch.where(ok.unsqueeze(-1), ft, nf)
                ng = torch.where(ok.unsqueeze(-1), gt, ng)
                nP = torch.where(ok.unsqueeze(-1).unsqueeze(-1), Pt, nP)
                acc |= ok
                if bool(acc.all()):
                    break
                t = torch.where(acc, t, t / 2)
            stuck |= ~acc  # line search failed: precision floor for that problem
            f, g, P = nf, ng, nP
    else:
        def row_step(g):
            f = eps * (la - _row_lse(C, g, eps))
            return f, scope.sum_((a * f).sum(-1).clone())

        f, Fa = row_step(g)
        eye = torch.eye(m, dtype=C.dtype, device=C.device)
        for _ in range(max_newton):
            P = plan(f, g)
            S = (P / a.unsqueeze(-1)).transpose(-1, -2) @ P
            buf = scope.sum_(torch.cat([P.sum(-2), S.flatten(-2)], -1))
            c, S = buf[..., :m], buf[..., m:].unflatten(-1, (m, m))
            grad = b - c
            res = grad.abs().sum(-1)
            done = (res < tol) | stuck
            if bool(done.all()):
                break
            steps += 1
            H = (torch.diag_embed(c) - S) / eps
            scale = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).clamp_min(fin)
            # H·1 = 0 (null direction of the dual): add scale·11ᵀ/m, solve on 1^⊥
            Hr = H + scale[..., None, None] * torch.ones_like(eye) / m
            rhs = grad - grad.mean(-1, keepdim=True)
            dg = torch.linalg.solve(Hr, rhs.unsqueeze(-1)).squeeze(-1)
            dg = torch.where(done.unsqueeze(-1), torch.zeros_like(dg), dg)
            slope = (grad * dg).sum(-1)
            bad = slope <= 0
            dg = torch.where(bad.unsqueeze(-1), eps * grad, dg)
            slope = torch.where(bad, eps * (grad * grad).sum(-1), slope)
            F0 = Fa + (b * g).sum(-1)
            t = torch.ones_like(F0)
            acc = done.clone()
            nf, ng, nFa = f, g, Fa
            for _ls in range(40):
                gt = g + t.unsqueeze(-1) * dg
                ft, Fat = row_step(gt)
                ok = (Fat + (b * gt).sum(-1) >= F0 + c1 * t * slope - 8 * fin * (F0.abs() + eps)) & ~acc
                nf = torch.where(ok.unsqueeze(-1), ft, nf)
                ng = torch.where(ok.unsqueeze(-1), gt, ng)
                nFa = torch.where(ok, Fat, nFa)
                acc |= ok
                if bool(acc.all()):
                    break
                t = torch.where(acc, t, t / 2)
            stuck |= ~acc
            f, g, Fa = nf, ng, nFa
    P = plan(f, g)
    per, res, ok = _finish(P, a, b, scope, tol)
    return OTResult(P, f, g, n1 + steps, res, ok,
                    {"residuals": per, "warmup_iters": n1, "newton_steps": steps, "variant": variant})
