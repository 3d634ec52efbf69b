"""MoE routing cost per call: softmax top-k against the OT routers of `distreg.moe`
(Sinkhorn, sparsity-constrained OT, Sinkhorn-Newton-Sparse) and POT's default
``ot.sinkhorn`` and log-domain Sinkhorn on the same cost matrix, for 4096 tokens ×
{8, 64} experts, one process.

    python benchmarks/routing.py [--tokens 4096] [--experts 8 64] [--k 1] [--cf 1.25]
                                 [--eps 1.0] [--rounds 30] [--warmup 5] [--threads 1]
                                 [--only sparse_ot ...]

Every call routes a *fresh* draw of token logits from one router distribution (Gaussian
plus a per-expert bias: a skewed router, as early in training, so top-k is unbalanced),
as consecutive micro-steps of one layer do. The OT routers are warm-started from the
expert potentials of their previous call ("warm", what the MoE layer does every
micro-step); "cold" rows start from zero every call; "sinkhorn solve" is the solver
alone (cost → plan, no dispatch, gates or losses): the like-for-like row for POT. ``--warmup`` calls precede the
timing; then ``--rounds`` rounds run every method once each, in the same order (A B C
... A B C ..., interleaved so machine noise hits all alike); medians are reported with
the ratio to top-k of the same rounds. ``it`` = median solver iterations per call in
steady state (SNS: warm-up + Newton; sparse OT: semi-smooth Newton steps, at E > 16 on each
token's 8 best experts with one check, `distreg/moe/sparse_candidates.py`; POT: its count). Load balance:
max/mean tokens per expert kept after capacity ``ceil(cf·n·k/m)`` and the share of
tokens dropped. OT solves use fp32 and the router defaults (Sinkhorn/SNS ``tol=1e-4``
on the L1 marginal residual, ``eps`` from ``--eps``; sparse OT ``gamma=0.1`` per token,
``tol=1e-3``, at most 100 Newton steps; it stops earlier at the capped dual's kink floor
when the capacity binds, as at E = 64: a stall below 40 tokens' mass, 1e-2 at 4096 tokens;
``--tokens 1024`` shows a smaller group, whose floor, 2e-2, is above 10·tol). POT runs on the same cost in float64
numpy at the same ``stopThr=1e-4`` (its default method checks the error every 10
iterations, so it may run a few more).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distreg.moe import ot_router, sinkhorn_plan, topk_router  # noqa: E402


def balance(counts: torch.Tensor) -> float:
    counts = counts.double().reshape(-1)
    return float(counts.max() / counts.mean())


class Method:
    """One contender: `call(logits)` routes and returns (iterations or None, plan info)."""

    def __init__(self, name, fn, warm=False):
        self.name, self.fn, self.warm = name, fn, warm
        self.g = None
        self.times, self.iters, self.kept, self.dropped = [], [], [], []

    def __call__(self, logits, record):
        kw = {"init": (None, self.g)} if self.warm and self.g is not None else {}
        t = time.perf_counter()
        out = self.fn(logits, **kw)
        dt = time.perf_counter() - t
        it = None
        if hasattr(out, "expert_index"):
            if out.solver is not None:
                it = out.solver.iterations
                if self.warm:
                    self.g = out.solver.g
            if record:
                self.kept.append(balance(out.tokens_per_expert))
                self.dropped.append(out.dropped_tokens / logits.shape[0])
        else:
            it = out
        if record:
            self.times.append(dt)
            if it is not None:
                self.iters.append(it)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--cf", type=float, default=1.25)
    ap.add_argument("--eps", type=float, default=1.0, help="entropic regularisation (Sinkhorn, SNS, POT)")
    ap.add_argument("--rounds", type=int, default=30, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first (warm starts settle)")
    ap.add_argument("--tol", type=float, default=1e-4, help="Sinkhorn / SNS / POT tolerance")
    ap.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                    help="run only these rows (e.g. topk sparse_ot; topk and 'POT default' are always kept as baselines)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: stable timings on shared CPUs; 0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        try:  # POT's numpy BLAS gets the same number of threads
            from threadpoolctl import threadpool_limits
            threadpool_limits(args.threads)
        except ImportError:
            pass
    try:
        import numpy as np
        import ot
    except ImportError:  # POT is a test extra
        ot = None
    n, k, eps, cf, tol = args.tokens, args.k, args.eps, args.cf, args.tol
    print(f"# {n} tokens, top-{k}, capacity factor {cf}, eps {eps}, tol {tol}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds after {args.warmup} warm-up rounds, "
          "fresh logits every call")
    print(f"| experts | method | ms/call | x topk | x POT default | it | kept max/mean | dropped |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in args.experts:
        gen = torch.Generator().manual_seed(0)
        bias = torch.linspace(0.0, 1.5, m)
        methods = [
            Method("topk", lambda lg, **kw: topk_router(lg, k, capacity_factor=cf)),
            Method("sinkhorn", lambda lg, **kw: ot_router(lg, k, method="sinkhorn", capacity_factor=cf, eps=eps,
                                                          tol=tol, **kw), warm=True),
            Method("sinkhorn cold", lambda lg, **kw: ot_router(lg, k, method="sinkhorn", capacity_factor=cf,
                                                               eps=eps, tol=tol)),
            # the solver alone (cost -> plan, what POT does): like for like with POT
            Method("sinkhorn solve", lambda lg, **kw: sinkhorn_plan(scores=lg, eps=eps, tol=tol, **kw).iterations,
                   warm=False),
            Method("sparse_ot", lambda lg, **kw: ot_router(lg, k, method="sparse_ot", capacity_factor=cf, **kw),
                   warm=True),
            Method("sparse_ot cold", lambda lg, **kw: ot_router(lg, k, method="sparse_ot", capacity_factor=cf)),
            Method("sns", lambda lg, **kw: ot_router(lg, k, method="sns", capacity_factor=cf, eps=eps, tol=tol,
                                                     **kw), warm=True),
        ]
        if ot is not None:
            a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)

            def pot(method):
                def run(lg, **kw):
                    C = (-lg).double().numpy()
                    _, log = ot.sinkhorn(a, b, C, eps, method=method, stopThr=tol, numItermax=1000, log=True)
                    return int(log["niter"])
                return run

            methods += [Method("POT default", pot("sinkhorn")), Method("POT log", pot("sinkhorn_log"))]
        if args.only:
            keep = set(args.only) | {"topk", "POT default"}
            methods = [mt for mt in methods if mt.name in keep]
        for r in range(args.warmup + args.rounds):
            logits = torch.randn(n, m, generator=gen) + bias
            for meth in methods:
                meth(logits, r >= args.warmup)
        med = {mt.name: statistics.median(mt.times) for mt in methods}
        for mt in methods:
            it = f"{statistics.median(mt.iters):.0f}" if mt.iters else "-"
            pot_ratio = f"{med[mt.name] / med['POT default']:.2f}" if "POT default" in med else "-"
            kept = f"{statistics.median(mt.kept):.2f}" if mt.kept else "(plan only)"
            dropped = f"{statistics.median(mt.dropped):.1%}" if mt.dropped else ""
            print(f"| {m} | {mt.name} | {med[mt.name] * 1e3:.2f} | {med[mt.name] / med['topk']:.2f} | {pot_ratio} "
                  f"| {it} | {kept} | {dropped} |", flush=True)
        if ot is None:
            print(f"| {m} | POT not installed (pip install pot): skipped | | | | | | |")


if __name__ == "__main__":
    main()
