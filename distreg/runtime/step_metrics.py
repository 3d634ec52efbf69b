"""Step metrics kept on the device between logging steps.

The training step never reads a value back to the host: each step appends its local
loss part, gradient norm and counts to device tensors here; on a logging step
(`train.log_every`, and the last step) `flush` reduces the whole interval with ONE
all-reduce and ONE host read, and hands back a record per buffered step (so MLflow
still receives `train/loss` for every step, sent on the logging step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from distreg.runtime.comm import Comm


@dataclass
class StepRecord:
    step: int
    loss: float  # global step loss (all ranks, all micro-batches)
    grad_norm: float  # global gradient norm before clipping
    tokens: int  # global valid targets of the step
    samples: int  # global samples with a valid target


class StepMetricBuffer:
    def __init__(self, comm: Comm, device: torch.device):
        self.comm, self.device = comm, device
        self._steps: list[int] = []
        self._local: list[torch.Tensor] = []  # per step: [loss part, tokens, samples] (summed over ranks at flush)
        self._norms: list[torch.Tensor] = []  # per step: the global norm (already identical on every rank)
        self._known: list[tuple[int, int] | None] = []  # counts known without a reduction
        self.t_last = time.perf_counter()

    def add(self, step: int, local_loss: torch.Tensor, grad_norm: torch.Tensor | float,
            local_counts: torch.Tensor | None, known_counts: tuple[int, int] | None) -> None:
        """`local_loss`: this rank's share of the step loss; `local_counts` [tokens,
        samples] of this rank (None when `known_counts` gives the global ones)."""
        counts = local_counts if local_counts is not None else torch.zeros(2, device=self.device)
        self._steps.append(step)
        self._local.append(torch.cat([local_loss.detach().reshape(1).double(), counts.to(self.device, torch.float64)]))
        self._norms.append(torch.as_tensor(grad_norm, dtype=torch.float64, device=self.device).detach().reshape(1))
        self._known.append(known_counts)

    def __len__(self) -> int:
        return len(self._steps)

    def flush(self) -> tuple[list[StepRecord], float]:
        """Collective (every rank, same steps): the buffered records and the wall time
        since the previous flush (the interval's true time: the host waits for the device
        here, at the only host read of the interval)."""
        if not self._steps:
            return [], 0.0
        local = self.comm.all_reduce(torch.stack(self._local))  # one collective per interval
        both = torch.cat([local, torch.stack(self._norms)], dim=1).tolist()  # one host read
        now = time.perf_counter()
        elapsed, self.t_last = now - self.t_last, now
        out = []
        for step, (loss, tok, smp, norm), known in zip(self._steps, both, self._known):
            tokens, samples = known if known is not None else (int(tok), int(smp))
            out.append(StepRecord(step, loss, norm, tokens, samples))
        self._steps, self._local, self._norms, self._known = [], [], [], []
        return out, elapsed
