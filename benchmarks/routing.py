"""MoE routing cost per step: softmax top-k against the OT routers of `distreg.moe`
(Sinkhorn, sparsity-constrained OT, Sinkhorn-Newton-Sparse) and POT's log-domain
Sinkhorn on the same cost matrix, for 4096 tokens × {8, 64} experts, one process.

    python benchmarks/routing.py [--tokens 4096] [--experts 8 64] [--k 1] [--cf 1.25]
                                 [--eps 1.0] [--budget 4] [--threads 1]

Logits are Gaussian plus a per-expert bias (a skewed router, as early in training), so
top-k is unbalanced. Each method is timed end to end (router logits → dispatch plan;
POT: cost matrix → plan) for up to ``--budget`` seconds (at least one call after one
warm-up call); the median is reported with its ratio to top-k. Load balance is the
max/mean tokens per expert: "claims" before capacity (the router's own balance, from a
call without capacity), "kept" after capacity ``ceil(cf·n·k/m)``, plus the share of
tokens dropped. OT solves use fp32 and their router defaults (Sinkhorn/SNS ``tol=1e-4``,
``eps`` from ``--eps``, default 1 as in the router; smaller ``eps`` is where SNS's Newton
stage matters; sparse OT ``gamma=0.1`` per token, ``tol=1e-3``, at most 100 L-BFGS
iterations); ``it`` = solver iterations (SNS: warm-up + Newton; sparse OT: L-BFGS).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distreg.moe import ot_router, topk_router  # noqa: E402


def timed(fn, budget: float):
    fn()  # warm-up
    times, out = [], None
    start = time.perf_counter()
    while not times or (time.perf_counter() - start < budget and len(times) < 20):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times), out


def balance(counts: torch.Tensor) -> float:
    counts = counts.double().reshape(-1)
    return float(counts.max() / counts.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--cf", type=float, default=1.25)
    ap.add_argument("--eps", type=float, default=1.0, help="entropic regularisation (Sinkhorn, SNS, POT)")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of timing per method")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: stable timings on shared CPUs; 0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import numpy as np
        import ot
    except ImportError:  # POT is a test extra
        ot = None
    n, k, eps = args.tokens, args.k, args.eps
    print(f"# {n} tokens, top-{k}, capacity factor {args.cf}, eps {eps}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    header = f"{'experts':>7} {'method':<12} {'ms/step':>9} {'x topk':>7} {'it':>5} {'claims max/mean':>16} " \
             f"{'kept max/mean':>14} {'dropped':>8} {'residual':>9}"
    print(header)
    for m in args.experts:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(n, m, generator=g) + torch.linspace(0.0, 1.5, m)
        methods = {
            "topk": lambda cf, lg=logits: topk_router(lg, k, capacity_factor=cf),
            "sinkhorn": lambda cf, lg=logits: ot_router(lg, k, method="sinkhorn", capacity_factor=cf, eps=eps),
            "sparse_ot": lambda cf, lg=logits: ot_router(lg, k, method="sparse_ot", capacity_factor=cf),
            "sns": lambda cf, lg=logits: ot_router(lg, k, method="sns", capacity_factor=cf, eps=eps),
            "sns-schur": lambda cf, lg=logits: ot_router(lg, k, method="sns", capacity_factor=cf, eps=eps,
                                                         variant="schur"),
        }
        base = None
        for name, fn in methods.items():
            t, reps, d = timed(lambda: fn(args.cf), args.budget)
            base = base or t
            free = fn(None)  # no capacity: the router's own balance
            claims = balance(free.tokens_per_expert)
            it = d.solver.iterations if d.solver is not None else "-"
            res = f"{d.solver.residual:.1e}" if d.solver is not None else "-"
            print(f"{m:>7} {name:<12} {t * 1e3:>9.1f} {t / base:>7.1f} {it!s:>5} {claims:>16.2f} "
                  f"{balance(d.tokens_per_expert):>14.2f} {d.dropped_tokens / n:>8.1%} {res:>9}", flush=True)
        if ot is not None:
            C = (-logits).double().numpy()
            a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
            holder = {}

            def pot():
                P, log = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", stopThr=1e-4, numItermax=1000, log=True)
                holder.update(P=P, it=log["niter"])
                return P

            t, reps, P = timed(pot, args.budget)
            P = torch.from_numpy(P)
            res = float((P.sum(1) - torch.from_numpy(a)).abs().sum() + (P.sum(0) - torch.from_numpy(b)).abs().sum())
            claims = balance(torch.bincount(P.argmax(-1), minlength=m))
            print(f"{m:>7} {'POT sinkhorn':<12} {t * 1e3:>9.1f} {t / base:>7.1f} {holder['it']!s:>5} "
                  f"{claims:>16.2f} {'(plan only)':>14} {'':>8} {res:>9.1e}", flush=True)
        else:
            print(f"{m:>7} POT not installed (pip install pot): skipped")


if __name__ == "__main__":
    main()
