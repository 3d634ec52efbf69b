"""Semi-smooth Newton for the sparse-OT dual (issue 14): the same plans as POT's
`ot.smooth` / L-BFGS where those converge, the canonical float column selection it
uses, and the warm-started routing path (capacity by construction, batch = alone)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distreg.moe import ot_router, sparse_ot_plan
from distreg.moe.ot_select import _positive_topk_mask, _positive_topk_weights

ot = pytest.importorskip("ot")
import ot.smooth  # noqa: E402

F64 = torch.float64




def _canonical_keep(X, k):
    """Brute force per column: the k largest positive entries; equal values drop the
    lower token index first."""
    keep = X > 0
    for p in range(X.shape[0]):
        for j in range(X.shape[2]):
            rows = keep[p, :, j].nonzero().view(-1).tolist()
            for r in sorted(rows, key=lambda r: (float(X[p, r, j]), r))[:max(len(rows) - k, 0)]:
                keep[p, r, j] = False
    return keep


def test_float_column_selection_is_canonical_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        X = torch.randint(-2, 4, (2, 17, 5), generator=g).to(F64) * 0.5  # many exact ties, zeros
        k = int(torch.randint(1, 17, (), generator=g))
        Xp, W = _positive_topk_weights(X, k)
        want = _canonical_keep(X, k)
        assert torch.equal(W.bool(), want), k
        assert torch.equal(Xp, X.clamp_min(0) * want)
        # the same set as the boolean top-k mask wherever there is no tie to break
        Y = X + torch.rand(X.shape, generator=g, dtype=F64) * 1e-3
        assert torch.equal(_positive_topk_weights(Y, k)[1].bool(), _positive_topk_mask(Y, k, -2, None))


@pytest.mark.parametrize("k", [None, 6])
def test_newton_alone_matches_pot_and_lbfgs(k):
    """Slack or absent cap (no kink): Newton alone converges, to POT's plan."""
    n, m = 10, 4
    C = torch.rand(3, n, m, generator=torch.Generator().manual_seed(0), dtype=F64)
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    rn = sparse_ot_plan(C, gamma=0.5, max_nz_col=k, tol=1e-10, solver="newton")
    rl = sparse_ot_plan(C, gamma=0.5, max_nz_col=k, tol=1e-10, solver="lbfgs")
    assert rn.converged and rn.info["solver"] == "newton" and rn.iterations < rl.iterations
    torch.testing.assert_close(rn.plan, rl.plan, rtol=0, atol=1e-8)
    for i in range(3):
        kw = {"reg_type": "l2"} if k is None else {"reg_type": "sparsity_constrained", "max_nz": k}
        P = ot.smooth.smooth_ot_dual(a, b, C[i].numpy(), 0.5, stopThr=1e-14, numItermax=2000, **kw)
        np.testing.assert_allclose(rn.plan[i].numpy(), P, atol=1e-6)


def test_auto_keeps_the_better_dual_where_newton_stalls():
    """Spec vector 1, k = 2 (hard assignment): the optimum has a flat face Newton cannot
    leave; "auto" adds L-BFGS and returns the exact assignment."""
    logits = torch.tensor([[1.0, 0.8], [0.9, 0.1], [0.2, 1.0], [0.6, 0.5]], dtype=F64)
    hard = torch.tensor([[0.25, 0], [0.25, 0], [0, 0.25], [0, 0.25]], dtype=F64)
    r = sparse_ot_plan(scores=logits, gamma=0.5, max_nz_col=2, tol=1e-12)
    assert r.info["solver"] == "newton+lbfgs"
    torch.testing.assert_close(r.plan, hard, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="solver"):
        sparse_ot_plan(scores=logits, max_nz_row=1, solver="newton")


def test_warm_started_router_runs_newton_with_capacity_and_batch_invariance():
    g = torch.Generator().manual_seed(1)
    bias = torch.linspace(0.0, 1.5, 8)
    first, second = (torch.randn(4 * 128, 8, generator=g) + bias for _ in range(2))
    prev = ot_router(first, 1, method="sparse_ot", capacity_factor=1.25, group_size=128)
    init = (None, prev.solver.g)
    d = ot_router(second, 1, method="sparse_ot", capacity_factor=1.25, group_size=128, init=init)
    assert d.solver.info["solver"] == "newton"
    assert (d.tokens_per_expert <= d.capacity).all() and d.solver.info["nnz_col_max"] <= d.capacity
    assert d.overflow == 0  # the column cap holds by construction
    cold = ot_router(second, 1, method="sparse_ot", capacity_factor=1.25, group_size=128)
    assert d.solver.iterations < cold.solver.iterations
    # a capacity of exactly n/m (hard assignment): Newton alone stalls far from tol, "auto"
    # adds L-BFGS and is never worse
    hard = ot_router(second[:128], 1, method="sparse_ot", capacity_factor=1.0, solver="newton")
    auto = ot_router(second[:128], 1, method="sparse_ot", capacity_factor=1.0)
    assert auto.solver.residual <= hard.solver.residual
    for i in range(4):  # one group alone = the same group in the batch
        alone = ot_router(second[i * 128:(i + 1) * 128], 1, method="sparse_ot", capacity_factor=1.25,
                          init=(None, prev.solver.g[i:i + 1]))
        assert torch.equal(alone.expert_index, d.expert_index[i * 128:(i + 1) * 128])
        assert torch.equal(alone.solver.plan[0], d.solver.plan[i])
