"""Per-sample state sharded over ranks, keyed by the stable global dataset index (spec P4).

Used by PS-KD (previous-epoch predictions) and ELR (temporal-ensemble targets): an
``N × C`` table that does not fit (or should not be replicated) on every rank —
ImageNet-1k × 1000 classes × fp32 is 5.1 GB — is split into contiguous row blocks:
rank ``r`` owns rows ``[r·S, min((r+1)·S, N))`` with ``S = ceil(N / W)``.

Collective semantics (read this before calling):

* `read` and `write` are COLLECTIVE: every rank of ``comm`` must call them together, in the
  same order, each with its OWN index set (different per rank, possibly empty).
* read: requested indices are all-gathered (`Comm.all_gather_uneven`); every owner then
  contributes the rows it owns, in global request order, to one all-gather; each rank keeps
  the answers to its own request. Per call every rank receives the rows requested by all
  ranks (O(global batch × width)), never the table.
* write: indices and values are all-gathered; each owner stores the rows it owns. If an
  index occurs more than once in one write (over all ranks), the LAST occurrence in global
  order (rank order, then position) wins — deterministic, unlike ``index_put_``. Mask out
  ``DistributedSampler`` padding duplicates with ``valid_mask`` instead of relying on it.
* Rank invariance (single-process equivalence) needs: all reads of a step before any write
  of that step, each index visited at most once per epoch.
* Out-of-range indices raise ``IndexError`` on every rank (checked after the gather, so no
  rank is left waiting in a collective).

Storage dtype is fp32 by default; ``dtype=torch.bfloat16`` halves memory and rounds every
written value to bf16 (an explicit numerics change). Reads return float32.
"""
from __future__ import annotations

import math

import torch

from distreg.runtime.comm import Comm

__all__ = ["ShardedSampleStore"]


