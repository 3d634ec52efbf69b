"""Global magnitude top-k over sharded parameters: distreg's exact distributed selection
(`distreg.sparsity.magnitude_masks`, spec S1: radix-select histograms all-reduced, no
gather) against gather-then-`torch.kthvalue` and against
`torch.nn.utils.prune.global_unstructured` (L1Unstructured) on the whole model, in one run.

    python benchmarks/global_topk.py [--params 50] [--sparsity 0.9] [--repeats 3]

2 gloo ranks, one thread each. Each rank holds a row half (FSDP2 `Shard(0)`-like) of
every matrix; `--params` million parameters in total. Per method: the median wall time
and the peak resident memory above the level before the call (sampled every ~1 ms;
the larger of the two ranks), and its ratio to the distributed selection. torch.prune
needs the whole model in one process, so it runs on rank 0 only (with its own copy of
the full weights, allocated before its baseline is taken). Every method's pruned count
is checked; the masks must agree except on entries equal to the threshold (ties: torch
leaves the choice unspecified, the distributed and gather paths are canonical / all-ties).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distreg.runtime.comm import Comm  # noqa: E402
from distreg.sparsity import ShardScores, magnitude_masks  # noqa: E402
from distreg.testing import run_distributed  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Peak resident set size above the level at entry, sampled on a thread."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())
        self.extra_mb = (self.peak - self.base) / 2**20


def shapes_for(total_m: float) -> list[tuple[int, int]]:
    """Llama-like matrices (square attention, wide MLP), about `total_m` million params."""
    per_block = [(1024, 1024)] * 4 + [(2816, 1024), (2816, 1024), (1024, 2816)]
    n_block = sum(a * b for a, b in per_block)
    blocks = max(1, round(total_m * 1e6 / n_block))
    return per_block * blocks


def full_param(i: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i))


def rows_of(shape, rank, world):
    per = -(-shape[0] // world)
    return min(rank * per, shape[0]), min((rank + 1) * per, shape[0])


def timed(fn, repeats: int, comm: Comm):
    times, peaks, out = [], [], None
    for _ in range(repeats):
        out = None
        comm.barrier()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            comm.barrier()
            times.append(time.perf_counter() - t0)
        peaks.append(mem.extra_mb)
    return statistics.median(times), max(peaks), out


def worker(total_m: float, sparsity: float, repeats: int) -> dict:
    torch.manual_seed(0)
    comm = Comm()
    rank, world = comm.rank, comm.world_size
    shapes = shapes_for(total_m)
    local, starts = [], []
    for i, shape in enumerate(shapes):
        a, b = rows_of(shape, rank, world)
        local.append(full_param(i, shape)[a:b].clone())
        starts.append(a * shape[1])
    n_total = sum(a * b for a, b in shapes)
    k = round(sparsity * n_total)
    res = {"n_total": n_total, "k": k, "shapes": len(shapes)}

    # 1. distreg: exact distributed selection, nothing gathered
    def distributed():
        shards = [ShardScores(w, s, f"p{i}") for i, (w, s) in enumerate(zip(local, starts))]
        return magnitude_masks(shards, sparsity, comm)

    t, m, keep = timed(distributed, repeats, comm)
    pruned = comm.all_reduce(torch.tensor([sum(int((~x).sum()) for x in keep)]))
    res["distributed"] = (t, m, int(pruned))

    # 2. gather every shard to every rank, kthvalue over the concatenation
    def gather_kth():
        mine = torch.cat([w.reshape(-1).abs() for w in local])
        everything = torch.cat(comm.all_gather_uneven(mine))
        del mine
        thr = everything.kthvalue(k).values
        del everything
        return [w.reshape(-1).abs() > thr for w in local], float(thr)

    t, m, (keep_g, thr) = timed(gather_kth, repeats, comm)
    pruned_g = comm.all_reduce(torch.tensor([sum(int((~x).sum()) for x in keep_g)]))
    differ = sum(int(((a != b) & (w.reshape(-1).abs() != thr)).sum()) for a, b, w in zip(keep, keep_g, local))
    res["gather_kthvalue"] = (t, m, int(pruned_g))
    res["gather_differs_off_threshold"] = int(comm.all_reduce(torch.tensor([differ])))
    del keep_g

    # 3. torch.prune.global_unstructured on the whole model, one process (rank 0)
    if rank == 0:
        from torch import nn
        from torch.nn.utils import prune

        layers = []
        for i, shape in enumerate(shapes):
            lin = nn.Linear(1, 1, bias=False)
            lin.weight = nn.Parameter(full_param(i, shape), requires_grad=False)
            layers.append(lin)

        def torch_prune():
            prune.global_unstructured([(lin, "weight") for lin in layers], pruning_method=prune.L1Unstructured,
                                      amount=k)
            return [lin.weight_mask.bool().reshape(-1) for lin in layers]

        times, peaks = [], []
        for _ in range(max(1, repeats - 1)):  # the slowest method: fewer repeats
            for lin in layers:
                if prune.is_pruned(lin):
                    prune.remove(lin, "weight")
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                masks = torch_prune()
                times.append(time.perf_counter() - t0)
            peaks.append(mem.extra_mb)
        pruned_t = sum(int((~x).sum()) for x in masks)
        dist_thr_differ = 0
        for i, (x, w, s) in enumerate(zip(keep, local, starts)):  # rank 0's slice of each param
            mine = masks[i][s:s + w.numel()]
            dist_thr_differ += int(((mine != x) & (w.reshape(-1).abs() != thr)).sum())
        res["torch_prune"] = (statistics.median(times), max(peaks), pruned_t)
        res["prune_differs_off_threshold"] = dist_thr_differ
    comm.barrier()
    res["rank"] = rank
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=50, help="million parameters in total")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    # A fixed mmap threshold makes glibc return freed large blocks at once, so resident
    # memory follows live tensors (set before the ranks start: they read it at exec).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    t0 = time.perf_counter()
    ranks = run_distributed(worker, 2, args.params, args.sparsity, args.repeats)
    r0 = ranks[0]
    print(f"global magnitude top-k: {r0['n_total'] / 1e6:.1f}M parameters in {r0['shapes']} matrices, "
          f"sparsity {args.sparsity} (k = {r0['k']}), 2 gloo ranks x 1 thread, median of {args.repeats}")
    base_t = r0["distributed"][0]
    base_m = max(r["distributed"][1] for r in ranks)
    rows = [("distreg exact distributed (S1)", r0["distributed"][0], base_m, r0["distributed"][2]),
            ("gather + torch.kthvalue", r0["gather_kthvalue"][0], max(r["gather_kthvalue"][1] for r in ranks),
             r0["gather_kthvalue"][2]),
            ("torch.prune.global_unstructured (1 proc)", *r0["torch_prune"])]
    print(f"| method | time s | x time | peak extra MB/rank | x mem | pruned |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, t, m, pruned in rows:
        print(f"| {name} | {t:.3f} | {t / base_t:.2f} | {m:.0f} | {m / max(base_m, 1e-9):.1f} | {pruned} |")
    print(f"checks: distributed pruned exactly k: {r0['distributed'][2] == r0['k']}; torch.prune pruned k: "
          f"{r0['torch_prune'][2] == r0['k']}; masks differ off the threshold value: gather "
          f"{r0['gather_differs_off_threshold']}, torch.prune (rank 0 slices) {r0['prune_differs_off_threshold']}")
    print(f"total wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
