"""Exact distributed bottom-k selection over sharded scores (spec pattern S1).

Why: global (or per-layer) magnitude pruning needs the k smallest scores over whole
parameters, but under FSDP2 / ZeRO-3 each rank holds only a slice, and gathering the
scores would materialise the model. Instead every rank radix-selects the k-th smallest
fp32 bit pattern from all-reduced 256-bin histograms (4 rounds, most significant byte
first), then ties at the threshold are broken canonically by (parameter index, global
flat index) with one tiny all-gather of per-parameter tie counts. The result is the
single-process mask, bit for bit, for any rank-ordered contiguous sharding.

Memory: per round each shard's keys are recomputed (one int32 and a few bool
temporaries the size of that shard), so peak extra memory is O(largest local shard)
plus O(256 x groups). Communication: 4 all-reduces of [groups, 256] int64 (the first
also carries per-shard non-finite counts and per-group element counts) and one all-gather of [2, num_shards].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from distreg.runtime.comm import Comm

_INT_MIN = -(2**31)
_SHIFTS = (24, 16, 8, 0)


@dataclass
class ShardScores:
    """This rank's scores for one participating parameter.

    `scores` holds the local elements (any shape, flattened row-major; bf16/fp16 are cast
    to fp32 exactly); they are the contiguous range [flat_start, flat_start + numel) of
    the flattened full parameter, and ranks hold their ranges in rank order (FSDP2
    `Shard(0)`, ZeRO-3 partitions). An empty slice is allowed. `eligible` (bool, same
    numel) marks entries that may be pruned; ineligible entries (already pruned, as in
    torch.prune) are never selected and their scores are ignored. `name` is used in
    error messages.
    """

    scores: torch.Tensor
    flat_start: int = 0
    name: str = ""
    eligible: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.scores.numel()


@dataclass
class Selection:
    """Result of a bottom-k selection.

    `keep[i]` is the new local keep-mask of shard i (bool, flat, local numel): False for
    selected (pruned) entries and for entries that were already ineligible. `k[g]` is
    the number of entries selected in group g (global) and `threshold[g]` the k-th
    smallest eligible score of group g (the |score| with `by_abs`), None when k == 0.
    `eligible[g]` / `total[g]` are the global eligible / element counts of group g
    before this selection.
    """

    keep: list[torch.Tensor]
    k: list[int]
    threshold: list[float | None]
    eligible: list[int]
    total: list[int]


def select_bottom_k(shards: Sequence[ShardScores], k: int, comm: Comm | None = None, *,
                    by_abs: bool = False, replicated: bool = False) -> Selection:
    """Select exactly `k` of the smallest eligible scores over all shards (global scope).

    Every rank passes one `ShardScores` per participating parameter, in the same order
    (the order is the tie-break's parameter index). `by_abs=True` ranks by |score|
    without allocating |score| (magnitude pruning). `replicated=True` (DDP, ZeRO-1/2:
    every rank holds whole tensors) computes locally with no communication.
    Raises ValueError (on every rank) for NaN/inf eligible scores or k out of range.
    """
    return _select(shards, [0] * len(shards), lambda elig, total: [k], comm, by_abs, replicated)


def select_bottom_k_per_layer(shards: Sequence[ShardScores], ks: Sequence[int], comm: Comm | None = None, *,
                              by_abs: bool = False, replicated: bool = False) -> Selection:
    """Per-layer scope: select exactly `ks[i]` smallest eligible scores inside parameter i.

    All layers share one `[L, 256]` histogram all-reduce per round (ISS-P, TF-style
    per-layer gradual pruning). Same conventions as `select_bottom_k`.
    """
    if len(ks) != len(shards):
        raise ValueError(f"per-layer selection: {len(ks)} counts for {len(shards)} shards")
    return _select(shards, list(range(len(shards))), lambda elig, total: list(ks), comm, by_abs, replicated)


def select_bottom_k_fn(shards: Sequence[ShardScores], groups: Sequence[int],
                       k_fn: Callable[[list[int], list[int]], list[int]], comm: Comm | None = None, *,
                       by_abs: bool = False, replicated: bool = False) -> Selection:
    """General form: shard i belongs to selection group `groups[i]` (0..G-1) and the
    counts are `k_fn(eligible, total)`, the global eligible and element counts per group.

    Lets builders express "prune to a target sparsity counting already-pruned entries"
    or torch.prune's `round(amount * #unmasked)` without an extra collective: both
    counts travel with the first histogram round.
    """
    return _select(shards, list(groups), k_fn, comm, by_abs, replicated)


# --------------------------------------------------------------------------- internals


def _fp32(shard: ShardScores) -> torch.Tensor:
    s = shard.scores.detach().reshape(-1)
    return (s if s.dtype == torch.float32 else s.float()).contiguous()


def _keys(shard: ShardScores, by_abs: bool) -> torch.Tensor:
    """int32 keys, monotone in the score (signed int32 order == float order).

    Non-negative floats compare like their bit patterns; negative ones get their
    magnitude bits flipped and are shifted up by one so that -0.0 and +0.0 share key 0.
    """
    i = _fp32(shard).view(torch.int32)
    if by_abs:
        return i & 0x7FFFFFFF
    t = i ^ ((i >> 31) & 0x7FFFFFFF)
    return t - (t >> 31)


def _eligible(shard: ShardScores) -> torch.Tensor | None:
    e = shard.eligible
    if e is None:
        return None
    e = e.reshape(-1)
    if e.dtype != torch.bool or e.numel() != shard.numel:
        raise ValueError(f"{shard.name or 'shard'}: eligible must be bool with {shard.numel} elements")
    return e


def _to_i32(u: int) -> int:
    """Unsigned 32-bit python int -> the same bits as a signed int32 value."""
    return u - 2**32 if u >= 2**31 else u


def _key_to_float(u: int, by_abs: bool) -> float:
    """Inverse of `_keys` for an unsigned (sign-flipped) key."""
    i = _to_i32(u ^ 0x80000000)
    if i < 0 and not by_abs:
        i = (i - 1) ^ 0x7FFFFFFF
    return torch.tensor([i], dtype=torch.int32).view(torch.float32).item()


def _select(shards, groups, k_fn, comm, by_abs, replicated) -> Selection:
    comm = None if (replicated or comm is None or comm.world_size == 1) else comm
    n_groups = max(groups) + 1 if groups else 0
    n_shards = len(shards)
    eligibles = [_eligible(s) for s in shards]
    sizes = torch.zeros(n_groups, dtype=torch.int64)
    for g, shard in zip(groups, shards):
        sizes[g] += shard.numel

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(t) if comm is not None else t

    k_rem: list[int] = []      # remaining rank inside the current prefix, per group
    prefix = [0] * n_groups    # unsigned key prefix found so far, per group
    active: list[bool] = []
    elig_counts: list[int] = []
    ks: list[int] = []
    for r, shift in enumerate(_SHIFTS):
        hist = torch.zeros(n_groups, 256, dtype=torch.int64)
        bad = torch.zeros(n_shards, dtype=torch.int64)
        for i, shard in enumerate(shards):
            g = groups[i]
            if shard.numel == 0 or (r > 0 and not active[g]):
                continue
            key = _keys(shard, by_abs)
            cand = eligibles[i]
            if r == 0:  # NaN/inf among eligible entries (ineligible scores are ignored)
                nonfinite = ~torch.isfinite(_fp32(shard))
                bad[i] = int((nonfinite if cand is None else nonfinite & cand).sum())
            u = key ^ _INT_MIN  # byte order of u (as unsigned) == key order
            if r > 0:
                same = (u >> (shift + 8)) == (_to_i32(prefix[g]) >> (shift + 8))
                cand = same if cand is None else cand & same
            byte = (u >> shift) & 0xFF
            if cand is not None:
                byte = byte[cand]
            hist[g] += torch.bincount(byte, minlength=256).cpu()  # shards may live on the GPU
        if r == 0:
            flat = reduce(torch.cat([hist.reshape(-1), bad, sizes]))
            n_h = n_groups * 256
            hist, bad, sizes = flat[:n_h].view(n_groups, 256), flat[n_h:n_h + n_shards], flat[n_h + n_shards:]
            if bad.any():
                names = [shards[i].name or f"#{i}" for i in range(n_shards) if bad[i] > 0]
                raise ValueError(f"non-finite (NaN/inf) scores in parameter(s): {', '.join(names)}")
            elig_counts, totals = hist.sum(1).tolist(), sizes.tolist()
            ks = [int(x) for x in k_fn(list(elig_counts), list(totals))]
            if len(ks) != n_groups:
                raise ValueError(f"expected {n_groups} counts, got {len(ks)}")
            for g, (kg, ng) in enumerate(zip(ks, elig_counts)):
                if not 0 <= kg <= ng:
                    raise ValueError(f"cannot select {kg} of {ng} eligible entries (group {g})")
            k_rem = list(ks)
            active = [kg > 0 for kg in ks]
            if not any(active):
                break
        else:
            hist = reduce(hist)
        # per group: the bin where the cumulative count first reaches k_rem; drop the
        # counts of lower bins from k_rem and append the bin to the prefix
        cum = hist.cumsum(1)
        k_t = torch.tensor(k_rem, dtype=torch.int64)
        bins = (cum < k_t[:, None]).sum(1)
        lower = torch.cat([torch.zeros(n_groups, 1, dtype=torch.int64), cum], 1).gather(1, bins[:, None])[:, 0]
        for g, (b, lo) in enumerate(zip(bins.tolist(), lower.tolist())):
            if active[g]:
                k_rem[g] -= lo
                prefix[g] |= b << shift

    # Ties at the threshold: count this rank's per shard, gather, then prune the first
    # ones in the canonical order (param index, global flat index) over all ranks. The
    # keys are recomputed in the second pass so only one shard's temporaries live at once.
    thr = [_to_i32(p ^ 0x80000000) for p in prefix]  # threshold as a signed key

    def below_and_at(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = _keys(shards[i], by_abs)
        lt, eq = key < thr[groups[i]], key == thr[groups[i]]
        if eligibles[i] is not None:
            lt &= eligibles[i]
            eq &= eligibles[i]
        return lt, eq

    ties = torch.zeros(2, n_shards, dtype=torch.int64)
    live = [shard.numel > 0 and active[g] for g, shard in zip(groups, shards)]
    for i, shard in enumerate(shards):
        ties[1, i] = shard.flat_start
        if live[i]:
            ties[0, i] = int(below_and_at(i)[1].sum())
    # (skipped consistently on every rank when nothing is selected)
    per_rank = torch.stack(comm.all_gather(ties)) if comm is not None and any(active) else ties[None]
    my_rank = comm.rank if per_rank.shape[0] > 1 else 0
    counts, starts = per_rank[:, 0], per_rank[:, 1]  # [W, num_shards]
    tie_totals = counts.sum(0).tolist()
    earlier = [0] * n_groups  # ties held by lower-index params of the same group, all ranks
    ranks = torch.arange(per_rank.shape[0])
    keep = []
    for i, shard in enumerate(shards):
        g = groups[i]
        e = eligibles[i]
        k_keep = e.clone() if e is not None else torch.ones(shard.numel, dtype=torch.bool, device=shard.scores.device)
        if live[i]:
            # slices of this param ordered by (global flat start, rank); empty ones hold no ties
            s = starts[:, i]
            first = (s < shard.flat_start) | ((s == shard.flat_start) & (ranks < my_rank))
            before = earlier[g] + int(counts[first, i].sum())
            take = min(max(k_rem[g] - before, 0), int(ties[0, i]))
            prune, eq = below_and_at(i)
            if take > 0:
                prune[eq.nonzero().view(-1)[:take]] = True
            k_keep &= ~prune
        earlier[g] += tie_totals[i]
        keep.append(k_keep)
    thresholds = [_key_to_float(p, by_abs) if active[g] else None for g, p in enumerate(prefix)]
    return Selection(keep, ks, thresholds, elig_counts, totals)


# --------------------------------------------------------------------------- columns


def select_bottom_k_columns(scores: torch.Tensor, k_fn: Callable[[torch.Tensor], torch.Tensor],
                            comm: Comm | None = None, *, eligible: torch.Tensor | None = None,
                            gather_below: int = 0) -> torch.Tensor:
    """Per column of a row-sharded matrix: select exactly `k_j` of the smallest eligible
    entries of column j over the rows of every rank (the S1 radix selection, vectorised
    over columns: one `[m, 256]` histogram all-reduce per round instead of a Python loop
    over m shards, so it suits many small selections per call on any device).

    `scores` `[n, m]` holds this rank's rows; ranks hold consecutive row blocks in rank
    order (row r of rank q follows every row of ranks < q). float64 scores are ranked in
    float64 (8 byte rounds), anything else in float32 (4 rounds). `k_fn(eligible_counts
    [m])` maps the global eligible count of each column to the count to select (the
    counts travel with the first histogram round, no extra collective). Ties at a
    column's threshold go to the lowest global rows first, so the selection is the
    single-process one for any split of the rows. Returns the bool mask of selected
    entries (local rows). Raises ValueError on every rank for NaN/inf eligible scores.

    `gather_below > 0` trades rounds for one gather: as soon as every column's threshold
    bucket (the entries sharing the key bytes found so far) holds at most that many
    entries over all ranks, the buckets' members (key, rank, row) are all-gathered and
    the selection finishes locally by (key, rank, row) - the same rule, so the same
    result. Fewer collectives (often 2-3 instead of 4 or 8) when latency dominates.
    """
    comm = None if comm is None or comm.world_size == 1 else comm
    x = scores.detach()
    wide = x.dtype == torch.float64
    x = (x if wide or x.dtype == torch.float32 else x.float()).contiguous()
    int_t, bits = (torch.int64, 64) if wide else (torch.int32, 32)
    n, m = x.shape
    dev = x.device
    elig = torch.ones_like(x, dtype=torch.bool) if eligible is None else eligible.reshape(n, m)
    i = x.view(int_t)
    t = i ^ ((i >> (bits - 1)) & (2 ** (bits - 1) - 1))
    keys = t - (t >> (bits - 1))  # as `_keys`: signed integer order == float order, -0.0 == +0.0
    sign = torch.tensor(-(2 ** (bits - 1)), dtype=int_t, device=dev)
    u = keys ^ sign  # its bytes, most significant first, order like unsigned integers
    col = torch.arange(m, device=dev).expand(n, m)
    prefix = torch.zeros(m, dtype=int_t, device=dev)  # bit pattern of u's leading bytes found so far
    k_rem = torch.zeros(m, dtype=torch.int64, device=dev)
    for r, shift in enumerate(range(bits - 8, -8, -8)):
        cand = elig
        if r > 0:
            cand = cand & ((u >> (shift + 8)) == (prefix >> (shift + 8)).unsqueeze(0))
        byte = ((u >> shift) & 0xFF).long()
        # int32 on the wire (counts of one matrix's entries fit): half the bytes of int64
        hist = torch.bincount((col * 256 + byte)[cand], minlength=m * 256).to(torch.int32).view(m, 256)
        if r == 0:
            bad = (elig & ~torch.isfinite(x)).sum().to(torch.int32).reshape(1)
            flat = torch.cat([hist.reshape(-1), bad])
            flat = comm.all_reduce(flat) if comm is not None else flat
            hist, bad = flat[:-1].view(m, 256).long(), flat[-1]
            if int(bad):
                raise ValueError(f"non-finite (NaN/inf) scores among {int(bad)} eligible entries")
            counts = hist.sum(1)
            ks = torch.as_tensor(k_fn(counts), dtype=torch.int64, device=dev).reshape(m)
            if bool(((ks < 0) | (ks > counts)).any()):
                raise ValueError(f"cannot select {ks.tolist()} of {counts.tolist()} eligible entries per column")
            if not bool((ks > 0).any()):  # nothing to select anywhere (replicated: every rank stops)
                return torch.zeros_like(elig)
            k_rem = ks.clone()
        else:
            hist = (comm.all_reduce(hist) if comm is not None else hist).long()
        cum = hist.cumsum(1)
        bins = (cum < k_rem.unsqueeze(1)).sum(1).clamp_max(255)
        lower = torch.cat([torch.zeros(m, 1, dtype=torch.int64, device=dev), cum], 1).gather(1, bins[:, None])[:, 0]
        k_rem = k_rem - lower
        bucket = hist.gather(1, bins[:, None])[:, 0]  # global entries sharing the prefix so far
        if shift == bits - 8:  # the top byte lands on the sign bit: write it as a signed value
            bins = torch.where(bins >= 128, bins - 256, bins)
        prefix = prefix | (bins * 2**shift).to(int_t)
        if 0 < shift and gather_below > 0:
            size = int(torch.where(ks > 0, bucket, 0).max()) if m else 0
            if size <= gather_below:  # replicated decision: every rank finishes here
                return _finish_by_gather(keys, u, elig, prefix, sign, shift, ks > 0, k_rem, size, comm)
    active = (ks > 0).unsqueeze(0)
    thr = (prefix ^ sign).unsqueeze(0)  # the k-th smallest key of each column
    below = elig & (keys < thr) & active
    at = elig & (keys == thr) & active
    local_ties = at.sum(0)
    if comm is not None:
        every = torch.stack(comm.all_gather(local_ties))  # [W, m]
        before = every[: comm.rank].sum(0)
    else:
        before = torch.zeros_like(local_ties)
    take = (k_rem - before).clamp(min=0).minimum(local_ties)
    return below | (at & (at.long().cumsum(0) <= take.unsqueeze(0)))


def _finish_by_gather(keys, u, elig, prefix, sign, shift, active, k_rem, size, comm) -> torch.Tensor:
    """End of `select_bottom_k_columns` once each column's threshold bucket is small:
    select every entry below the bucket, gather the bucket's members and take the first
    `k_rem` of each column by (key, rank, row)."""
    n, m = keys.shape
    dev = keys.device
    active = active.unsqueeze(0)
    below = elig & (keys < (prefix ^ sign).unsqueeze(0)) & active
    member = elig & ((u >> shift) == (prefix >> shift).unsqueeze(0)) & active
    # pack each column's members in row order into `size` slots (spare slot `size`)
    slot = torch.where(member, member.long().cumsum(0) - 1, torch.full_like(keys, size, dtype=torch.long))
    rows = torch.arange(n, device=dev).unsqueeze(1).expand(n, m)
    packed_key = torch.full((size + 1, m), torch.iinfo(keys.dtype).max, dtype=torch.int64, device=dev)
    packed_row = torch.full((size + 1, m), -1, dtype=torch.int64, device=dev)
    packed_key.scatter_(0, slot, keys.long())
    packed_row.scatter_(0, slot, rows)
    both = torch.stack([packed_key[:size], packed_row[:size]])  # [2, size, m]
    every = torch.stack(comm.all_gather(both)) if comm is not None else both[None]  # [W, 2, size, m]
    rank = comm.rank if comm is not None else 0
    key_all = every[:, 0].reshape(-1, m)  # rank-major, rows ascending: (rank, row) order
    order = torch.sort(key_all, dim=0, stable=True).indices  # by key, then (rank, row)
    taken = torch.arange(order.shape[0], device=dev).unsqueeze(1) < k_rem.unsqueeze(0)
    owner = (order // size) if size else order
    local_row = every[:, 1].reshape(-1, m).gather(0, order)
    mine = taken & (owner == rank) & (local_row >= 0)
    chosen = torch.zeros(n + 1, m, dtype=torch.bool, device=dev)
    chosen.scatter_(0, torch.where(mine, local_row, n), mine)
    return below | chosen[:n]
