"""Collective helpers shared by the regularizer cores (all no-ops for `comm=None` or world size 1).

Two gradient conventions appear in this package; every public function says which one it uses.

* **replicated** (parameter terms, spec P2/P3): every rank computes the *same* value from
  all-reduced partial sums, and the gradient each rank gets on its local shard is exactly the
  slice of the full gradient. Built with `sum_spliced`: the forward value is the global sum, the
  backward is the identity into the local partial. Exact as long as the value depends on the
  local elements only through such sums (callers centre higher moments on a detached point).
  Such gradients must not go through the data-parallel average again (P2b).
* **partial** (data terms, spec P1/P5): each rank's value is its share of the global value
  (shares sum to it) and each rank's gradient is its share of the full gradient. Under a
  strategy that averages gradients over ranks, multiply by the world size.
"""
from __future__ import annotations

import torch

from distreg.runtime.comm import Comm


def active(comm: Comm | None) -> bool:
    return comm is not None and comm.world_size > 1


def all_reduce_nograd(t: torch.Tensor, comm: Comm | None, op: str = "sum") -> torch.Tensor:
    """A detached, all-reduced copy of `t` (t itself is not modified)."""
    out = t.detach().clone()
    return comm.all_reduce(out, op=op) if active(comm) else out


def sum_spliced(local: torch.Tensor, comm: Comm | None) -> torch.Tensor:
    """Global sum over ranks (same value on every rank, bit for bit) whose backward is the
    identity into `local` ("replicated" convention)."""
    if not active(comm):
        return local
    total = all_reduce_nograd(local, comm)
    return total + (local - local.detach())


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks (SyncBN style), so
    each rank's gradient is d(sum of all ranks' losses)/d(local input)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return comm.all_reduce(t.detach().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_reduce(grad.contiguous().clone()), None


def sum_partial(local: torch.Tensor, comm: Comm | None) -> torch.Tensor:
    """Global sum for "partial"-convention losses; collective in forward *and* backward."""
    return _AllReduceSum.apply(local, comm) if active(comm) else local


def gather_spliced(local: torch.Tensor, comm: Comm | None) -> tuple[torch.Tensor, int]:
    """All-gather along dim 0 in rank order (uneven sizes allowed), with this rank's own rows
    replaced by the grad-carrying `local` (spec P5, "gather with local splice"). Returns the
    global tensor and the offset of this rank's rows in it."""
    if not active(comm):
        return local, 0
    parts = comm.all_gather_uneven(local.detach().contiguous())
    offset = sum(p.shape[0] for p in parts[: comm.rank])
    parts[comm.rank] = local
    return torch.cat(parts), offset
