"""Sparse-OT Newton on per-token candidate experts (issue 14): the candidate column cap is
the dense one, and a warm start whose candidates miss optimal entries is caught by the
dense check and expanded to the dense solution (a batch = each problem alone)."""
from __future__ import annotations

import pytest
import torch

import distreg.moe.sparse_ot as sparse_ot
from distreg.moe import sparse_ot_plan
from distreg.moe.ot_select import _positive_topk_weights
from distreg.moe.sparse_candidates import candidate_positive_topk, densify, threshold_candidates

F64 = torch.float64




@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_candidate_column_cap_is_the_dense_rule(dtype):
    """Candidates holding every positive entry (plus padded slots): the same kept entries as
    the dense canonical selection, exact ties (lower token index dropped first) included."""
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        X = (torch.randint(-6, 4, (2, 23, 9), generator=g) * 0.5).to(dtype)  # many exact ties
        k = int(torch.randint(1, 8, (), generator=g))
        J, valid = threshold_candidates(X, 0.0, 6, floor=torch.zeros(2, 23, 1, dtype=dtype))
        if not bool(((X > 0).sum(-1) <= valid.sum(-1)).all()):
            continue  # a row with more positives than slots: not this test's case
        J, valid = J.mT.contiguous(), valid.mT.contiguous()  # the Newton's slot-major layout
        Xc = X.gather(-1, J.mT).mT.masked_fill(~valid, -torch.inf)
        GT, W, cnt = candidate_positive_topk(Xc, J, k, 9)
        want_T, want_W = _positive_topk_weights(X, k)
        assert torch.equal(densify(GT, J, 9), want_T) and torch.equal(densify(W, J, 9), want_W)
        assert torch.equal(cnt, want_W.sum(-2))


def _problem(seed, n=256, m=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g, dtype=F64) + torch.linspace(0, 1.5, m, dtype=F64)


@pytest.mark.parametrize("hide", [1.0, 50.0])
def test_missed_candidates_expand_to_the_dense_solution(monkeypatch, hide):
    """A warm start that pushes expert 5 down by ``hide``: 1.0 drops it from the 8
    candidates of tokens whose optimum needs it (the dense check finds them: one
    expansion from the candidate optimum); 50.0 hides it from every token, so the
    candidate problem cannot serve it at all (an unfinished round far from tol: solved
    again from the warm start on wider sets). Either way: the dense Newton's plan."""
    n, m, cap = 256, 32, 16
    L = torch.stack([_problem(1), _problem(2)])
    kw = dict(gamma=0.1 * n, max_nz_col=cap, tol=1e-9, max_iter=200, solver="newton")
    bad = sparse_ot_plan(scores=L, **kw).g.clone()
    bad[0, 5] -= hide
    got = sparse_ot_plan(scores=L, init=(None, bad), **kw)
    assert got.info["candidates"] == 8 and got.info["candidate_expansions"] >= 1
    monkeypatch.setattr(sparse_ot, "_CANDIDATES", m)  # m <= 2·candidates: the dense Newton
    dense = sparse_ot_plan(scores=L, init=(None, bad), **kw)
    assert "candidates" not in dense.info
    assert got.converged and dense.converged
    torch.testing.assert_close(got.plan, dense.plan, rtol=0, atol=1e-8)
    assert (got.plan > 0).sum(-2).max() <= cap
    monkeypatch.undo()
    for i in range(2):  # each problem alone = in the batch (problem 1 needs no expansion)
        alone = sparse_ot_plan(scores=L[i], init=(None, bad[i]), **kw)
        assert torch.equal(alone.plan, got.plan[i])
    assert sparse_ot_plan(scores=L[1], init=(None, bad[1]), **kw).info["candidate_expansions"] == 0


def test_warm_candidate_plan_statistics_are_the_dense_counts():
    """From a warm start (first step at half length), at fp32 as the router solves: the
    plan's support statistics, taken from the candidates, are the dense plan's counts,
    and the cap holds."""
    n, m, cap = 256, 32, 10
    L = torch.stack([_problem(3), _problem(4)]).float()
    kw = dict(gamma=0.1 * n, max_nz_col=cap, tol=1e-3, max_iter=100, solver="newton")
    warm = sparse_ot_plan(scores=L, **kw).g
    got = sparse_ot_plan(scores=L + 0.1 * torch.stack([_problem(5), _problem(6)]).float(), init=(None, warm), **kw)
    assert got.info["candidates"] == 8
    nz = got.plan > 0
    assert got.info["nnz_col_max"] == int(nz.sum(-2).max()) <= cap
    assert got.info["nnz_row_max"] == int(nz.sum(-1).max())
    assert got.info["density"] == float(nz.sum()) / (2 * n * m)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cost_is_refused_in_local_scope(bad):
    """The local-scope check is one sum of the cost; NaN, +inf and -inf entries all fail it."""
    C = _problem(7).float()
    C[3, 30] = bad
    with pytest.raises(ValueError, match="cost contains NaN or inf"):
        sparse_ot_plan(C, gamma=25.6, max_nz_col=10, tol=1e-3)
