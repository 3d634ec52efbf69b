"""Optimal-transport solvers for MoE routing: the pure functional core (spec §10, §11, S5).

One import point for the solvers, split by concept into:

- `ot_core`: :class:`OTResult`, the local/global scope, input checks, marginal residuals
  (the conventions every solver shares: see its docstring);
- `sinkhorn`: entropic OT (log-domain / scaling-domain Sinkhorn);
- `ot_select`: exact per-column (over all ranks) and per-row top-k selections, the
  sparse simplex projection;
- `lbfgs`: the batched, rank-consistent L-BFGS ascent;
- `sparse_ot`: sparsity-constrained, squared-L2-regularised OT (semi-smooth Newton on
  the dual, L-BFGS for the general case);
- `sns`: Sinkhorn-Newton-Sparse.
"""
from __future__ import annotations

from distreg.moe.lbfgs import _lbfgs_ascent
from distreg.moe.ot_core import OTResult, _finish, _Scope, _setup, marginal_residual
from distreg.moe.ot_select import (
    _global_positive_topk_cols,
    _local_candidates,
    _positive_topk_mask,
    _simplex_theta,
    _sorted_topk,
    _topk_cols,
    _topk_rows,
    sparse_simplex_projection,
)
from distreg.moe.sinkhorn import _row_lse, _sinkhorn_loop, _sinkhorn_scaling, sinkhorn_plan
from distreg.moe.sns import sns_plan
from distreg.moe.sparse_ot import sparse_ot_plan

__all__ = [
    "OTResult",
    "sinkhorn_plan",
    "sparse_ot_plan",
    "sns_plan",
    "sparse_simplex_projection",
    "marginal_residual",
]
# private helpers re-exported for the tests and older imports
_REEXPORTED = (_lbfgs_ascent, _finish, _Scope, _setup, _global_positive_topk_cols, _local_candidates,
               _positive_topk_mask, _simplex_theta, _sorted_topk, _topk_cols, _topk_rows, _row_lse,
               _sinkhorn_loop, _sinkhorn_scaling)
