"""Entropic OT by Sinkhorn: log-domain (any scope) and scaling-domain (local) iterations."""
from __future__ import annotations

import torch
from torch import Tensor

from distreg.moe.ot_core import OTResult, _finish, _setup


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
