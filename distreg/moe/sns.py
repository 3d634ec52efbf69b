"""Sinkhorn-Newton-Sparse (Tang et al., ICLR 2024): sparse-Hessian and m×m Schur variants."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distreg.moe.ot_core import OTResult, _finish, _setup
from distreg.moe.sinkhorn import _row_lse, _sinkhorn_loop


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
