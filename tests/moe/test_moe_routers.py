"""Routers → dispatch plans: hand-checked 4-token cases, the spec's Sinkhorn-router vector,
capacity / per-token invariants for every router, routing-group mode (no collectives,
independent of how groups are spread over ranks), gradients of the combine weights."""
from __future__ import annotations

import math

import pytest
import torch

from distreg.moe import (
    dispatch_from_choices,
    expert_capacity,
    ot_router,
    sinkhorn_router,
    sns_router,
    sparse_ot_router,
    topk_router,
)



LOGITS = torch.tensor([[1.0, 0.8], [0.9, 0.1], [0.2, 1.0], [0.6, 0.5]])


class NoComm:
    """A world-size-2 comm that fails on use: proves a code path issues no collectives."""

    rank, world_size = 0, 2

    def all_reduce(self, *a, **k):
        raise AssertionError("unexpected all_reduce")

    def all_gather(self, *a, **k):
        raise AssertionError("unexpected all_gather")


def test_topk_router_hand_checked():
    # top-1 choices 0, 0, 1, 0; capacity 1 → tokens 1 and 3 overflow expert 0
    d = topk_router(LOGITS, 1, capacity=1)
    assert d.expert_index.view(-1).tolist() == [0, -1, 1, -1]
    assert d.position.view(-1).tolist() == [0, -1, 0, -1]
    assert d.tokens_per_expert.tolist() == [[1, 1]]
    assert (d.dropped_tokens, d.overflow, d.capacity) == (2, 2, 1)
    p = torch.softmax(LOGITS, -1)
    torch.testing.assert_close(d.combine_weight.view(-1), torch.tensor([p[0, 0], 0.0, p[2, 1], 0.0]))
    # Switch aux loss: m · Σ_j mean_prob_j · fraction_j, fractions (3/4, 1/4) before capacity
    P = p.mean(0)
    assert float(d.aux_loss) == pytest.approx(2 * (P[0] * 0.75 + P[1] * 0.25).item(), rel=1e-6)
    assert float(d.aux_loss) == pytest.approx(1.0187, abs=1e-4)
    assert float(d.z_loss) == pytest.approx(float(torch.logsumexp(LOGITS, -1).square().mean()), rel=1e-6)
    # uniform routing gives aux = 1 exactly
    u = topk_router(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 1)
    assert float(u.aux_loss) == pytest.approx(2 * (0.5 * 0.5 + 0.5 * 0.5))


def test_slot_major_priority_and_per_token_limit():
    # k=2, 3 tokens both experts each; capacity 2. Slot 0: t0→e0, t1→e1, t2→e0;
    # slot 1 (after all first choices): t0→e1 (pos 1), t1→e0 (pos 2: dropped), t2→e1 (dropped)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    d = topk_router(logits, 2, capacity=2)
    assert d.expert_index.tolist() == [[0, 1], [1, -1], [0, -1]]
    assert d.position.tolist() == [[0, 1], [0, -1], [1, -1]]
    assert (d.overflow, d.dropped_tokens) == (2, 0)
    assert d.tokens_per_expert.tolist() == [[2, 2]]
    nd = topk_router(logits, 2, capacity=2, normalize=True)
    torch.testing.assert_close(nd.combine_weight.sum(-1), torch.ones(3))
    assert expert_capacity(16, 4, 2, 1.25) == 10 and expert_capacity(16, 4, 1, None) == 16
    assert expert_capacity(4, 2, 2, 4.0) == 4  # never more than the group's tokens


def test_sinkhorn_router_spec_vector_3():
    d = sinkhorn_router(LOGITS, 1, gate="sigmoid")
    ref = torch.tensor([[0.132441, 0.117559], [0.168107, 0.081892], [0.073253, 0.176748], [0.126200, 0.123800]])
    torch.testing.assert_close(d.solver.plan[0], ref, rtol=0, atol=2e-6)
    assert d.solver.iterations == 4
    assert d.expert_index.view(-1).tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(d.combine_weight.view(-1), torch.tensor([0.731059, 0.710950, 0.731059, 0.645656]),
                               rtol=0, atol=1e-6)
    # two routing groups of 2 tokens route differently — why the group size is fixed (S5)
    g = sinkhorn_router(LOGITS, 1, group_size=2)
    assert g.expert_index.view(-1).tolist() == [1, 0, 1, 0]


