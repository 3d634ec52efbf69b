"""Global scope (spec S5): token rows split unevenly over ranks, per-expert statistics
exchanged. Rank invariance = the concatenated per-rank plans / dispatches equal the
single-process ones on the same tokens, with the same iteration count on every rank.
Many world sizes and splits run on in-process thread ranks; one real 2-rank gloo run
checks the same things through `Comm` and torch.distributed."""
from __future__ import annotations

import dataclasses
import functools
import threading

import pytest
import torch

from distreg.moe import ot_router, sinkhorn_plan, sns_plan, sparse_ot_plan, topk_router
from distreg.moe.routing_ot import _global_positive_topk_cols, _Scope, _topk_cols
from distreg.runtime.comm import Comm
from distreg.testing import run_distributed

F64 = torch.float64




class ThreadComm:
    """`Comm` semantics (in-place all_reduce, rank-ordered all_gather) over W threads."""

    def __init__(self, rank, world_size, shared):
        self.rank, self.world_size, self._s = rank, world_size, shared

    def _exchange(self, t):
        slots, barrier = self._s
        slots[self.rank] = t.detach().clone()
        barrier.wait()
        out = [x.clone() for x in slots]
        barrier.wait()
        return out

    def all_reduce(self, t, op="sum"):
        parts = self._exchange(t)
        red = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[op]
        acc = parts[0]
        for p in parts[1:]:
            acc = red(acc, p)
        return t.copy_(acc)

    def all_gather(self, t):
        return self._exchange(t)


def run_threads(fn, world_size, *args):
    shared = ([None] * world_size, threading.Barrier(world_size, timeout=60))
    out = [None] * world_size

    def body(r):
        try:
            out[r] = fn(ThreadComm(r, world_size, shared), *args)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out[r] = e
            shared[1].abort()

    ts = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for o in out:
        if isinstance(o, BaseException):
            raise o
    return out


def cuts(sizes):
    edges = [0]
    for s in sizes:
        edges.append(edges[-1] + s)
    return list(zip(edges[:-1], edges[1:]))


# solver cases: (name, fn(cost_local, comm) -> OTResult, same iteration count as 1 process?)
SOLVERS = [
    ("sinkhorn", lambda C, c: sinkhorn_plan(C, eps=0.3, tol=1e-10, comm=c), True),
    ("dual_col", lambda C, c: sparse_ot_plan(C, gamma=0.5, max_nz_col=4, tol=1e-9, comm=c), False),
    ("dual_col_gather", lambda C, c: sparse_ot_plan(C, gamma=0.5, max_nz_col=4, tol=1e-9, comm=c,
                                                    col_select="gather"), False),
    ("semi_col", lambda C, c: sparse_ot_plan(C, gamma=0.5, max_nz_col=4, tol=1e-9, formulation="semi_dual",
                                             comm=c), False),
    ("dual_row", lambda C, c: sparse_ot_plan(C, gamma=0.5, max_nz_row=2, tol=1e-9, comm=c), False),
    ("semi_row", lambda C, c: sparse_ot_plan(C, gamma=0.5, max_nz_row=2, tol=1e-9, formulation="semi_dual",
                                             comm=c), False),
    ("sns", lambda C, c: sns_plan(C, eps=0.3, warmup_iters=3, tol=1e-11, variant="schur", comm=c), True),
]
# seed 3: every problem converges (no kink stall) and the column cap of 4 is active
COST = torch.rand(2, 12, 4, generator=torch.Generator().manual_seed(3), dtype=F64)


def _solve_local(comm, sizes):
    lo, hi = cuts(sizes)[comm.rank]
    return {name: fn(COST[:, lo:hi], comm) for name, fn, _ in SOLVERS}


@functools.lru_cache(maxsize=None)
def reference(name):
    """Single-process solve on all tokens (computed once per test session)."""
    return dict((n, f) for n, f, _ in SOLVERS)[name](COST, None)


def check_solvers(per_rank, sizes, tag):
    for name, fn, same_iters in SOLVERS:
        ref = reference(name)
        plans = [r[name].plan for r in per_rank]
        assert [p.shape[-2] for p in plans] == list(sizes)
        torch.testing.assert_close(torch.cat(plans, -2), ref.plan, rtol=0, atol=1e-9, msg=f"{tag} {name}")
        its = {r[name].iterations for r in per_rank}
        assert len(its) == 1, (tag, name, its)  # every rank ran the same loop
        assert {r[name].residual for r in per_rank} == {per_rank[0][name].residual}
        if same_iters:
            assert its == {ref.iterations}, (tag, name, its, ref.iterations)
        assert ref.converged, (name, ref.residual)
        if name.endswith("col"):
            assert {r[name].info["nnz_col_max"] for r in per_rank} == {ref.info["nnz_col_max"]} == {4}


@pytest.mark.parametrize("sizes", [(3, 5, 4), (12, 0), (1, 1, 10)])
def test_global_solvers_on_thread_ranks(sizes):
    check_solvers(run_threads(_solve_local, len(sizes), sizes), sizes, sizes)


def test_global_topk_candidates_merge_exactly():
    # column maxima all on one rank and k larger than some ranks' token counts
    X = torch.tensor([[0.1, 5.0], [0.2, 4.0], [0.3, 3.0], [9.0, 2.0], [8.0, 1.0], [7.0, 0.0]], dtype=F64)
    sizes = (1, 2, 3)

    def body(comm):
        lo, hi = cuts(sizes)[comm.rank]
        return _topk_cols(X[lo:hi], 4, _Scope(comm, hi - lo, "cpu"))

    out = run_threads(body, 3)
    mask = torch.cat([m for m, _ in out], 0)
    assert mask.T.tolist() == [[False, False, True, True, True, True], [True, True, True, True, False, False]]
    for _, top in out:
        assert top.T.tolist() == [[9.0, 8.0, 7.0, 0.3], [5.0, 4.0, 3.0, 2.0]]


