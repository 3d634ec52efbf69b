"""Gradual pruning schedule of Zhu & Gupta (2017), spec section 3.

`s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3` at the schedule points
t0, t0 + dt, ..., end = t0 + n * dt, and `s_f` afterwards: sparsity rises fast early
and slowly late. Masks change only at schedule points, so between two points the
sparsity of the last point holds.
"""
from __future__ import annotations


def _check(start: int, end: int, frequency: int) -> None:
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}")
    if end < start:
        raise ValueError(f"end ({end}) must be >= start ({start})")


def is_pruning_step(step: int, start: int, end: int, frequency: int) -> bool:
    """Whether masks are recomputed at `step`: start, start + frequency, ... up to end,
    and end itself (so the final sparsity is reached even if frequency does not divide
    end - start)."""
    _check(start, end, frequency)
    return start <= step <= end and ((step - start) % frequency == 0 or step == end)


def sparsity_at(step: int, start: int, end: int, frequency: int, initial: float, final: float,
                exponent: float = 3.0) -> float:
    """Target sparsity in effect at `step` (after any mask update due at `step`).

    Before `start`: `initial` (the curve's value at p = 0; callers prune only at
    schedule points, see `is_pruning_step`). Between points the last point's value holds;
    from `end` on: `final`. Uses the TF model_pruning form
    `final + (initial - final) * (1 - p)**exponent`, p = (t_point - start) / (end - start).
    """
    _check(start, end, frequency)
    for name, v in (("initial", initial), ("final", final)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} sparsity must be in [0, 1], got {v}")
    if step >= end:
        return float(final)
    if step < start:
        return float(initial)
    point = start + (step - start) // frequency * frequency
    p = (point - start) / (end - start)
    return float(final + (initial - final) * (1.0 - p) ** exponent)