class ShardedSampleStore:
    """``num_samples × width`` per-sample table, rows sharded contiguously over ``comm``.

    ``device`` holds the local slice; collectives run on ``transport_device`` (default:
    ``device``; use a CUDA device with NCCL and a host-memory table). ``fill`` is the initial
    value of every row (ELR starts its targets at 0)."""

    def __init__(self, num_samples: int, width: int, comm: Comm | None = None, dtype: torch.dtype = torch.float32,
                 *, device: torch.device | str = "cpu", transport_device: torch.device | str | None = None,
                 fill: float = 0.0):
        if num_samples < 0 or width < 1:
            raise ValueError(f"need num_samples >= 0 and width >= 1, got {num_samples}, {width}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"unsupported store dtype {dtype}")
        self.comm = comm if comm is not None else Comm()
        self.num_samples, self.width, self.dtype = int(num_samples), int(width), dtype
        self.world_size, self.rank = int(self.comm.world_size), int(self.comm.rank)
        self.rows_per_rank = max(1, math.ceil(self.num_samples / self.world_size))
        self.start = min(self.rank * self.rows_per_rank, self.num_samples)
        self.stop = min(self.start + self.rows_per_rank, self.num_samples)
        self.device = torch.device(device)
        self.transport_device = torch.device(transport_device) if transport_device is not None else self.device
        self.table = torch.full((self.stop - self.start, self.width), float(fill), dtype=dtype, device=self.device)

    # ------------------------------------------------------------------ helpers
    @property
    def local_range(self) -> tuple[int, int]:
        """``[start, stop)`` global rows owned by this rank."""
        return self.start, self.stop

    def owner(self, indices: torch.Tensor) -> torch.Tensor:
        """Owning rank of each global index."""
        return torch.div(indices, self.rows_per_rank, rounding_mode="floor")

    def _gather_indices(self, indices: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        idx = torch.as_tensor(indices).reshape(-1).to(device=self.transport_device, dtype=torch.int64)
        parts = self.comm.all_gather_uneven(idx) if self.world_size > 1 else [idx]
        allidx = torch.cat(parts) if parts else idx
        if allidx.numel() and (int(allidx.min()) < 0 or int(allidx.max()) >= self.num_samples):
            bad = allidx[(allidx < 0) | (allidx >= self.num_samples)][:5].tolist()
            raise IndexError(f"sample indices out of range [0, {self.num_samples}): {bad}")
        return allidx, [p.shape[0] for p in parts]

    def _gather_rows(self, rows: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """All-gather ``rows`` (``sizes[r]`` rows on rank r, known everywhere)."""
        if self.world_size == 1:
            return [rows]
        big = max(sizes) if sizes else 0
        if big == 0:
            return [rows.new_zeros((0, self.width)) for _ in sizes]
        padded = rows.new_zeros((big, self.width))
        padded[: rows.shape[0]] = rows
        return [g[:s] for g, s in zip(self.comm.all_gather(padded), sizes)]

    # ------------------------------------------------------------------ read / write
    def read(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows for this rank's ``indices`` (float32, ``[len(indices), width]``, on ``device``).

        Collective: all ranks call together with their own index sets."""
        allidx, sizes = self._gather_indices(indices)
        owners = self.owner(allidx)
        mine = owners == self.rank
        local_rows = self.table[(allidx[mine] - self.start).to(self.device)]
        answer = local_rows.to(device=self.transport_device, dtype=torch.float32)
        counts = [int((owners == r).sum()) for r in range(self.world_size)]
        answers = self._gather_rows(answer, counts)
        full = torch.empty((allidx.numel(), self.width), dtype=torch.float32, device=self.transport_device)
        for r, rows in enumerate(answers):
            if rows.numel():
                full[owners == r] = rows
        off = sum(sizes[: self.rank])
        return full[off : off + sizes[self.rank]].to(self.device)

    def write(self, indices: torch.Tensor, values: torch.Tensor, valid_mask: torch.Tensor | None = None) -> None:
        """Store ``values[k]`` as the row of ``indices[k]``; rows with ``valid_mask`` False
        are skipped. Collective: all ranks call together with their own index sets."""
        idx = torch.as_tensor(indices).reshape(-1)
        vals = torch.as_tensor(values).detach()
        if vals.dim() == 1 and self.width == 1:
            vals = vals.view(-1, 1)
        if tuple(vals.shape) != (idx.numel(), self.width):
            raise ValueError(f"values must have shape ({idx.numel()}, {self.width}), got {tuple(vals.shape)}")
        if valid_mask is not None:
            keep = valid_mask.reshape(-1).to(device=idx.device, dtype=torch.bool)
            idx, vals = idx[keep], vals[keep.to(vals.device)]
        allidx, sizes = self._gather_indices(idx)
        send = vals.to(device=self.transport_device, dtype=torch.float32)
        allvals = torch.cat(self._gather_rows(send, sizes)) if allidx.numel() else send
        mine = (allidx >= self.start) & (allidx < self.stop)
        if not bool(mine.any()):
            return
        ridx, rvals = allidx[mine], allvals[mine]
        # deterministic duplicate rule: keep the last occurrence in global order
        sidx, perm = torch.sort(ridx, stable=True)
        last = torch.ones_like(sidx, dtype=torch.bool)
        last[:-1] = sidx[1:] != sidx[:-1]
        keep_pos = perm[last]
        rows = (ridx[keep_pos] - self.start).to(self.device)
        self.table[rows] = rvals[keep_pos].to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """This rank's slice plus its placement (save one per rank, sharded checkpoint)."""
        return {
            "num_samples": self.num_samples, "width": self.width, "dtype": str(self.dtype).replace("torch.", ""),
            "start": self.start, "stop": self.stop, "table": self.table.detach().clone().cpu(),
        }

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Restore the local slice from one state dict or a list of them.

        A list may hold the slices of ANY previous world size (e.g. every rank file of an
        old checkpoint): rows are picked by global index (re-sharding on resume). Every row
        of this rank's range must be covered; values are cast to this store's dtype."""
        states = [state] if isinstance(state, dict) else list(state)
        covered = torch.zeros(self.stop - self.start, dtype=torch.bool)
        for sd in states:
            if int(sd["num_samples"]) != self.num_samples or int(sd["width"]) != self.width:
                raise ValueError(f"store shape mismatch: checkpoint ({sd['num_samples']}, {sd['width']}) "
                                 f"vs ({self.num_samples}, {self.width})")
            lo, hi = max(int(sd["start"]), self.start), min(int(sd["stop"]), self.stop)
            if hi <= lo:
                continue
            src = sd["table"][lo - int(sd["start"]) : hi - int(sd["start"])]
            self.table[lo - self.start : hi - self.start] = src.to(device=self.device, dtype=self.dtype)
            covered[lo - self.start : hi - self.start] = True
        if not bool(covered.all()):
            missing = (~covered).nonzero()[:5].view(-1).add(self.start).tolist()
            raise ValueError(f"checkpoint does not cover rows of rank {self.rank}, e.g. {missing}")

    def __repr__(self) -> str:
        return (f"ShardedSampleStore(num_samples={self.num_samples}, width={self.width}, dtype={self.dtype}, "
                f"rank={self.rank}/{self.world_size}, rows=[{self.start}, {self.stop}))")