def test_invalid_input_on_one_rank_raises_on_every_rank():
    """Validation is decided on all-reduced flags: no rank is left waiting in a collective."""
    def body(comm):
        C = COST[0, 6 * comm.rank:6 * comm.rank + 6].clone()
        if comm.rank == 1:
            C[2, 1] = float("nan")
        try:
            sparse_ot_plan(C, max_nz_col=4, comm=comm)
        except ValueError as e:
            return str(e)
        return "no error"

    assert run_threads(body, 2) == ["cost contains NaN or inf"] * 2


LOGITS = torch.randn(20, 4, generator=torch.Generator().manual_seed(1)) + torch.tensor([1.0, 0.3, 0.0, -0.3])
ROUTE = [
    ("topk", lambda x, c: topk_router(x, 2, capacity_factor=0.75, comm=c)),
    ("sinkhorn", lambda x, c: ot_router(x, 1, method="sinkhorn", capacity_factor=1.0, comm=c, tol=1e-6)),
    ("sns", lambda x, c: ot_router(x, 2, method="sns", capacity_factor=0.75, comm=c, tol=1e-9, dtype=F64)),
    ("sparse_ot", lambda x, c: ot_router(x, 1, method="sparse_ot", capacity_factor=1.25, comm=c, dtype=F64)),
]


def detached(d):
    """Results cross process boundaries through torch.save: no autograd graph."""
    return dataclasses.replace(d, combine_weight=d.combine_weight.detach(), z_loss=d.z_loss.detach(),
                               aux_loss=None if d.aux_loss is None else d.aux_loss.detach())


def _route_local(comm, sizes):
    lo, hi = cuts(sizes)[comm.rank]
    x = LOGITS[lo:hi].clone().requires_grad_(True)
    out = {}
    for name, fn in ROUTE:
        d = fn(x, comm)
        grad = torch.autograd.grad(d.aux_loss, x, retain_graph=True)[0] if d.aux_loss is not None else None
        out[name] = (detached(d), grad)
    return out


def check_routes(per_rank, tag):
    x = LOGITS.clone().requires_grad_(True)
    for name, fn in ROUTE:
        ref = fn(x, None)
        ds = [r[name][0] for r in per_rank]
        for key in ("expert_index", "position"):
            assert torch.equal(torch.cat([getattr(d, key) for d in ds]), getattr(ref, key)), (tag, name, key)
        torch.testing.assert_close(torch.cat([d.combine_weight for d in ds]), ref.combine_weight)
        for d in ds:
            assert torch.equal(d.tokens_per_expert, ref.tokens_per_expert), (tag, name)
            assert (d.dropped_tokens, d.overflow, d.capacity) == (ref.dropped_tokens, ref.overflow, ref.capacity)
        if ref.aux_loss is not None:
            for d in ds:
                torch.testing.assert_close(d.aux_loss, ref.aux_loss)  # value: the global loss
            g = torch.autograd.grad(ref.aux_loss, x)[0]
            torch.testing.assert_close(torch.cat([r[name][1] for r in per_rank]), g)  # ∂global/∂local
        else:
            assert len({d.solver.iterations for d in ds}) == 1


def test_global_routers_on_thread_ranks():
    for sizes in ((7, 13), (5, 5, 6, 4)):
        check_routes(run_threads(_route_local, len(sizes), sizes), sizes)


# --------------------------------------------------------------------------- real gloo


GLOO_SIZES = (7, 5)


def gloo_worker():
    """One spawned rank: every global-scope solver and router through the real `Comm`."""
    comm = Comm()
    return {"solve": _solve_local(comm, GLOO_SIZES),
            "route": _route_local(comm, (11, 9)),
            "rank": comm.rank}


def test_two_gloo_ranks_match_single_process():
    per_rank = run_distributed(gloo_worker, 2)
    assert [r["rank"] for r in per_rank] == [0, 1]
    check_solvers([r["solve"] for r in per_rank], GLOO_SIZES, "gloo")
    check_routes([r["route"] for r in per_rank], "gloo")


def _canonical_keep(X, k):
    """Brute force per column: the k largest positive entries; among equal values the
    lower rows are dropped first (sort by (value, row), drop the smallest P - k)."""
    keep = X > 0
    for j in range(X.shape[1]):
        rows = keep[:, j].nonzero().view(-1).tolist()
        order = sorted(rows, key=lambda r: (float(X[r, j]), r))
        for r in order[:max(len(rows) - k, 0)]:
            keep[r, j] = False
    return keep


@pytest.mark.parametrize("sizes", [(6, 7, 4), (17, 0), (1, 1, 15)])
def test_global_positive_topk_columns_exact_with_ties(sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    X = torch.randint(-2, 4, (sum(sizes), 5), generator=g).to(F64)  # many ties, zeros, negatives
    edges = cuts(sizes)
    for k in (1, 3, 20):
        want = _canonical_keep(X, k)
        res = run_threads(lambda comm: _global_positive_topk_cols(
            X[edges[comm.rank][0]:edges[comm.rank][1]], k, _Scope(comm, sizes[comm.rank], "cpu")), len(sizes))
        assert torch.equal(torch.cat(res), want), (sizes, k)
