"""Collectives facade used by hooks and functional cores.

Hooks never talk to torch.distributed, DeepSpeed or FSDP directly; they receive a
`Comm` (through `ctx.comm`). A `Comm` over world size 1 (no process group) makes
every collective a no-op, so functional cores run unchanged in a single process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


class Comm:
    """Collectives over one process group (default: the world group).

    All collectives are *collective*: every rank of the group must call them in the
    same order with tensors of the same shape and dtype.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.enabled else 0
        self.world_size = dist.get_world_size(group) if self.enabled else 1
        # NCCL only moves CUDA tensors; small CPU statistics (counts, losses) travel
        # through the current GPU and come back to the CPU.
        nccl = self.enabled and dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    def _to_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device) if self.device is not None and tensor.device.type == "cpu" else tensor

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce; returns `tensor` for chaining."""
        if self.world_size > 1:
            wire = self._to_wire(tensor)
            dist.all_reduce(wire, op=_OPS[op], group=self.group)
            if wire is not tensor:
                tensor.copy_(wire)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Gather equally-shaped tensors from every rank, in rank order."""
        if self.world_size == 1:
            return [tensor]
        wire = self._to_wire(tensor.contiguous())
        out = [torch.empty_like(wire) for _ in range(self.world_size)]
        dist.all_gather(out, wire, group=self.group)
        return [o.to(tensor.device) for o in out] if wire is not tensor else out

    def all_gather_uneven(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Gather tensors whose first dimension differs between ranks, in rank order."""
        if self.world_size == 1:
            return [tensor]
        n = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
        sizes = [int(s) for s in self.all_gather(n)]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        return [g[:s] for g, s in zip(self.all_gather(padded), sizes)]

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            wire = self._to_wire(tensor)
            dist.broadcast(wire, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group)
            if wire is not tensor:
                tensor.copy_(wire)
        return tensor

    def broadcast_object(self, obj, src: int = 0):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)
