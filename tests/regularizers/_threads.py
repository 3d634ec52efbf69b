"""Thread-backed `Comm` for the regularizer tests: the sparsity tests' `ThreadComm` plus the
two collectives these cores also use (uneven all-gather, broadcast)."""
from __future__ import annotations

import threading

import torch

from distreg.runtime.comm import Comm
from tests.sparsity.threadcomm import ThreadComm, _Shared


class RegThreadComm(ThreadComm):
    all_gather_uneven = Comm.all_gather_uneven

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t.copy_(self._exchange(t)[src])


def run_threads(fn, world_size: int, *args) -> list:
    """Call `fn(comm, *args)` on `world_size` threads; per-rank results. An exception on any
    rank is re-raised here."""
    shared = _Shared(world_size)
    results: list = [None] * world_size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(RegThreadComm(rank, shared), *args)
        except BaseException as e:  # noqa: BLE001 - re-raised below
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
    if errors:  # the root cause, not the other ranks' broken barriers
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


def split_rows(t: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    """Rows [cuts[r], cuts[r+1]) for each rank (cuts start at 0 and end at len(t))."""
    return [t[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
