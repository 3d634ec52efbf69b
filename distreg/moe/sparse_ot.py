"""Sparsity-constrained, squared-L2-regularised OT (spec §10)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distreg.moe.lbfgs import _lbfgs_ascent
from distreg.moe.ot_core import OTResult, SparsePlan, _finish, _finish_sums, _setup
from distreg.moe.ot_select import (
    _positive_topk_mask,
    _positive_topk_weights,
    _simplex_theta,
    _topk_cols,
    _topk_rows,
    sparse_simplex_projection,
)
from distreg.moe.sparse_candidates import candidate_newton, column_sums, densify, row_candidates
from distreg.moe.sparse_newton import _newton_dual_ascent

# candidate experts per token of the local-scope Newton (`sparse_candidates`): its
# _CANDIDATES largest β_j − C_ij under the warm start. The routing plan has a few positive
# entries per token, and a wider support is found by the dense check; fewer candidates
# (a margin around each token's best expert) leave tokens next to a full expert without
# the alternatives the capped optimum reroutes them to, and Newton stalls there
_CANDIDATES = 8


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
    solver: str = "auto",
    floor: float | None = None,
) -> OTResult:
    """Sparsity-constrained, squared-L2-regularised OT (Liu, Puigcerver, Blondel 2023).

    ``min ⟨T,C⟩ + (γ/2)‖T‖²`` s.t. ``T ≥ 0, T1 = a, Tᵀ1 = b`` and at most ``max_nz_col``
    nonzeros per column (tokens per expert) or ``max_nz_row`` per row (experts per
    token); neither = quadratically regularised OT. Solved, batched, on

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

    ``solver``: ``"newton"`` — semi-smooth Newton on the dual (column cap or none; see
    `distreg.moe.sparse_newton`): per step an ``m × m`` expert system, converging in a
    few steps from a warm start, stopping where a kink of the capped conjugate leaves it
    no usable curvature; ``"lbfgs"`` — batched L-BFGS (every formulation and cap);
    ``"auto"`` (default) — Newton where it applies, and where a problem stalls above the
    kink floor L-BFGS from the standard start too, keeping per problem the higher dual
    objective (then the residual); a stall below the floor is a binding capacity's kink
    and is kept. The floor is ``floor`` if given (at least ``10·tol``), else ``10·tol``:
    the routers pass a few tokens' mass (`distreg.moe.routers.ot_router`). ``max_iter``
    bounds each solver; ``iterations`` adds them up.
    In local scope with more than ``2·8`` experts Newton runs on each token's 8 best
    experts under the warm start (``[n, 8]`` tensors instead of ``[n, m]``), checked on
    the dense matrix and widened where a positive entry lies outside: the dense
    Newton's plan at a fraction of the cost (`distreg.moe.sparse_candidates`).

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

    ``info``: ``solver`` (``newton``, ``lbfgs`` or ``newton+lbfgs``), ``evaluations``,
    ``candidates``/``candidate_expansions`` (candidate Newton only),
    ``stalled`` (per problem: stopped without progress),
    ``nnz_col_max``/``nnz_row_max``/``density`` of the plan, per-problem ``residuals``.
    """
    # no autograd bookkeeping at all (routing decisions carry no gradient): under
    # inference mode a CPU solve runs ~10% faster (measured at E = 64); the results are
    # copied out as normal tensors, so callers may keep, modify or differentiate through
    # ops on them (an inference tensor refuses both)
    with torch.inference_mode():
        res = _solve(cost, a, b, scores, gamma, max_nz_col, max_nz_row, formulation, max_iter, tol, history,
                     comm, dtype, col_select, init, solver, floor)
    return _normal(res)


def _normal(res: OTResult) -> OTResult:
    """``res`` with every tensor copied outside inference mode."""
    def out(v):
        if isinstance(v, Tensor):
            return v.clone()
        if isinstance(v, dict):
            return {k: out(u) for k, u in v.items()}
        return v
    support = None if res.support is None else SparsePlan(out(res.support.values), out(res.support.experts),
                                                          res.support.num_experts)
    return OTResult(out(res.dense_plan), out(res.f), out(res.g), res.iterations, res.residual, res.converged,
                    out(res.info), support)


def _solve(cost, a, b, scores, gamma, max_nz_col, max_nz_row, formulation, max_iter, tol, history, comm, dtype,
           col_select, init, solver, floor) -> OTResult:
    """:func:`sparse_ot_plan`'s body (run under inference mode)."""
    # the candidate Newton reads routers' scores as −C itself: no negated [n, m] copy
    # (C = −S is formed below only for the other paths)
    given, a, b, scope = _setup(cost, scores, a, b, comm, dtype, negate=False)  # the cost, or the scores
    C, S = (given, None) if cost is not None else (None, given)  # S = −C: negated below if needed
    n, m = given.shape[-2:]
    batch_shape, cdtype = given.shape[:-2], given.dtype
    N = scope.N
    if max_nz_col is not None and max_nz_col * m < N:
        raise ValueError(f"infeasible: max_nz_col·m = {max_nz_col * m} < {N} tokens (each needs an expert)")
    if max_nz_row is not None and max_nz_row * N < m:
        raise ValueError(f"infeasible: max_nz_row·n = {max_nz_row * N} < {m} experts")
    if formulation not in ("dual", "semi_dual"):
        raise ValueError(f"unknown formulation {formulation!r}")
    if col_select not in ("radix", "gather"):
        raise ValueError(f"col_select: expected 'radix' or 'gather', got {col_select!r}")
    info_extra: dict[str, Any] = {}
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

    candidates = None  # (J, valid [..., n, c], rest [..., n]): experts per token for the candidate Newton

    def row_fit(beta):
        """α with every row's unconstrained plan [α_i + β_j − C_ij]₊/γ summing to a_i: the
        exact row block-maximiser for the given β, a far better start than α = 0. The
        simplex threshold needs each row's support only: from its top 8 values when the
        support is smaller than that (the usual routing case), else from a full sort."""
        def scaled():  # β − C, or β + S (the same bits: negation is exact)
            shifted = beta.unsqueeze(-2) - C if S is None else beta.unsqueeze(-2) + S
            return shifted.div_(gamma * a.unsqueeze(-1))

        U = scaled()
        nonlocal candidates
        if use_candidates:  # each token's _CANDIDATES best experts; the row fit's support
            top, J, rest = row_candidates(U, _CANDIDATES)  # is usually far smaller (else: full sort)
            # rest: bound of the others, in cost units for the check (`_missed_outside`)
            J = J.mT.contiguous()  # the candidate Newton's slot-major layout
            candidates = (J, torch.ones_like(J, dtype=torch.bool), rest * (gamma * a))
            top = top.mT  # slot-major too: the threshold's sums run over contiguous vectors
            theta = _simplex_theta(top, -2).squeeze(-2)
            if bool((top[..., -1, :] > theta).any()):  # (row_candidates overwrote U)
                theta = _simplex_theta(torch.sort(scaled(), dim=-1, descending=True).values, -1).squeeze(-1)
            return -gamma * a * theta
        kk = min(m, 8)
        top = torch.topk(U, kk, dim=-1).values if kk < m else torch.sort(U, dim=-1, descending=True).values
        theta = _simplex_theta(top, -1)
        if kk < m and bool((top[..., -1:] > theta).any()):  # a support of kk or more: sort all
            theta = _simplex_theta(torch.sort(U, dim=-1, descending=True).values, -1)
        return -gamma * a * theta.squeeze(-1)

    if solver not in ("auto", "newton", "lbfgs"):
        raise ValueError(f"solver: expected 'auto', 'newton' or 'lbfgs', got {solver!r}")
    if solver == "newton" and (formulation != "dual" or axis == "row"):
        raise ValueError("solver='newton' solves the dual with a column cap or none; use solver='lbfgs'")
    newton = solver != "lbfgs" and formulation == "dual" and axis != "row"
    # local scope with many experts: Newton on each token's candidate experts, verified on
    # the dense matrix (`sparse_candidates`); otherwise (and in global scope) dense Newton
    use_candidates = newton and not scope.glob and m > 2 * _CANDIDATES
    if S is not None and not use_candidates:  # the dense paths read C (the candidate
        C, S = -S, None                        # path forms it only for the L-BFGS fallback)
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
            res = buf[..., 2 * m + 1] + gb.abs().sum(-1)
            diag = [inv_curv((T > 0).sum(-1).to(T.dtype)), inv_curv(buf[..., m:2 * m])]
            return obj, [ga, gb], res, diag

        def positive_part(x):
            """γ·T and its 0/1 support as float tensors (no boolean masks: see
            `_positive_topk_weights`); the plan is ``γT / γ``."""
            X = x[0].unsqueeze(-1) + x[1].unsqueeze(-2) - C
            if axis == "none":
                Xp = X.clamp_min(0)
                return Xp, Xp.sign()
            if scope.glob:
                W = _positive_topk_mask(X, kc, -2, scope, col_select).to(X.dtype)
                return X.clamp_min(0) * W, W
            return _positive_topk_weights(X, kc)

        def evaluate_newton(x):
            GT, W = positive_part(x)
            ga = a - GT.sum(-1) / gamma
            loc_obj = (x[0] * a).sum(-1) - (0.5 / gamma) * (GT * GT).sum((-2, -1))
            scalars = torch.stack([loc_obj, ga.abs().sum(-1)], -1)
            buf = scope.sum_(torch.cat([GT.sum(-2) / gamma, W.sum(-2), scalars], -1))
            gb = b - buf[..., :m]
            obj = buf[..., 2 * m] + (x[1] * b).sum(-1)
            return obj, [ga, gb], buf[..., 2 * m + 1] + gb.abs().sum(-1), W, buf[..., m:2 * m]

        beta0 = torch.zeros_like(b) if init is None else init[1].detach().to(cdtype).expand_as(b).clone()
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

    Tc = None  # the candidate Newton's plan at the candidates Jc, when it is the plan
    if newton:
        floor = 10 * tol if floor is None else max(floor, 10 * tol)
        sparse = candidates is not None
        # from a warm start the candidate Newton's full first step overshoots (many
        # experts: the active set moves with the fresh logits) and the line search accepts
        # its half: start there (measured at E = 64; with few experts, dense Newton's full
        # first step is usually accepted)
        first_step = 0.5 if init is not None and sparse else 1.0
        if sparse:
            J0, valid0, rest = candidates
            x, it, nevals, stalled, (GTc, Jc), final, expansions = candidate_newton(
                -C if S is None else S, a, b, x0, J0, valid0, scope, gamma, kc, max_iter, tol,
                first_step=first_step, rest=rest, floor=floor)
        else:
            x, it, nevals, stalled = _newton_dual_ascent(evaluate_newton, x0, scope, gamma, max_iter, tol,
                                                         floor=floor)
        used = "newton"
        need = stalled
        if solver == "auto" and bool(stalled.any()):
            on, rn = final if sparse else evaluate_newton(x)[0:3:2]
            need = stalled & (rn >= floor)
        if solver == "auto" and bool(need.any()):
            # Newton stopped far from the tolerance where the capped conjugate's kinks leave
            # it no usable curvature (a tie at a capacity boundary next to a flat direction
            # of the dual: hard assignments, a capacity of exactly n/m). L-BFGS from the
            # standard start, whose Wolfe-type steps creep along such faces, runs as well;
            # those problems keep the higher dual objective (then the lower residual):
            # replicated values, so every rank keeps the same one. A stall within the floor is
            # the kink floor of a binding capacity and is accepted, as L-BFGS's own stall.
            if C is None:
                C = -S  # the dense closures read C
            xl, it2, nev2, stalled_l = _lbfgs_ascent(evaluate, x0, sharded, scope, max_iter, tol, history)
            ol, _, rl, _, _ = evaluate_newton(xl)
            noise = 8 * torch.finfo(on.dtype).eps * (on.abs() + 1)
            take = need & ((ol > on + noise) | ((ol >= on - noise) & (rl < rn)))
            T_newton = densify(GTc / gamma, Jc, m) if sparse else positive_part(x)[0] / gamma
            T = torch.where(take[..., None, None], plan_of(xl), T_newton)
            x = [torch.where(take.unsqueeze(-1), u, v) for u, v in zip(xl, x)]
            stalled = torch.where(take, stalled_l, stalled)
            it, nevals, used = it + it2, nevals + nev2 + 2, "newton+lbfgs"
        elif sparse:
            # the candidate plan: T at the candidates (padded slots hold 0); the dense T
            # (exactly: 0 + v = v) only if asked for. Its statistics below come from the
            # candidates too
            Tc = GTc / gamma
            T = densify(Tc, Jc, m) if truncate_rows else None
        else:
            T = positive_part(x)[0] / gamma
        if sparse:
            info_extra = {"candidates": candidates[0].shape[-2], "candidate_expansions": expansions}
    else:
        x, it, nevals, stalled = _lbfgs_ascent(evaluate, x0, sharded, scope, max_iter, tol, history)
        T, used = plan_of(x), "lbfgs"
    info: dict[str, Any] = {"evaluations": nevals, "stalled": stalled, "formulation": formulation, "solver": used}
    info.update(info_extra)
    if truncate_rows:
        before = T.sum()
        T = T * _topk_rows(T, kr)[0]
        info["row_truncated_mass"] = float(scope.sum_((before - T.sum()).reshape(1)))
    # the candidates are slot-major [..., c, n]; the support is read token by token
    support = SparsePlan(Tc.mT, Jc.mT, m) if Tc is not None and not truncate_rows else None
    if support is not None:  # no dense [n, m] passes
        per, res, ok = _finish_sums(Tc.sum(-2), column_sums(Tc, Jc, m), a, b, scope, tol)
        nz = (Tc > 0).to(torch.int64)
        cnt = scope.sum_(column_sums(nz, Jc, m))
        rows = nz.sum(-2).amax(-1, keepdim=True)
    else:
        per, res, ok = _finish(T, a, b, scope, tol)
        nz = T > 0
        cnt = scope.sum_(nz.sum(-2).to(torch.int64))
        rows = nz.sum(-1).amax(-1, keepdim=True) if n else torch.zeros((*C.shape[:-2], 1), dtype=torch.int64)
    rmax = scope.max_(rows.to(torch.int64))
    info.update(
        residuals=per,
        nnz_col_max=int(cnt.max()),
        nnz_row_max=int(rmax.max()),
        density=float(cnt.sum()) / float(max(1, N * m * max(1, math.prod(batch_shape)))),
    )
    f = x[0] if formulation == "dual" or axis == "col" else None
    g = x[1] if formulation == "dual" else (x[0] if axis != "col" else None)
    return OTResult(T, f, g, it, res, ok, info, support)
