"""Semi-smooth Newton ascent on the dual of quadratically regularised / column-capped OT.

The dual of :func:`distreg.moe.sparse_ot.sparse_ot_plan` (``formulation="dual"``, column
cap or none) is ``D(α, β) = ⟨α,a⟩ + ⟨β,b⟩ − (γ/2)‖T‖²`` with the plan
``T = M ∘ [α_i + β_j − C_ij]/γ`` on the active set ``M`` (positive entries among the k
largest of their column). It is concave and piecewise quadratic; on a fixed active set
its Hessian is ``−(1/γ)·[[diag(r), M], [Mᵀ, diag(c)]]`` (``r``/``c``: active entries per
row / column). Eliminating the token block (diagonal) leaves an ``m × m`` system in the
expert potentials,

    (diag(c) − Mᵀ diag(1/r) M) dβ = γ·g_β − Mᵀ(γ·g_α / r),    dα = (γ·g_α − M dβ) / r,

a weighted graph Laplacian over experts (experts linked by the tokens they share): one
``[m, m]`` sum over tokens per step — a single all-reduce of ``m² + m`` numbers in global
scope — and an ``m × m`` solve. Routing changes slowly, so from the previous micro-step's
expert potentials the active set is nearly right and a few steps reach the tolerance,
where L-BFGS needs tens of iterations and line searches over the whole token×expert
matrix (issue 14).

Safeguards: tokens / experts without an active entry get curvature 1 (their step then
makes one entry carry their whole marginal); the Laplacian's null direction (shifting
α by +s and β by −s leaves the plan unchanged) is removed from the right-hand side and
filled by a rank-one term; a Levenberg-Marquardt term ``μ·diag(c)`` (μ from 3e-2, ÷4
after a full step, ×4 after a shortened one) bounds the step of an expert that shares
no token with the others — its reduced curvature is 0 and the dual is linear along it
until a token switches; Armijo backtracking on ``D`` (30 halvings for the first step,
8 later; the first trial at ``first_step``: the candidate Newton starts a warm start at
half length, where the full step overshoots, and a first step accepted at that length
counts as full for the damping). A problem stops when its residual ``‖T1 − a‖₁ + ‖Tᵀ1 − b‖₁`` is below
``tol``, or when it makes no progress — residual not halved and objective not raised
beyond round-off, once within the kink floor (10·tol, or a few tokens' mass: see
``sparse_ot_plan``), three times otherwise — or when no step is
acceptable (a kink of the capped conjugate, where no plan of a single active set meets
the marginals: see ``sparse_ot_plan``). Every decision
is taken on replicated numbers, so every rank runs the same iterations; problems of a
batch are frozen independently (a batch gives each problem the result it gets alone).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from distreg.moe.ot_core import _Scope

# initial Levenberg-Marquardt damping, relative to each expert's active-token count
_RIDGE = 3e-2
# a step gaining less than this share of its slope·t crossed a kink (a quadratic gains ~½)
_KINK_GAIN = 0.35


def _newton_dual_ascent(
    evaluate: Callable[[list[Tensor]], tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor]],
    x: list[Tensor],
    scope: _Scope,
    gamma: float,
    max_iter: int,
    tol: float,
    max_ls: int = 30,
    max_ls_later: int = 8,
    c1: float = 1e-4,
    patience: int = 1,
    J: Tensor | None = None,
    col: Tensor | None = None,
    frozen: Tensor | None = None,
    first_step: float = 1.0,
    floor: float | None = None,
):
    """Maximise the dual over ``x = [α (this rank's tokens), β (replicated)]``.

    ``evaluate(x)`` returns replicated ``(objective [...], [g_α, g_β], residual [...],
    active set W [..., n, m] as 0/1 floats (this rank's tokens), active entries per
    column c [..., m])``. With ``J [..., c, n]`` (expert of each candidate entry, slot-major,
    see `distreg.moe.sparse_candidates`) W is ``[..., c, n]`` over the candidates instead,
    and ``col`` their flat column ids (``problem · m + expert``).
    ``frozen [...]``: problems left as they are (already solved). ``first_step``: the
    first line search's initial length (0.5 from a warm start, see `sparse_ot_plan`).
    ``floor``: the residual below which a stall is the capped dual's kink floor (default
    ``10·tol``; `sparse_ot_plan` passes a few tokens' mass as well).
    Returns ``(x, iterations, evaluations, stalled [...])``."""
    obj, grad, res, M, cnt = evaluate(x)
    fin = torch.finfo(obj.dtype).eps
    done = res < tol if frozen is None else (res < tol) | frozen
    stalled = torch.zeros_like(done)
    best, best_obj = res.clone(), obj.clone()
    idle = torch.zeros_like(res)
    ftol = 0.1 * math.sqrt(fin)
    m = x[1].shape[-1]
    ones = torch.full((m, m), 1.0 / m, dtype=obj.dtype, device=obj.device)
    it, nevals = 0, 1
    mu = torch.full_like(obj, _RIDGE)  # Levenberg-Marquardt damping per problem
    near_floor = 10 * tol if floor is None else floor
    # per-problem decisions are boolean tensors; `_pick_all` takes a whole-batch shortcut, so
    # one problem (the routing norm) pays a host read per decision, not a masked select
    while it < max_iter and not bool(done.all()):
        it += 1
        ga, gb = grad
        cnt1 = cnt.clamp_min(1)
        # [..., n] curvature 1 for tokens with no active entry
        rinv = (M.sum(-1) if J is None else M.sum(-2)).clamp_min_(1).reciprocal_()
        u = gamma * ga * rinv
        if J is None:
            Mt = M.transpose(-1, -2)
            lap_tok = (Mt * rinv.unsqueeze(-2)) @ M  # [..., m, m] = Mᵀ diag(1/r) M (this rank's tokens)
            q = (Mt @ u.unsqueeze(-1)).squeeze(-1)  # Mᵀ u
        else:
            lap_tok, q = _candidate_laplacian(M, J, col, rinv, u, m)
        buf = scope.sum_(torch.cat([lap_tok.flatten(-2), q], -1))
        lap = torch.diag_embed(cnt1) - buf[..., : m * m].unflatten(-1, (m, m))
        rhs = gamma * gb - buf[..., m * m:]
        scale = torch.diagonal(lap, dim1=-2, dim2=-1).mean(-1).clamp_min(1.0)
        rhs = rhs - rhs.mean(-1, keepdim=True)
        H = lap + scale[..., None, None] * ones + torch.diag_embed(mu.unsqueeze(-1) * cnt1)
        db = _solve_spd(H, rhs)
        if J is None:
            Mdb = (M @ db.unsqueeze(-1)).squeeze(-1)
        else:
            Mdb = (M * db.reshape(-1).index_select(0, col).view_as(M)).sum(-2)
        da = u - rinv * Mdb
        live = ~done
        if not bool(live.all()):  # solved problems stay where they are
            da, db = _where_nest(live, [da, db], [torch.zeros_like(da), torch.zeros_like(db)])
        slope = scope.sum_((ga * da).sum(-1).clone()) + (gb * db).sum(-1)
        bad = live & (slope <= 0)  # not an ascent direction (round-off): scaled gradient
        if bool(bad.any()):
            da = torch.where(bad.unsqueeze(-1), u, da)
            db = torch.where(bad.unsqueeze(-1), gamma * gb / cnt1, db)
            slope = torch.where(bad, scope.sum_((ga * da).sum(-1).clone()) + (gb * db).sum(-1), slope)
        floor = obj - 8 * fin * (obj.abs() + 1)  # round-off below the objective
        gain = c1 * slope
        t0 = first_step if it == 1 else 1.0
        t = torch.full_like(obj, t0)
        acc = done.clone()
        new = (list(x), obj, list(grad), res, M, cnt)
        # the first step from the start may need deep backtracking (a far start, empty
        # experts); later, a step rejected 8 times over is a kink: stop rather than search
        for _ in range(max_ls if it == 1 else max_ls_later):
            tc = t.unsqueeze(-1)
            xt = [x[0] + tc * da, x[1] + tc * db]
            o, g, rs, Wt, ct = evaluate(xt)
            nevals += 1
            ok = ((o >= obj + gain * t) | ((o >= floor) & (rs < res))) & ~acc
            new = _pick_all(ok, (xt, o, g, rs, Wt, ct), new)
            acc |= ok
            if bool(acc.all()):
                break
            t = torch.where(acc, t, t / 2)
        nx, no, ng, nr, nM, nc = new
        failed = ~acc  # no acceptable step: a kink the direction cannot pass
        mu = torch.where(t == t0, (mu / 4).clamp_min(1e-6), (mu * 4).clamp_max(1.0))
        better = (nr < 0.5 * best) | (no > best_obj + ftol * (best_obj.abs() + 1))
        # on one active set the dual is quadratic and a Newton step of length t gains
        # (t − t²/2)·slope (half the slope at t = 1); far less means the step crossed a
        # kink of the capped conjugate
        kinked = (no - obj) < _KINK_GAIN * slope * t
        x, obj, grad, res, M, cnt = nx, no, ng, nr, nM, nc
        best = torch.where(better, torch.minimum(res, best), best)
        best_obj = torch.where(better, torch.maximum(obj, best_obj), best_obj)
        idle = (idle + 1).masked_fill_(better, 0)
        # close to the tolerance one idle step marks the kink floor, and so does a kinked
        # step (the next would be idle: measured at E = 64, it saves that confirming
        # step); far from it, a few idle steps
        converged = res < tol
        near = res < near_floor
        patient = torch.where(near, patience, 3 * patience)
        stop = ~done & (failed | (idle >= patient) | (near & kinked))
        stalled |= stop & ~converged
        done |= converged | stop
    return x, it, nevals, stalled


def _candidate_laplacian(M: Tensor, J: Tensor, col: Tensor, rinv: Tensor, u: Tensor, m: int):
    """``Mᵀ diag(1/r) M`` and ``Mᵀ u`` for an active set over candidate entries (``M``
    [..., c, n] slot-major, 0/1 at experts ``J``, flat column ids ``col`` = ``problem · m +
    expert``).
    Tokens with one active expert (``1/r = 1``) only add to the diagonal: one scatter.
    Those with two or more (a few percent when routing) make the rows of
    ``D = diag(1/r)^½ M`` (``[R, m]``, dense), and ``Dᵀ D`` holds their diagonal and
    off-diagonal terms: one GEMM per problem, on that problem's rows in token order, so a
    problem gets the same bits alone or in a batch. A handful of operations: on CPU their
    count, not their arithmetic, is the cost."""
    batch, (c, n) = M.shape[:-2], M.shape[-2:]
    problems = math.prod(batch)
    q = torch.zeros(problems * m, dtype=M.dtype, device=M.device).scatter_add_(
        0, col, (M * u.unsqueeze(-2)).reshape(-1))
    single = (2 * rinv - 1).clamp_min_(0)  # 1 where 1/r = 1, 0 where r >= 2
    diag = torch.zeros(problems * m, dtype=M.dtype, device=M.device).scatter_add_(
        0, col, (M * single.unsqueeze(-2)).reshape(-1))
    lap = torch.diag_embed(diag.view(*batch, m))
    flat_rinv = rinv.reshape(-1)
    rows = (flat_rinv < 0.75).nonzero().squeeze(-1)  # r >= 2 over the batch's tokens
    if rows.numel():
        # [c, tokens over the batch] views / copies, then the chosen tokens as rows
        Ms = M.movedim(-2, 0).reshape(c, -1).index_select(1, rows).mul_(flat_rinv.index_select(0, rows).sqrt_())
        Js = J.movedim(-2, 0).reshape(c, -1).index_select(1, rows)
        D = torch.zeros((rows.numel(), m), dtype=M.dtype, device=M.device).scatter_add_(1, Js.t(), Ms.t())
        if problems == 1:
            lap = lap + (D.t() @ D).view_as(lap)
        else:
            lap = lap.reshape(problems, m, m)
            bounds = torch.searchsorted(rows, torch.arange(problems + 1, device=M.device) * n).tolist()
            for p, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                if hi > lo:
                    lap[p] += D[lo:hi].t() @ D[lo:hi]
            lap = lap.view(*batch, m, m)
    return lap, q.view(*batch, m)


def _solve_spd(H: Tensor, rhs: Tensor) -> Tensor:
    """``H⁻¹ rhs`` for the symmetric positive definite Newton matrix (a Laplacian, its
    null direction filled, plus the ridge): Cholesky, a third cheaper than LU at m = 64;
    LU where round-off makes the factorisation fail."""
    L, info = torch.linalg.cholesky_ex(H)
    if bool(info.any()):
        return torch.linalg.solve(H, rhs.unsqueeze(-1)).squeeze(-1)
    return torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)


def _pick_all(ok: Tensor, new, old):
    """Per problem (``ok`` [...]): ``new`` where ok, else ``old``, over matching nests of
    tensors (trailing dims broadcast), with one host read for all. The whole-batch cases
    skip the masked select: over a token×expert matrix it costs ~20× a multiply on CPU,
    and one problem per call is the routing norm."""
    if bool(ok.all()):
        return new
    if not bool(ok.any()):
        return old
    return _where_nest(ok, new, old)


def _where_nest(ok: Tensor, new, old):
    if isinstance(new, (list, tuple)):
        return type(new)(_where_nest(ok, a, b) for a, b in zip(new, old))
    return torch.where(ok.view(*ok.shape, *([1] * (new.dim() - ok.dim()))), new, old)
