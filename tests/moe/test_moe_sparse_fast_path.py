"""The sparse-OT candidate path's CPU engineering (issue 14) against plain references:
row candidates by packed-key row maxima = torch.topk, the bound-cleared outside check =
the dense check, the lazily dense plan and the router's top-k read on the candidates =
the dense ones, scores read as -C = a negated cost, results usable outside inference
mode, the Cholesky solve's LU fallback, and the kinked-step stop saving only an idle step."""
from __future__ import annotations

import math

import pytest
import torch

import distreg.moe.sparse_newton as sparse_newton
from distreg.moe import ot_router, sparse_ot_plan
from distreg.moe.sparse_candidates import _missed_outside, row_candidates
from distreg.moe.sparse_newton import _solve_spd


def _routing_logits(seed, n=512, m=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g) + torch.linspace(0.0, 1.5, m)


@pytest.mark.parametrize("shape", [(2, 300, 64), (50, 5000), (3, 40, 10)])
def test_row_candidates_are_the_top_entries(shape):
    """Packed keys (CPU fp32, m <= 4096) and torch.topk (m = 5000) alike: the same sets as
    torch.topk, values within the key's resolution, and `rest` bounds every other entry
    (tight: at most the key resolution above the (c+1)-th largest)."""
    g = torch.Generator().manual_seed(0)
    U = torch.randn(*shape, generator=g) * 10
    c, m = 8, shape[-1]
    want_v, want_j = torch.topk(U, c + 1, dim=-1)
    top, J, rest = row_candidates(U.clone(), c)
    assert torch.equal(J.sort(-1).values, want_j[..., :c].sort(-1).values)
    res = 2.0 ** ((m - 1).bit_length() - 22)
    torch.testing.assert_close(top, U.gather(-1, J), rtol=res, atol=0)
    assert (top[..., :-1] >= top[..., 1:]).all()  # descending
    nxt = want_v[..., c]
    assert (rest >= nxt).all() and (rest <= nxt + nxt.abs() * 2 * res).all()


def test_row_candidates_infinities_and_too_few_entries():
    U = torch.tensor([[3.0, -math.inf, 1.0, math.inf, 2.0, 0.5, -1.0, 7.0, 4.0, -2.0]])
    top, J, rest = row_candidates(U.clone(), 3)
    assert sorted(J[0].tolist()) == [3, 7, 8]  # +inf ranks first, as in topk
    assert top[0, 0] >= 1e38 and float(rest[0]) >= 3.0
    top, J, rest = row_candidates(torch.randn(4, 5), 8)  # c >= m: every entry, rest -inf
    assert J.shape == (4, 5) and bool((rest == -math.inf).all())


def test_outside_check_by_bound_equals_the_dense_check():
    """Per problem, 'a positive X outside the candidates' from the bound + exact rows equals
    the full dense computation, on problems with and without such an entry."""
    g = torch.Generator().manual_seed(1)
    P, n, m, c = 4, 200, 40, 8
    S = torch.randn(P, n, m, generator=g)
    beta0 = torch.randn(P, m, generator=g) * 0.1
    _, J, rest = row_candidates(beta0.unsqueeze(-2) + S, c)
    J = J.mT.contiguous()
    beta = beta0 + torch.randn(P, m, generator=g) * 0.05
    alpha = -(beta0.unsqueeze(-2) + S).topk(2, -1).values[..., 1] - 0.2  # about one expert each
    alpha[1, 17] += 5.0  # problem 1: token 17 reaches experts outside its candidates
    alpha[3, :] += torch.linspace(0, 0.5, n)  # problem 3: later tokens creep up
    x = [alpha, beta]
    got = _missed_outside(S, x, beta0, J, rest)
    X = (alpha.unsqueeze(-1) + beta.unsqueeze(-2)) + S
    X = X.scatter(-1, J.mT, -math.inf)
    want = (X.amax(-1) > 0).any(-1)
    assert torch.equal(got, want) and bool(want[1]) and not bool(want[0])


def _warm_kw(n=1024):
    """The router's solve at E = 64 (column cap, 40 tokens' kink floor) and a warm start
    from a previous micro-step's logits."""
    kw = dict(gamma=0.1 * n, max_nz_col=math.ceil(1.25 * n / 64), tol=1e-3, max_iter=100, floor=40 / n)
    return kw, sparse_ot_plan(scores=_routing_logits(100, n), **kw).g


