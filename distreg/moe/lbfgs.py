"""Batched, rank-consistent L-BFGS ascent (the general sparse-OT solver)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from distreg.moe.ot_core import _Scope


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
