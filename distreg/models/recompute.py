"""Whether the current forward is activation checkpointing's recomputation.

Under `strategy.activation_checkpointing` each block's forward runs twice: once in the
forward pass and again inside backward to rebuild what it saved. Layers with side
effects (MoE routing statistics and auxiliary losses, Dice's running averages) must
produce the same outputs both times - the recomputation repeats their collectives,
which every rank does in the same order - but apply their side effects once.
`checkpointed(fn, *args)` runs `fn` under non-reentrant checkpointing with a flag that
is set only during the recomputation; layers read it with `is_recomputing()`.
"""
from __future__ import annotations

import contextlib
import threading

import torch.utils.checkpoint

_state = threading.local()


def is_recomputing() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _recomputing():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def checkpointed(fn, *args):
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                             context_fn=lambda: (contextlib.nullcontext(), _recomputing()))