def test_sparse_plan_is_dense_on_demand_and_the_router_reads_it():
    """E = 64 in group scope (the candidate path): the plan is formed on first read and
    equals the support's entries; the router's choices read on the candidates equal the
    dense plan's top-k; every result is a normal tensor (kept, modified, differentiated)."""
    kw, warm = _warm_kw()
    L = _routing_logits(2, 1024)
    r = sparse_ot_plan(scores=L, init=(None, warm), **kw)
    assert r.info["solver"] == "newton" and r.support is not None and r.dense_plan is None
    plan = r.plan
    assert torch.equal(plan, r.support.dense()) and r.dense_plan is plan
    assert torch.equal(plan.gather(-1, r.support.experts), r.support.values)
    assert int((plan > 0).sum()) == int((r.support.values > 0).sum())  # nothing outside
    for t in (plan, r.f, r.g, r.support.values, r.info["residuals"]):
        assert not t.is_inference()
    r.g.mul_(1.0)  # an inference tensor refuses in-place updates outside inference mode
    for k in (1, 2):
        logits = L.clone().requires_grad_(True)
        d = ot_router(logits, k, method="sparse_ot", capacity_factor=1.25, init=(None, warm))
        assert d.solver.support is not None
        val, idx = d.solver.plan.topk(k, dim=-1)
        want = torch.where(val > 0, idx, torch.full_like(idx, -1))
        kept = d.expert_index >= 0
        assert torch.equal(d.expert_index[kept], want.view_as(d.expert_index)[kept])
        d.combine_weight.sum().backward()  # gates gathered at the chosen experts
        assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


def test_scores_are_read_as_the_negated_cost():
    """The candidate path reads scores as -C without a negated copy: the same plan and
    potentials, bit for bit, as the cost itself."""
    kw, warm = _warm_kw()
    L = _routing_logits(3, 1024)
    a = sparse_ot_plan(scores=L, init=(None, warm), **kw)
    b = sparse_ot_plan(-L, init=(None, warm), **kw)
    assert a.support is not None and b.support is not None
    assert torch.equal(a.plan, b.plan) and torch.equal(a.f, b.f) and torch.equal(a.g, b.g)


def test_spd_solve_falls_back_to_lu():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    rhs = torch.randn(2, 6, generator=g, dtype=torch.float64)
    spd = A @ A.mT + torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(_solve_spd(spd, rhs), torch.linalg.solve(spd, rhs.unsqueeze(-1)).squeeze(-1))
    indefinite = A + A.mT  # Cholesky fails: LU answers
    torch.testing.assert_close(_solve_spd(indefinite, rhs),
                               torch.linalg.solve(indefinite, rhs.unsqueeze(-1)).squeeze(-1))


def test_kinked_step_stop_saves_only_an_idle_step(monkeypatch):
    """Warm routing solves at E = 64: stopping at a kinked step below the kink floor never
    runs more iterations than waiting for an idle step, and where it stops earlier the
    steps it skipped had not halved the residual."""
    kw, warm = _warm_kw(2048)
    saved = 0
    for seed in range(7, 13):
        L = _routing_logits(seed, n=2048)
        with_rule = sparse_ot_plan(scores=L, init=(None, warm), **kw)
        monkeypatch.setattr(sparse_newton, "_KINK_GAIN", -math.inf)  # never "kinked"
        without = sparse_ot_plan(scores=L, init=(None, warm), **kw)
        monkeypatch.undo()
        assert with_rule.info["solver"] == without.info["solver"] == "newton"
        assert with_rule.iterations <= without.iterations
        if with_rule.iterations < without.iterations:
            saved += 1
            assert with_rule.residual < kw["floor"]
            assert without.residual > 0.5 * with_rule.residual
        warm = with_rule.g
    assert saved >= 1  # the rule is exercised


def test_router_kink_floor_keeps_small_groups_off_the_lbfgs_fallback():
    """1024-token groups at E = 64: the capped plan's kink floor (~20 tokens' mass, 2e-2)
    is above 10·tol, so with an explicit tol Newton's stall sends the solve to L-BFGS (~100
    iterations); the router's default floor (40 tokens' mass) accepts it after a few
    Newton steps, with the capacity kept and the same routing for >= 99% of tokens."""
    _, warm = _warm_kw()
    L = _routing_logits(9, 1024)
    d = ot_router(L, 1, method="sparse_ot", capacity_factor=1.25, init=(None, warm))
    assert d.solver.info["solver"] == "newton" and d.solver.iterations <= 20
    assert d.solver.residual < 40 / 1024 and int(d.tokens_per_expert.max()) <= d.capacity
    tight = ot_router(L, 1, method="sparse_ot", capacity_factor=1.25, init=(None, warm), tol=1e-3)
    assert tight.solver.info["solver"] == "newton+lbfgs" and tight.solver.iterations > 40
    assert float((d.expert_index == tight.expert_index).float().mean()) >= 0.99
