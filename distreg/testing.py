"""Run a function on N local gloo ranks: the harness of the rank-invariance tests.

`run_distributed(fn, world_size, *args)` spawns `world_size` processes, initialises a
gloo process group in each, calls `fn(*args)` on every rank and returns the list of
per-rank return values (in rank order). `fn` must be importable (module level) and its
arguments and result picklable by torch.save.
"""
from __future__ import annotations

import os
import socket
import tempfile
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)  # a file that exists is complete
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        files = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world_size)]
        try:
            mp.start_processes(
                _worker,
                args=(world_size, free_port(), out_dir, fn, args),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
        except mp.ProcessExitedException as e:
            # A rank killed by a signal *after* every rank saved its result died in
            # process-group teardown (gloo's threads at exit, seen rarely on an
            # overloaded machine), not in the function under test: keep the results.
            # A Python exception in `fn` is a ProcessRaisedException and still raises.
            if not all(os.path.exists(f) for f in files):
                raise
            warnings.warn(f"run_distributed: {e} during teardown, after all ranks returned")
        return [torch.load(f, weights_only=False) for f in files]


def gather_full(shard, local: torch.Tensor, comm) -> torch.Tensor:
    """The full tensor of which `local` holds this rank's range of `shard` (collective;
    a replicated shard is returned as is)."""
    local = local.detach().reshape(-1)[: shard.numel]
    if shard.replicated:
        return local.clone().view(shard.full_shape)
    starts = comm.all_gather(torch.tensor([shard.flat_start, shard.numel]))
    pieces = comm.all_gather_uneven(local)
    full = torch.empty(shard.full_shape.numel(), dtype=local.dtype)
    for (start, n), piece in zip((s.tolist() for s in starts), pieces):
        full[start : start + n] = piece
    return full.view(shard.full_shape)


def gather_full_params(shards, comm) -> dict[str, torch.Tensor]:
    """Reassemble every full parameter from the ranks' `ParamShard`s (collective).

    A test and debugging utility: it materialises the whole model on every rank, which
    hooks must never do.
    """
    return {shard.name: gather_full(shard, shard.data().float(), comm) for shard in shards}


def gather_masks(hook, ctx) -> dict[str, torch.Tensor]:
    """Full bool masks of a mask hook (`hook.masks`: local slices by name; collective)."""
    return {shard.name: gather_full(shard, hook.masks[shard.name].to(torch.uint8), ctx.comm).bool()
            for shard in hook.shards(ctx)}
