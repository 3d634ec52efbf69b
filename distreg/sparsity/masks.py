"""Mask builders on top of the exact selection (magnitude) and of shapes only (ER/ERK).

All builders are pure: local shards and global metadata in, local keep-masks (bool,
True = keep) or numbers out. Magnitude masks come from `topk` (spec S1); random masks
from a counter-based hash of (seed, parameter name, global flat index) (spec S6), so
every sharding of a parameter yields the same full mask with no communication.
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

import torch

from distreg.runtime.comm import Comm
from distreg.sparsity.topk import ShardScores, select_bottom_k_fn

# --------------------------------------------------------------------------- magnitude


def magnitude_masks(shards: Sequence[ShardScores], sparsity: float, comm: Comm | None = None, *,
                    per_layer: bool = False, by_abs: bool = True, replicated: bool = False) -> list[torch.Tensor]:
    """Keep-masks at target `sparsity` (fraction pruned) by smallest |score|.

    distreg's definition (spec section 3): over the scope (all shards, or each layer with
    `per_layer=True`, i.e. layer-wise uniform sparsity) of N elements, `round(s * N)`
    entries are pruned in total (Python round-half-to-even, as torch.prune); entries
    already ineligible count toward it and stay pruned, so only
    `round(s * N) - #already pruned` more (at least 0) are chosen. Masks are therefore
    monotone along a monotone schedule. Ties: canonical (param index, flat index).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")

    def k_fn(eligible: list[int], total: list[int]) -> list[int]:
        return [max(round(sparsity * n) - (n - e), 0) for e, n in zip(eligible, total)]

    groups = list(range(len(shards))) if per_layer else [0] * len(shards)
    return select_bottom_k_fn(shards, groups, k_fn, comm, by_abs=by_abs, replicated=replicated).keep


def global_unstructured_masks(shards: Sequence[ShardScores], amount: int | float, comm: Comm | None = None, *,
                              replicated: bool = False) -> list[torch.Tensor]:
    """Keep-masks exactly as `torch.nn.utils.prune.global_unstructured(...,
    pruning_method=L1Unstructured, amount=amount)` computes them (spec section 3).

    Only eligible (currently unmasked) entries compete; an int `amount` prunes that many
    more, a float prunes `round(amount * #eligible)` more (banker's rounding), so two
    calls of 0.5 reach 75 % sparsity. Ranks by |score|; on ties torch's choice is
    unspecified, this one is canonical.
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"amount must be int or float, got {type(amount).__name__}")
    if isinstance(amount, float) and not 0.0 <= amount <= 1.0:
        raise ValueError(f"float amount must be in [0, 1], got {amount}")
    if isinstance(amount, int) and amount < 0:
        raise ValueError(f"int amount must be >= 0, got {amount}")

    def k_fn(eligible: list[int], total: list[int]) -> list[int]:
        return [amount if isinstance(amount, int) else round(amount * eligible[0])]

    return select_bottom_k_fn(shards, [0] * len(shards), k_fn, comm, by_abs=True, replicated=replicated).keep


# --------------------------------------------------------------------------- ER / ERK densities


def layer_densities(shapes: Mapping[str, Sequence[int]], density: float, method: str = "erk",
                    power_scale: float = 1.0) -> dict[str, float]:
    """Per-layer kept fractions for a global target `density` (Liu et al. 2022, spec section 2).

    `shapes` are the *global* (unsharded) shapes, so every rank computes the same numbers.
    uniform: every layer gets `density`. ERK: raw score `s_l = sum(shape) / prod(shape)`
    over all dims; ER: over the first two dims only; scores are raised to `power_scale`.
    `d_l = eps * s_l`, with eps chosen so the expected kept count is `density * N_total`;
    while some `eps * s_l > 1`, every layer whose raw score equals the maximum becomes
    dense (d = 1) and eps is recomputed (the reference's loop, same float64 operations).
    """
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must be in (0, 1), got {density}")
    if method == "uniform":
        return {name: float(density) for name in shapes}
    if method not in ("erk", "er"):
        raise ValueError(f"unknown density method {method!r} (uniform | er | erk)")
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {}
    for name, shape in shapes.items():
        dims = list(shape) if method == "erk" else list(shape)[:2]
        if len(dims) < 2 and method == "er":
            raise ValueError(f"ER needs at least 2 dims, {name} has shape {tuple(shape)}")
        raw[name] = (sum(dims) / math.prod(dims)) ** power_scale
    dense: set[str] = set()
    while True:
        rhs, divisor = 0.0, 0.0
        for name, n in numel.items():
            if name in dense:
                rhs -= n * (1 - density)
            else:
                rhs += n * density
                divisor += raw[name] * n
        sparse = [name for name in shapes if name not in dense]
        if not sparse:
            raise ValueError(f"density {density}: every layer was forced dense")
        eps = rhs / divisor
        if eps <= 0:
            raise ValueError(f"density {density}: no valid epsilon (eps = {eps})")
        max_raw = max(raw[name] for name in sparse)
        if max_raw * eps <= 1:
            break
        dense.update(name for name in sparse if raw[name] == max_raw)
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}


# --------------------------------------------------------------------------- indexed randomness

_M32 = 0xFFFFFFFF
_CHUNK = 1 << 20


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for uint32 values held in int64, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection with full avalanche)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _key_words(seed: int, name: str) -> list[int]:
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=16).digest()
    return [int.from_bytes(digest[j:j + 4], "little") for j in range(0, 16, 4)]


def index_uniform(seed: int, name: str, flat_start: int, numel: int) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, multiples of 2**-32) for global flat indices
    `flat_start .. flat_start + numel - 1` of parameter `name`.

    A counter-based generator: element j's value is a hash of (seed, name, j) only, so
    a rank can draw exactly its slice and any sharding reproduces the full tensor (S6).
    Platform independent (integer arithmetic, blake2b for the key).
    """
    out = torch.empty(numel, dtype=torch.float64)
    for a in range(0, numel, _CHUNK):
        j = torch.arange(flat_start + a, flat_start + min(a + _CHUNK, numel), dtype=torch.int64)
        out[a:a + j.numel()] = index_uniform_at(seed, name, j)
    return out


def index_uniform_at(seed: int, name: str, index: torch.Tensor) -> torch.Tensor:
    """`index_uniform`'s value for each (non-negative int64) global index in `index`, any
    shape (e.g. the global token indices a rank happens to hold)."""
    k0, k1, k2, k3 = _key_words(seed, name)
    j = index.to(torch.int64)
    h = _fmix32((j & _M32) ^ k0)
    h = _fmix32(h ^ ((j >> 32) & _M32) ^ k1)
    h = _fmix32((h + k2) & _M32) ^ k3
    return h.double() * 2.0**-32


def random_keep_mask(seed: int, name: str, flat_start: int, numel: int, density: float) -> torch.Tensor:
    """Bernoulli(density) keep-mask of a local slice: `U < density` with `U` from
    `index_uniform` (the reference's `rand < d` rule; realised density is binomial)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"{name}: density must be in [0, 1], got {density}")
    return index_uniform(seed, name, flat_start, numel) < density
