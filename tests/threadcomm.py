"""An in-process stand-in for `distreg.runtime.comm.Comm` over W threads (tests only): lets
rank-invariance tests try several world sizes and uneven or empty splits without
spawning processes. The real gloo path is covered once per family by a spawned test."""
from __future__ import annotations

import threading

import torch


class _Shared:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.slots: list = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=300)


class ThreadComm:
    """Same collective semantics as `Comm`: in-place all_reduce, rank-ordered all_gather,
    all_gather_uneven, broadcast; `calls` counts collective rounds."""

    def __init__(self, rank: int, shared: _Shared):
        self.rank, self.world_size, self._s = rank, shared.world_size, shared
        self.calls = 0

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        self._s.slots[self.rank] = t.detach().clone()
        self._s.barrier.wait()
        out = [x.clone() for x in self._s.slots]
        self._s.barrier.wait()
        return out

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        parts = self._exchange(t)
        red = {"sum": lambda a, b: a + b, "max": torch.maximum, "min": torch.minimum}[op]
        acc = parts[0]
        for p in parts[1:]:
            acc = red(acc, p)
        return t.copy_(acc)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        parts = self._exchange(t)
        if any(p.shape != t.shape or p.dtype != t.dtype for p in parts):
            raise RuntimeError("all_gather needs equal shapes and dtypes on every rank")
        return parts

    def all_gather_uneven(self, t: torch.Tensor) -> list[torch.Tensor]:
        parts = self._exchange(t)
        if any(p.shape[1:] != t.shape[1:] or p.dtype != t.dtype for p in parts):
            raise RuntimeError("all_gather_uneven needs equal trailing shapes and dtypes")
        return parts

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t.copy_(self._exchange(t)[src])

    def barrier(self) -> None:
        self._exchange(torch.zeros(1))


class NoComm:
    """A world-size-2 comm that fails on use: proves a code path needs no collectives."""

    rank, world_size = 0, 2

    def all_reduce(self, *a, **k):
        raise AssertionError("unexpected all_reduce")

    def all_gather(self, *a, **k):
        raise AssertionError("unexpected all_gather")


def run_threads(fn, world_size: int, *args, return_exceptions: bool = False) -> list:
    """Call `fn(comm, *args)` on `world_size` threads; per-rank results. An exception on a
    rank is re-raised here (the root cause, not the peers' broken barriers), or returned
    in that rank's place with `return_exceptions=True`."""
    shared = _Shared(world_size)
    results: list = [None] * world_size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(rank, shared), *args)
        except BaseException as e:  # noqa: BLE001 - handed back below
            results[rank] = e
            # Abort a moment later, not at once: peers that just left the last barrier of
            # the same collective (and will raise the same error) must not be caught
            # mid-release; peers stuck waiting for this rank are freed a second later.
            threading.Timer(1.0, shared.barrier.abort).start()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors and not return_exceptions:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results
