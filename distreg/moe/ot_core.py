"""Shared core of the OT routing solvers (spec §10, §11, S5): result type, scope, input checks.

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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["OTResult", "SparsePlan", "marginal_residual"]


@dataclass(frozen=True)
class SparsePlan:
    """A plan given by ``c`` entries per token: ``values [..., n, c]`` at experts
    ``experts [..., n, c]`` (padded slots hold 0), zero elsewhere."""

    values: Tensor
    experts: Tensor
    num_experts: int

    def dense(self) -> Tensor:
        out = torch.zeros((*self.values.shape[:-1], self.num_experts), dtype=self.values.dtype,
                          device=self.values.device)
        return out.scatter_add_(-1, self.experts, self.values)  # padded slots add 0 (and may repeat an expert)


@dataclass
class OTResult:
    """Solution of one batched OT solve.

    plan: ``[..., n, m]`` transport plan (global scope: this rank's token rows); built on
        first access from ``support`` when the solver produced it sparse.
    f, g: row / column dual potentials (``None`` for the one a semi-dual eliminates);
        ``g`` is replicated in global scope.
    iterations: solver iterations run (identical on every rank; for SNS warm-up +
        Newton steps).
    residual: ``max`` over problems of ``‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁`` of the returned plan
        (global sums; replicated).
    converged: ``residual < tol`` for every problem.
    info: solver-specific replicated diagnostics (per-problem residuals, sparsity, ...).
    support: a :class:`SparsePlan` equal to the plan, when the solver built it from
        per-token candidate entries (sparse OT's candidate Newton): a per-token top-k is
        read there instead of over all ``m`` experts, and the dense ``[n, m]`` matrix is
        only formed if ``plan`` is read (on CPU a fresh ``[n, m]`` buffer costs more than
        the rest of the router's bookkeeping).
    """

    dense_plan: Tensor | None
    f: Tensor | None
    g: Tensor | None
    iterations: int
    residual: float
    converged: bool
    info: dict[str, Any] = field(default_factory=dict)
    support: SparsePlan | None = None

    @property
    def plan(self) -> Tensor:
        if self.dense_plan is None:
            self.dense_plan = self.support.dense()
        return self.dense_plan


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


def _setup(cost, scores, a, b, comm, dtype, check_finite=True, negate=True):
    """Cost in the working dtype, marginals, scope. Validation (a collective in global
    scope) is skipped for what cannot be wrong: uniform default marginals, and a cost
    whose finiteness the caller checks itself (``check_finite=False``, the scaling
    Sinkhorn: its row spread is NaN/inf exactly when the cost is not finite). In local
    scope with uniform marginals a finite ``C.sum()`` stands for the entry-wise check.
    ``negate=False`` with ``scores``: returns the scores themselves (``−C``), for a caller
    that reads them as such (no negated copy)."""
    if (cost is None) == (scores is None):
        raise ValueError("pass exactly one of cost or scores")
    if cost is not None:
        C = cost.detach()
    else:
        C = -scores.detach() if negate else scores.detach()
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
    if uniform and not scope.glob and (not check_finite or bool(torch.isfinite(C.sum()))):
        # one fast reduction: the sum of a cost with a NaN or an inf is not finite (an
        # overflowing sum of finite entries falls through to the exact count below)
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
    return _finish_sums(plan.sum(-1), plan.sum(-2), a, b, scope, tol)


def _finish_sums(rows, cols, a, b, scope, tol):
    """:func:`_finish` from the plan's row sums ``[..., n]`` and this rank's column sums
    ``[..., m]`` (a sparse plan's, without forming it)."""
    row = (rows - a).abs().sum(-1, keepdim=True)
    buf = scope.sum_(torch.cat([cols, row], -1))
    per = (buf[..., :-1] - b).abs().sum(-1) + buf[..., -1]
    res = float(per.max()) if per.numel() else 0.0
    return per, res, bool((per < tol).all())


def marginal_residual(plan: Tensor, a: Tensor, b: Tensor, comm=None) -> Tensor:
    """``‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁`` per problem (global sums when ``comm`` spans ranks)."""
    scope = _Scope(comm, plan.shape[-2], plan.device)
    return _finish(plan, a.to(plan.dtype), b.to(plan.dtype), scope, 0.0)[0]
