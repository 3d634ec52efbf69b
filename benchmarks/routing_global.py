"""Global-scope MoE routing on 2 gloo ranks: one OT problem over all tokens of the step,
tokens staying on their ranks, against the single-process solve of the same tokens.

    python benchmarks/routing_global.py [--tokens 4096] [--experts 8 64] [--k 1] [--cf 1.25]
                                        [--budget 3]

For sparse OT the per-expert top-k over all ranks' tokens is done two ways in the same
run: the exact radix selection of `distreg.sparsity` (`col_select="radix"`, the default: on
each rank's ~k local candidates per expert, one histogram all-reduce of [m, 256] int32
counts per key byte until every expert's threshold bucket holds <= 64 tokens, then one
all-gather of those buckets - typically 3-4 collectives per solver evaluation) and the exchange of every rank's top-k candidates (value, index)
per expert (`col_select="gather"`: one all-gather of 2·k·m float64 per rank, a buffer
of 2·k·m·W on every rank). Printed per method: median time
per routing call on the 2 ranks, its ratio to the single-process call, bytes sent per
rank per column selection, and the largest plan difference from the single-process
plan (rank invariance; float64 solves, as the MoE layer runs them).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distreg.moe import ot_router  # noqa: E402


def _logits(tokens: int, experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(tokens, experts, generator=g) + torch.linspace(0, 2, experts)


def _time(fn, budget: float, comm=None) -> tuple[float, object]:
    fn()  # warm-up
    times, out, start = [], None, time.perf_counter()
    while True:
        if comm is not None:
            comm.barrier()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        go = torch.tensor([float(time.perf_counter() - start < budget and len(times) < 15)])
        if comm is not None:
            comm.all_reduce(go, "min")  # every rank runs the same number of calls
        if not go.item():
            return statistics.median(times), out


METHODS = {
    "sinkhorn": dict(method="sinkhorn"),
    "sparse_ot radix": dict(method="sparse_ot", col_select="radix"),
    "sparse_ot gather": dict(method="sparse_ot", col_select="gather"),
}


def _route(logits, method, k, cf, comm):
    kw = dict(METHODS[method])
    return ot_router(logits, k, capacity_factor=cf, comm=comm, dtype=torch.float64, **kw)


def worker(tokens: int, experts: list[int], k: int, cf: float, budget: float) -> dict:
    from distreg.runtime.comm import Comm

    comm = Comm()
    torch.set_num_threads(1)
    out = {}
    for m in experts:
        logits = _logits(tokens, m)
        n = tokens // comm.world_size
        local = logits[comm.rank * n:(comm.rank + 1) * n]
        for method in METHODS:
            t, plan = _time(lambda: _route(local, method, k, cf, comm), budget, comm)
            out[(m, method)] = (t, plan.solver.plan, plan.solver.iterations)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--cf", type=float, default=1.25)
    ap.add_argument("--budget", type=float, default=3.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from distreg.testing import run_distributed

    ranks = run_distributed(worker, 2, args.tokens, args.experts, args.k, args.cf, args.budget)
    print(f"{args.tokens} tokens in global scope over 2 gloo ranks (1 thread each), k={args.k}, cf={args.cf}, "
          "float64 solves")
    print(f"{'experts':>7} {'method':<17} {'1 proc ms':>9} {'2 ranks ms':>10} {'ratio':>6} {'it 1/2':>8} "
          f"{'bytes/sel':>9} {'max |ΔT|':>9}")
    for m in args.experts:
        logits = _logits(args.tokens, m)
        cap = math.ceil(args.cf * args.tokens * args.k / m)
        for method in METHODS:
            t1, single = _time(lambda: _route(logits, method, args.k, args.cf, None), args.budget)
            t2, _, it2 = ranks[0][(m, method)]
            plan2 = torch.cat([r[(m, method)][1] for r in ranks], -2)
            diff = float((plan2 - single.solver.plan).abs().max())
            # radix: ~2 histogram rounds + the bucket gather (<= 64 (key, row) pairs per expert)
            sel_bytes = {"sinkhorn": "-", "sparse_ot radix": str(2 * m * 256 * 4 + 2 * 64 * m * 8),
                         "sparse_ot gather": str(2 * cap * m * 8)}[method]
            print(f"{m:>7} {method:<17} {t1 * 1e3:>9.1f} {t2 * 1e3:>10.1f} {t2 / t1:>6.2f} "
                  f"{f'{single.solver.iterations}/{it2}':>8} {sel_bytes:>9} {diff:>9.1e}")


if __name__ == "__main__":
    main()