def test_sparse_ot_router_hand_checked():
    # spec vector 1 with capacity 2 per expert: the exact balanced assignment
    d = sparse_ot_router(LOGITS, 1, capacity_factor=1.0, gamma=0.5, dtype=torch.float64, tol=1e-12)
    assert d.expert_index.view(-1).tolist() == [0, 0, 1, 1]
    assert d.tokens_per_expert.tolist() == [[2, 2]] and d.overflow == 0 and d.dropped_tokens == 0
    assert d.solver.info["nnz_col_max"] <= 2
    hard = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float64)
    torch.testing.assert_close(d.solver.plan[0] * 4, hard, rtol=0, atol=1e-6)


ROUTERS = {
    "topk": lambda x, k, **kw: topk_router(x, k, **kw),
    "sinkhorn": lambda x, k, **kw: sinkhorn_router(x, k, **kw),
    "sparse_ot": lambda x, k, **kw: sparse_ot_router(x, k, max_iter=40, **kw),
    "sns": lambda x, k, **kw: sns_router(x, k, **kw),
}


def check_invariants(d, N, m, k, G):
    idx, pos = d.expert_index, d.position
    assert idx.shape == (N, k) and pos.shape == (N, k)
    used = idx >= 0
    assert ((pos >= 0) == used).all() and (pos < d.capacity).all()
    for t in range(N):  # ≤ k distinct experts per token
        e = idx[t][used[t]]
        assert e.unique().numel() == e.numel()
    groups = N // G
    tpe = torch.zeros(groups, m, dtype=torch.int64)
    for g in range(groups):
        sl = slice(g * G, (g + 1) * G)
        for j in range(m):
            p = pos[sl][idx[sl] == j]
            assert p.numel() <= d.capacity  # capacity never exceeded
            assert sorted(p.tolist()) == list(range(p.numel()))  # dense, unique buffer rows
            tpe[g, j] = p.numel()
    assert torch.equal(tpe, d.tokens_per_expert)
    assert d.dropped_tokens == int((~used.any(-1)).sum())
    assert (d.combine_weight[~used] == 0).all()


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_invariants_and_group_mode(name):
    """Capacity, per-token limits, counters — and routing groups: one call over 4 groups
    equals 4 single-group calls (any split of whole groups over ranks gives the same
    dispatch) and issues no collective even with a multi-rank comm."""
    torch.manual_seed(0)
    G, m = 16, 4
    logits = torch.randn(4 * G, m) + torch.tensor([1.5, 0.5, 0.0, -0.5])  # skewed load
    fn = ROUTERS[name]
    for k, cf in ((1, 1.0), (2, 0.75)):
        d = fn(logits, k, capacity_factor=cf, group_size=G, comm=NoComm())
        assert d.capacity == math.ceil(cf * G * k / m)
        check_invariants(d, 4 * G, m, k, G)
        parts = [fn(logits[i * G:(i + 1) * G], k, capacity_factor=cf) for i in range(4)]
        assert torch.equal(d.expert_index, torch.cat([p.expert_index for p in parts]))
        assert torch.equal(d.position, torch.cat([p.position for p in parts]))
        torch.testing.assert_close(d.combine_weight, torch.cat([p.combine_weight for p in parts]))
        assert d.dropped_tokens == sum(p.dropped_tokens for p in parts)
    if name == "sparse_ot":  # the column cap holds by construction: nothing overflows
        assert d.overflow == 0
    if name != "topk":  # OT balances the load: never worse than top-k here
        t = topk_router(logits, 2, capacity_factor=0.75, group_size=G)
        assert d.dropped_tokens <= t.dropped_tokens


def test_combine_weights_carry_router_gradients():
    logits = LOGITS.clone().requires_grad_(True)
    for gate in ("softmax", "sigmoid"):
        d = ot_router(logits, 1, method="sinkhorn", gate=gate)
        (g,) = torch.autograd.grad(d.combine_weight.sum() + d.z_loss, logits)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    d = ot_router(logits, 1, method="sinkhorn", gate="plan")
    assert not d.combine_weight.requires_grad
    torch.testing.assert_close(d.combine_weight.view(-1), 4 * d.solver.plan[0].gather(-1, d.expert_index).view(-1))
    t = topk_router(logits, 1)
    (g,) = torch.autograd.grad(t.aux_loss, logits)
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="routing groups"):
        topk_router(LOGITS, 1, group_size=3)
    with pytest.raises(ValueError, match="method"):
        ot_router(LOGITS, 1, method="auction")


def test_dispatch_from_choices_ignores_empty_slots():
    ch = torch.tensor([[[1, -1], [1, 0], [-1, -1]]])
    pos, keep, tpe, overflow, dropped = dispatch_from_choices(ch, capacity=1, num_experts=2)
    assert pos.tolist() == [[[0, -1], [-1, 0], [-1, -1]]]
    assert tpe.tolist() == [[1, 1]] and overflow == 1 and dropped == 1
