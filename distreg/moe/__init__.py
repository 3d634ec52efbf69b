"""Optimal-transport routing for mixture-of-experts: the pure functional core.

- `routing_ot`: batched OT solvers over routing groups or the global token set
  (spec §10, §11, pattern S5): log-domain Sinkhorn, sparsity-constrained OT (dual and
  semi-dual, L-BFGS), Sinkhorn-Newton-Sparse (sparse-Hessian and m×m Schur variants).
- `routers`: router logits → capacity-respecting dispatch plans: softmax top-k
  (aux load-balancing + z-loss) and OT routers (Sinkhorn, sparse OT, SNS).

Tensor in, tensor out; collectives only through a `Comm`, and none in routing-group
mode or with a world-size-1 `Comm`. Hooks (layers, state, schedules) wrap these.
"""
from distreg.moe.routers import (
    DispatchPlan,
    dispatch_from_choices,
    expert_capacity,
    ot_router,
    sinkhorn_router,
    sns_router,
    sparse_ot_router,
    topk_router,
)
from distreg.moe.routing_ot import (
    OTResult,
    marginal_residual,
    sinkhorn_plan,
    sns_plan,
    sparse_ot_plan,
    sparse_simplex_projection,
)

__all__ = [
    "DispatchPlan",
    "OTResult",
    "dispatch_from_choices",
    "expert_capacity",
    "marginal_residual",
    "ot_router",
    "sinkhorn_plan",
    "sinkhorn_router",
    "sns_plan",
    "sns_router",
    "sparse_ot_plan",
    "sparse_ot_router",
    "sparse_simplex_projection",
    "topk_router",
]
