"""Warm-started OT routing (issue 14): the expert potentials of a layer's previous
training micro-step start the next solve - fewer iterations, the same capacity rule -
and the start is layer state: an exact, split-independent mean over routing groups,
replayed when activation checkpointing recomputes the forward, saved with the model."""
from __future__ import annotations

import torch

from distreg.models.moe import _DUAL_QUANTUM, MoEFeedForward
from distreg.models.recompute import _recomputing
from distreg.moe import ot_router, sinkhorn_plan


def draws(n=256, m=8, count=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    bias = torch.linspace(0.0, 1.5, m)
    return [torch.randn(n, m, generator=g) + bias for _ in range(count)]


def test_warm_start_cuts_iterations_and_keeps_capacity():
    first, second = draws(count=2)
    for method, kw in (("sinkhorn", {"tol": 1e-6}), ("sparse_ot", {})):
        prev = ot_router(first, 1, method=method, capacity_factor=1.25, **kw)
        cold = ot_router(second, 1, method=method, capacity_factor=1.25, **kw)
        warm = ot_router(second, 1, method=method, capacity_factor=1.25, init=(None, prev.solver.g), **kw)
        assert warm.solver.iterations < cold.solver.iterations, method
        assert warm.solver.residual < (1e-6 if method == "sinkhorn" else 1e-2), method
        assert (warm.tokens_per_expert <= warm.capacity).all() and warm.overflow >= 0
    # Sinkhorn's fixed point does not depend on the start: warm and cold plans agree
    ref = sinkhorn_plan(scores=second, eps=1.0, tol=1e-10)
    warm = sinkhorn_plan(scores=second, eps=1.0, tol=1e-10, init=(None, ot_router(first, 1).solver.g[0]))
    torch.testing.assert_close(warm.plan, ref.plan, rtol=0, atol=1e-6)


def test_scaling_and_log_domain_sinkhorn_agree():
    """The scaling-domain iteration (local scope) runs the log-domain loop's iterates:
    same iteration count, same plan to round-off; too wide a cost spread falls back."""
    from distreg.moe.routing_ot import _Scope, _sinkhorn_loop

    C = torch.rand(3, 40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fast = sinkhorn_plan(C, eps=0.2, tol=1e-11)
    a, b = torch.full((3, 40), 1 / 40, dtype=C.dtype), torch.full((3, 5), 1 / 5, dtype=C.dtype)
    f, g, it = _sinkhorn_loop(C, a.log(), b.log(), 0.2, torch.zeros_like(a), torch.zeros_like(b), 1000, 1e-11,
                              _Scope(None, 40, C.device))
    assert it == fast.iterations
    torch.testing.assert_close(fast.plan, ((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / 0.2).exp(), rtol=1e-9, atol=1e-13)
    P = ((fast.f.unsqueeze(-1) + fast.g.unsqueeze(-2) - C) / 0.2).exp()  # potentials describe the plan
    torch.testing.assert_close(P, fast.plan, rtol=1e-9, atol=1e-13)
    # spread ~22/0.2 = 110 > 100: the log domain (converges in ~3000 iterations; the
    # former C * 40 ran out its 50,000 iterations: minutes of CI on a loaded machine)
    big = sinkhorn_plan(C * 22, eps=0.2, tol=1e-9, max_iter=10_000)
    assert torch.isfinite(big.plan).all() and big.residual < 1e-9 and big.iterations < 10_000


def layer(router="sinkhorn", groups=4):
    torch.manual_seed(0)
    m = MoEFeedForward(16, 8, 4, top_k=1, group_size=8 if groups else 0, router=router)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return m


def test_layer_state_exact_mean_replayed_and_checkpointed():
    m = layer()
    assert torch.equal(m.router_duals, torch.zeros(4, dtype=torch.float64))  # cold start
    x1, x2 = torch.randn(32, 16), torch.randn(32, 16)
    m(x1)
    duals = m.router_fn.last_duals.double()
    centred = torch.round((duals - duals.mean(-1, keepdim=True)) / _DUAL_QUANTUM)
    expect = centred.sum(0) / 4 * _DUAL_QUANTUM
    assert torch.equal(m.router_duals, expect) and m.router_duals.abs().sum() > 0
    # the same integer sums in any split over ranks: order-independent in float64
    assert torch.equal((centred[:1].sum(0) + centred[1:].sum(0)) / 4 * _DUAL_QUANTUM, expect)
    start = m.router_duals.clone()
    out = m(x2)
    after = m.router_duals.clone()
    with _recomputing():  # activation checkpointing's re-run: same start, state untouched
        again = m(x2)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert torch.equal(m._duals_used, start) and torch.equal(m.router_duals, after)
    # checkpointed with the weights; eval forwards use it without changing it
    fresh = layer()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.router_duals, after)
    fresh.eval()
    with torch.no_grad():
        fresh(x1)
    assert torch.equal(fresh.router_duals, after)
    # top-k keeps no state
    t = layer("topk")
    t(x1)
    assert torch.equal(t.router_duals, torch.zeros(4, dtype=torch.float64))
