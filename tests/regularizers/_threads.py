"""Thread-backed ranks for the regularizer tests (the shared harness) and a row splitter."""
from __future__ import annotations

import torch

from tests.threadcomm import run_threads  # noqa: F401  (ThreadComm has every collective these cores use)


def split_rows(t: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    """Rows [cuts[r], cuts[r+1]) for each rank (cuts start at 0 and end at len(t))."""
    return [t[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
