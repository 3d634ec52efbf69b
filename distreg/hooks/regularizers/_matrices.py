"""Whole-matrix terms of many sharded weights at once, with fused collectives: the engine of
`orthogonality`, `nuclear_norm` and `trained_rank_pruning` (NC kind).

A `MatrixPlan` is made once at train start (routes from `_common.plan_routes`, identical on
every rank). Per application, whatever the routes, the communication is at most:

- one all-reduce of every `gram`-route matrix's partial Gram W_r^T W_r, concatenated;
- one all-gather of every `gather`-route matrix's local slice, concatenated (sizes known
  from the plan, so no size exchange);
- low-rank terms: one all-gather of the owners' results (an eigendecomposition is done once,
  on the matrix's owner rank - matrices are dealt round-robin, so the ranks share the
  work instead of rank 0 doing all of it - and its result shared);
- orthogonality: one all-reduce of the partial values of `gather`-route matrices, only when
  the value is needed (a logging step, or the non-squared norm whose gradient needs it).

Low-rank terms use the eigendecomposition of the *smaller* Gram (W^T W or W W^T, float64 by
default: the Gram squares the condition number) instead of an SVD: for a 512 x 1408 weight an
fp64 SVD costs ~8x the Gram and its `eigh`. The owner sends P = V_k V_k^T (projection) and/or
M = V_k S_k^-1 V_k^T (subgradient) and each rank forms only its own rows: W_r P and W_r M
(or P[R] W, M[R] W on the W W^T side), so no rank computes another rank's rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distreg.hooks.base import HookContext, ParamShard
from distreg.hooks.regularizers._common import F64, matrix_shape
from distreg.regularizers.lowrank import energy_rank
from distreg.regularizers.orthogonality import _safe_sqrt


@dataclass
class MatrixPlan:
    """Per matrix: shape (n, d), route, owner rank, and the rows [lo, hi) that cover this
    rank's flat slice; `gather_numels[r][j]`: rank r's element count of the j-th gather-route
    matrix (from one all-gather at plan time)."""

    shapes: list[tuple[int, int]]
    routes: list[str]
    owners: list[int]
    starts: list[int]
    numels: list[int]
    gather_numels: list[list[int]] = field(default_factory=list)

    def rows(self, i: int) -> tuple[int, int]:
        _, d = self.shapes[i]
        lo = self.starts[i] // d
        hi = -(-(self.starts[i] + self.numels[i]) // d) if self.numels[i] else lo
        return lo, hi


def make_plan(ctx: HookContext, shards: list[ParamShard], routes: list[str]) -> MatrixPlan:
    shapes = [matrix_shape(s) for s in shards]
    shared = [i for i, r in enumerate(routes) if r != "local"]
    owners = [ctx.rank] * len(shards)
    for j, i in enumerate(shared):
        owners[i] = j % ctx.world_size
    plan = MatrixPlan(shapes, list(routes), owners, [s.flat_start for s in shards], [s.numel for s in shards])
    gathered = [i for i, r in enumerate(routes) if r == "gather"]
    if gathered:
        mine = torch.tensor([shards[i].numel for i in gathered], dtype=torch.int64)
        plan.gather_numels = [t.tolist() for t in ctx.comm.all_gather(mine)]
    return plan


def _fused_all_reduce(ctx: HookContext, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    if not parts:
        return []
    flat = ctx.comm.all_reduce(torch.cat([p.reshape(-1) for p in parts]))
    return [t.view(p.shape) for t, p in zip(torch.split(flat, [p.numel() for p in parts]), parts)]


def _fused_all_gather(ctx: HookContext, parts: list[torch.Tensor], numels: list[list[int]]) -> list[list[torch.Tensor]]:
    """parts: this rank's flat pieces (one dtype); numels[r][j]: rank r's size of its piece j.
    Returns pieces[r][j], in rank order. One all-gather of buffers padded to the largest."""
    totals = [sum(n) for n in numels]
    buf = torch.zeros(max(totals), dtype=parts[0].dtype, device=parts[0].device)
    mine = torch.cat(parts)
    buf[: mine.numel()] = mine
    got = ctx.comm.all_gather(buf)
    return [list(torch.split(g[:t], sizes)) for g, t, sizes in zip(got, totals, numels)]


def matrices(ctx: HookContext, plan: MatrixPlan, shards: list[ParamShard], dtype: torch.dtype | None
             ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """(local row blocks W_r, whole matrices W) per matrix in `dtype` (None: the parameter's):
    `gram` routes get only W_r, `gather` / `local` routes the whole W (gathered)."""
    local, whole = [], []
    for i, s in enumerate(shards):
        w = s.data().detach()
        local.append(w.to(dtype or w.dtype).view(-1, plan.shapes[i][1]) if plan.routes[i] == "gram" else None)
        whole.append(w.to(dtype or w.dtype).view(plan.shapes[i]) if plan.routes[i] == "local" else None)
    gathered = [i for i, r in enumerate(plan.routes) if r == "gather"]
    if gathered:
        pieces = _fused_all_gather(ctx, [shards[i].data().detach().reshape(-1) for i in gathered], plan.gather_numels)
        for j, i in enumerate(gathered):
            full = torch.cat([pieces[r][j] for r in range(ctx.world_size)])
            whole[i] = full.to(dtype or full.dtype).view(plan.shapes[i])
    return local, whole


def own_slice(plan: MatrixPlan, i: int, rows_block: torch.Tensor) -> torch.Tensor:
    """This rank's flat elements from a block of the full matrix's rows [lo, hi)."""
    lo, _ = plan.rows(i)
    off = plan.starts[i] - lo * plan.shapes[i][1]
    return rows_block.reshape(-1)[off: off + plan.numels[i]]


# --------------------------------------------------------------------------- orthogonality


def orthogonality_terms(ctx: HookContext, plan: MatrixPlan, shards: list[ParamShard], side: str, squared: bool,
                        dtype: torch.dtype | None, need_value: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(per-matrix values ||Gram - I||^2 (or its root), float64 [n_mat], None when not
    needed and not free; this rank's flat slice of each gradient)."""
    local, whole = matrices(ctx, plan, shards, dtype)
    grams = _fused_all_reduce(ctx, [w.t() @ w for w in local if w is not None])
    grams = iter(grams)
    values, partial, grads = [], [], []
    for i, (n, d) in enumerate(plan.shapes):
        route = plan.routes[i]
        rows_side = side == "rows" or (side == "auto" and n < d)
        if route == "gram":  # trace identity: both sides from the column Gram
            g, w = next(grams), local[i]
            gi = g - torch.eye(d, dtype=g.dtype, device=g.device)
            g64 = g.to(F64)
            value = (g64 * g64).sum() - 2 * torch.diagonal(g64).sum() + n if rows_side else (gi.to(F64) ** 2).sum()
            values.append(value)
            partial.append(False)
            grads.append((4 * (w @ gi)).reshape(-1))
            continue
        w = whole[i]
        lo, hi = plan.rows(i)
        if not rows_side or route == "local":
            if route == "local":
                lo, hi = 0, n
            g = w @ w.t() if rows_side else w.t() @ w
            gi = g - torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
            values.append((gi.to(F64) ** 2).sum())
            partial.append(False)
            block = (gi[lo:hi] @ w) if rows_side else (w[lo:hi] @ gi)
        else:  # W W^T, only this rank's rows of it: G[R] = W[R] W^T
            g_rows = w[lo:hi] @ w.t()
            g_rows[:, lo:hi].diagonal().sub_(1)
            first = -(-plan.starts[i] // d)  # rows whose first element is local: their value is ours
            last = -(-(plan.starts[i] + plan.numels[i]) // d) if plan.numels[i] else first
            mine = g_rows[first - lo: max(first, last) - lo] if plan.numels[i] else g_rows[:0]
            values.append((mine.to(F64) ** 2).sum())
            partial.append(True)
            block = g_rows @ w
        grads.append(own_slice(plan, i, 4 * block) if route != "local" else (4 * block).reshape(-1))
    value_t = torch.stack(values) if values else torch.zeros(0, dtype=F64)
    if any(partial):
        if not (need_value or not squared):
            return None, grads
        mask = torch.tensor(partial, device=value_t.device)
        summed = ctx.comm.all_reduce(torch.where(mask, value_t, torch.zeros_like(value_t)))
        value_t = torch.where(mask, summed, value_t)
    if not squared:
        root = _safe_sqrt(value_t)
        scale = torch.where(root > 0, 0.5 / torch.where(root > 0, root, torch.ones_like(root)), torch.zeros_like(root))
        grads = [g * scale[i].to(g.dtype) for i, g in enumerate(grads)]
        value_t = root
    return value_t, grads


# --------------------------------------------------------------------------- low rank


@dataclass
class LowRankOut:
    projection: list[torch.Tensor | None]  # this rank's flat slice of U_k S_k V_k^T per matrix
    subgradient: list[torch.Tensor | None]  # ... of U_k V_k^T (float64 unless dtype says otherwise)
    rank: torch.Tensor  # k per matrix, float64
    sigma_sum: torch.Tensor  # sum_{i <= k} sigma_i per matrix, float64


def _factors(grams: torch.Tensor, energy: float, want_proj: bool, want_sub: bool) -> list[torch.Tensor]:
    """Per Gram of a batch [b, m, m]: packed [P (m*m) if want_proj, M (m*m) if want_sub, k, sum sigma_k]."""
    lam, vec = torch.linalg.eigh(grams)
    lam, vec = lam.flip(-1).clamp(min=0), vec.flip(-1)
    sigma = lam.sqrt()
    m = lam.shape[-1]
    k = energy_rank(sigma, energy)
    if m:  # numerical rank guard, in the Gram's precision
        k = torch.minimum(k, (lam > m * torch.finfo(lam.dtype).eps * lam[..., :1]).sum(-1))
    keep = (torch.arange(m, device=lam.device) < k.unsqueeze(-1)).to(lam.dtype)
    out = []
    for b in range(lam.shape[0]):
        v = vec[b]
        parts = []
        if want_proj:
            parts.append(((v * keep[b]) @ v.t()).reshape(-1))
        if want_sub:
            inv = torch.where(keep[b] > 0, 1.0 / torch.where(keep[b] > 0, sigma[b], torch.ones_like(sigma[b])),
                              torch.zeros_like(sigma[b]))
            parts.append(((v * inv) @ v.t()).reshape(-1))
        parts.append(torch.stack([k[b].to(lam.dtype), (sigma[b].to(F64) * keep[b]).sum().to(lam.dtype)]))
        out.append(torch.cat(parts))
    return out


def low_rank_terms(ctx: HookContext, plan: MatrixPlan, shards: list[ParamShard], energy: float,
                   want_proj: bool, want_sub: bool, dtype: torch.dtype = F64) -> LowRankOut:
    """Energy-threshold truncated SVD terms of every matrix (energy 1: the exact nuclear
    subgradient over the numerically nonzero singular values), each rank its own slices.
    `dtype`: of the Grams, eigendecompositions and products. float64 resolves singular
    values down to ~1e-7 sigma_max; float32 only to ~1e-2 sigma_max (the Gram squares the
    condition number; the rank guard drops the rest): enough for TRP's energy-truncated
    terms (sigma_k is a sizeable fraction of sigma_max), not for the full nuclear
    subgradient U V^T."""
    local, whole = matrices(ctx, plan, shards, dtype)
    grams = iter(_fused_all_reduce(ctx, [w.t() @ w for w in local if w is not None]))
    n_mat = len(plan.shapes)
    left = [False] * n_mat  # Gram W W^T (n < d) instead of W^T W
    todo: dict[int, torch.Tensor] = {}  # the Grams this rank factorises
    for i, (n, d) in enumerate(plan.shapes):
        if plan.routes[i] == "gram":
            g = next(grams)
        else:
            left[i] = n < d
            g = None
            if plan.owners[i] == ctx.rank:
                w = whole[i]
                g = w @ w.t() if left[i] else w.t() @ w
        if plan.owners[i] == ctx.rank:
            todo[i] = g
    packed: dict[int, torch.Tensor] = {}
    by_size: dict[int, list[int]] = {}
    for i, g in todo.items():
        by_size.setdefault(g.shape[0], []).append(i)
    for idx in by_size.values():  # one batched eigh per Gram size
        for i, p in zip(idx, _factors(torch.stack([todo[i] for i in idx]), energy, want_proj, want_sub)):
            packed[i] = p
    shared = [i for i in range(n_mat) if plan.routes[i] != "local"]
    if shared and ctx.world_size > 1:
        sizes = [_pack_size(plan, i, left, want_proj, want_sub) for i in range(n_mat)]
        numels = [[sizes[i] for i in shared if plan.owners[i] == r] for r in range(ctx.world_size)]
        pieces = _fused_all_gather(ctx, [packed[i] for i in shared if plan.owners[i] == ctx.rank] or
                                   [torch.zeros(0, dtype=dtype, device=shards[0].data().device)], numels) if any(any(n) for n in numels) else []
        seen = [0] * ctx.world_size
        for i in shared:
            r = plan.owners[i]
            packed[i] = pieces[r][seen[r]] if r != ctx.rank else packed[i]
            seen[r] += 1
    proj, sub, ranks, sums = [], [], [], []
    for i, (n, d) in enumerate(plan.shapes):
        p = packed[i]
        m = n if left[i] else d
        mats = list(torch.split(p[:-2], m * m)) if m else []
        pm = mats.pop(0).view(m, m) if want_proj and mats else None
        mm = mats.pop(0).view(m, m) if want_sub and mats else None
        ranks.append(p[-2])
        sums.append(p[-1])
        if plan.routes[i] == "gram":
            w = local[i]
            proj.append(None if pm is None else (w @ pm).reshape(-1))
            sub.append(None if mm is None else (w @ mm).reshape(-1))
            continue
        w = whole[i]
        lo, hi = (0, n) if plan.routes[i] == "local" else plan.rows(i)

        def rows_of(f: torch.Tensor | None) -> torch.Tensor | None:
            if f is None:
                return None
            block = f[lo:hi] @ w if left[i] else w[lo:hi] @ f
            return block.reshape(-1) if plan.routes[i] == "local" else own_slice(plan, i, block)

        proj.append(rows_of(pm))
        sub.append(rows_of(mm))
    return LowRankOut(proj, sub, torch.stack(ranks).to(F64) if ranks else torch.zeros(0, dtype=F64),
                      torch.stack(sums).to(F64) if sums else torch.zeros(0, dtype=F64))


def _pack_size(plan: MatrixPlan, i: int, left: list[bool], want_proj: bool, want_sub: bool) -> int:
    n, d = plan.shapes[i]
    m = n if left[i] else d
    return (int(want_proj) + int(want_sub)) * m * m + 2
