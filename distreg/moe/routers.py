"""MoE routers: router logits in, a capacity-respecting dispatch plan out (spec §10, S5).

All routers share one dispatch rule so they are comparable:

* every token picks at most ``k`` experts (top-k of its softmax for :func:`topk_router`,
  top-k *nonzero* entries of its transport-plan row for the OT routers), slot 0 = best;
* experts are filled first-come-first-served in slot-major order (all tokens' first
  choices in token order, then all second choices, ... — GShard's priority), and a claim
  whose position reaches ``capacity`` is dropped, so **no expert ever exceeds capacity**;
* ``dropped_tokens`` counts tokens left with no expert (they take the residual path),
  ``overflow`` the claims removed because an expert was full.

Scopes (spec S5):

* **routing groups** (``group_size=G``): tokens are cut into consecutive groups of ``G``
  (``N % G == 0``), each routed independently with capacity per group and expert. No
  communication at all, and — with ``G`` fixed in config and each rank holding whole
  groups in single-process order — the dispatch is independent of the world size.
* **global** (``group_size=None`` and a ``comm`` spanning ranks): one routing problem over
  all ranks' tokens in rank order; the OT solvers run in global scope and the FCFS
  positions get per-rank offsets from one all-gather of per-expert claim counts, so the
  dispatch equals the single-process one on the concatenated tokens.
* otherwise: one group made of this process's tokens.

Combine weights keep the router's autograd graph (``gate="softmax"`` or ``"sigmoid"``)
— the OT solve itself runs under ``no_grad`` (V-MoE / Megatron convention); ``"plan"``
uses the row-normalised plan ``n·T_ij`` (no gradient).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distreg.moe.routing_ot import OTResult, sinkhorn_plan, sns_plan, sparse_ot_plan

__all__ = [
    "DispatchPlan",
    "expert_capacity",
    "topk_router",
    "ot_router",
    "sinkhorn_router",
    "sparse_ot_router",
    "sns_router",
    "dispatch_from_choices",
]

# sparse OT: a Newton stall below this many tokens' mass is the capped plan's kink floor
_KINK_TOKENS = 40


@dataclass
class DispatchPlan:
    """Routing decision for ``N`` local tokens, ``m`` experts, ``k`` slots per token.

    expert_index: ``[N, k]`` int64 expert of each slot, ``-1`` = empty or dropped.
    combine_weight: ``[N, k]`` gate of each slot (0 where empty), differentiable.
    position: ``[N, k]`` int64 row in the expert's buffer (per group; global scope: in
        the global buffer), ``-1`` where empty.
    capacity: buffer rows per expert (per group).
    tokens_per_expert: ``[num_groups, m]`` int64 tokens each expert receives (global
        scope: ``[1, m]`` global counts, replicated).
    dropped_tokens / overflow: see module docstring (global scope: summed over ranks).
    aux_loss: load-balancing loss (:func:`topk_router` only), z_loss: router z-loss.
    solver: the :class:`OTResult` of the OT routers (``None`` for top-k).
    """

    expert_index: Tensor
    combine_weight: Tensor
    position: Tensor
    capacity: int
    tokens_per_expert: Tensor
    dropped_tokens: int
    overflow: int
    aux_loss: Tensor | None
    z_loss: Tensor
    solver: OTResult | None = None

    def dispatch_mask(self, num_experts: int) -> Tensor:
        """``[N, m]`` bool: token i is sent to expert j."""
        idx = self.expert_index
        oh = F.one_hot(idx.clamp_min(0), num_experts).bool() & (idx >= 0).unsqueeze(-1)
        return oh.any(-2)

    def load_balance(self) -> float:
        """max / mean tokens per expert (1.0 = perfectly balanced)."""
        load = self.tokens_per_expert.sum(0).double()
        return float(load.max() / load.mean().clamp_min(1e-12))


def expert_capacity(tokens: int, num_experts: int, k: int = 1, capacity_factor: float | None = None) -> int:
    """``ceil(capacity_factor · tokens · k / num_experts)`` capped at ``tokens`` (a token
    is sent to an expert at most once); ``None`` = no limit (``tokens``)."""
    if capacity_factor is None:
        return tokens
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * k / num_experts)))


def _global(comm) -> bool:
    return comm is not None and comm.world_size > 1


def _groups(logits: Tensor, group_size: int | None):
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, experts], got {tuple(logits.shape)}")
    N, m = logits.shape
    if group_size is None:
        return logits.unsqueeze(0)
    if group_size <= 0 or N % group_size:
        raise ValueError(f"{N} tokens are not a whole number of routing groups of {group_size}")
    return logits.reshape(N // group_size, group_size, m)


def _global_count(n: int, comm, device) -> int:
    if not _global(comm):
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    return int(comm.all_reduce(t, "sum"))


def dispatch_from_choices(choices: Tensor, capacity: int, num_experts: int, comm=None):
    """FCFS, slot-major capacity enforcement.

    ``choices``: ``[B, n, k]`` int64 expert per (group, token, slot), ``-1`` = none.
    Returns ``(position [B, n, k], keep [B, n, k], tokens_per_expert [B, m], overflow,
    dropped_tokens)``. With a ``comm`` spanning ranks (global scope, ``B == 1``) a claim's
    position counts the claims of all lower slots on every rank plus those of the same
    slot on lower ranks: one all-gather of ``[k, m]`` counts (+ one all-reduce of two
    counters), identical to the single-process positions on the concatenated tokens.
    """
    B, n, k = choices.shape
    m = num_experts
    flat = choices.transpose(1, 2).reshape(B, k * n)  # claims in slot-major order
    valid = flat >= 0
    key = torch.where(valid, flat, torch.full_like(flat, m))  # empty slots → bucket m
    slot = torch.arange(k, device=flat.device).repeat_interleave(n).expand(B, -1)
    counts = torch.zeros(B, k * (m + 1), dtype=torch.int64, device=flat.device)
    counts.scatter_add_(1, slot * (m + 1) + key, torch.ones_like(key))
    counts = counts.view(B, k, m + 1)[..., :m]  # [B, k, m] claims per slot on this rank
    # rank of each claim among this rank's claims on the same expert (stable sort keeps
    # slot-major token order), i.e. local claims on lower slots + earlier same-slot ones
    order = torch.sort(key, dim=1, stable=True).indices
    skey = key.gather(1, order)
    per_e = torch.zeros(B, m + 1, dtype=torch.int64, device=flat.device).scatter_add_(1, key, torch.ones_like(key))
    first = per_e.cumsum(1) - per_e
    rank_sorted = torch.arange(k * n, device=flat.device).expand(B, -1) - first.gather(1, skey)
    local = torch.empty_like(flat).scatter_(1, order, rank_sorted)
    if _global(comm):
        every = torch.stack(comm.all_gather(counts.contiguous()))  # [W, B, k, m]
        lower = every[: comm.rank].sum(0)
        total = every.sum(0)
    else:
        lower, total = torch.zeros_like(counts), counts
    # + claims on lower slots of other ranks + same-slot claims of lower ranks
    shift = (total.cumsum(1) - total) - (counts.cumsum(1) - counts) + lower  # [B, k, m]
    shift = torch.cat([shift, torch.zeros_like(shift[..., :1])], -1).view(B, k * (m + 1))
    pos = (local + shift.gather(1, slot * (m + 1) + key)).view(B, k, n).transpose(1, 2)
    keep = valid.view(B, k, n).transpose(1, 2) & (pos < capacity)
    pos = torch.where(keep, pos, torch.full_like(pos, -1))
    valid = valid.view(B, k, n).transpose(1, 2)
    tpe = total.sum(1).clamp_max(capacity)
    stats = torch.stack([(valid & ~keep).sum(), (~keep.any(-1)).sum()])
    if _global(comm):
        comm.all_reduce(stats, "sum")
    return pos, keep, tpe, int(stats[0]), int(stats[1])


def _z_loss(logits: Tensor, lse: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE): mean over this process's tokens of ``logsumexp(logits)²``
    (the rank average equals the global mean for equal token counts)."""
    lse = torch.logsumexp(logits.float(), dim=-1) if lse is None else lse
    return lse.square().mean()


def _finish(logits, idx, keep, pos, gate_vals, normalize, capacity, tpe, overflow, dropped, aux, solver, lse=None):
    N = logits.shape[0]
    k = idx.shape[-1]
    w = torch.where(keep, gate_vals, torch.zeros_like(gate_vals))
    if normalize:
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return DispatchPlan(
        expert_index=torch.where(keep, idx, torch.full_like(idx, -1)).reshape(N, k),
        combine_weight=w.reshape(N, k),
        position=pos.reshape(N, k),
        capacity=capacity,
        tokens_per_expert=tpe,
        dropped_tokens=dropped,
        overflow=overflow,
        aux_loss=aux,
        z_loss=_z_loss(logits, lse),
        solver=solver,
    )


def topk_router(
    logits: Tensor,
    k: int = 1,
    *,
    capacity: int | None = None,
    capacity_factor: float | None = None,
    group_size: int | None = None,
    normalize: bool = False,
    comm=None,
) -> DispatchPlan:
    """Softmax top-k router (Switch k=1, GShard k=2) with FCFS capacity.

    Gates: softmax probabilities of the chosen experts (renormalised over the k choices
    if ``normalize``). Load-balancing loss (Switch/GShard; Megatron's form for k > 1):
    ``aux = m · Σ_j P_j · f_j`` with ``P_j`` the mean router probability of expert j and
    ``f_j`` the fraction of the ``k·n`` top-k choices (before capacity) that pick j —
    1.0 when perfectly balanced. It is computed per routing group and averaged over
    groups; in global scope its value uses the global ``P`` and ``f`` (one all-reduce of
    ``2m + 1`` numbers) and its gradient is ∂(global loss)/∂(local logits) — a hook whose
    strategy averages gradients over ranks must multiply by the world size.
    ``z_loss``: ST-MoE router z-loss. Coefficients are the caller's.
    """
    N, m = logits.shape
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be in [1, {m}]")
    probs = torch.softmax(logits.float(), dim=-1)
    gp = _groups(probs, group_size)  # [B, n, m]
    top_p, top_i = gp.topk(k, dim=-1)
    scope_comm = comm if group_size is None else None
    n_group = gp.shape[1] if group_size is not None else _global_count(N, scope_comm, logits.device)
    cap = capacity if capacity is not None else expert_capacity(n_group, m, k, capacity_factor)
    pos, keep, tpe, overflow, dropped = dispatch_from_choices(top_i, cap, m, scope_comm)
    # load-balancing loss
    claims = F.one_hot(top_i, m).sum(-2).to(probs.dtype)  # [B, n, m]
    psum, fsum = gp.sum(-2), claims.sum(-2)  # [B, m]
    if _global(scope_comm):
        stats = torch.cat([psum.detach(), fsum]).flatten()
        comm.all_reduce(stats, "sum")
        gpsum, gfsum = stats.view(2, 1, m)
        psum = psum + (gpsum - psum).detach()  # value global, gradient through local probs
        fsum = gfsum
    aux = (m * (psum / n_group) * (fsum / (k * n_group))).sum(-1).mean()
    return _finish(logits, top_i, keep, pos, top_p, normalize, cap, tpe, overflow, dropped, aux, None)


def ot_router(
    logits: Tensor,
    k: int = 1,
    *,
    method: str = "sinkhorn",
    capacity: int | None = None,
    capacity_factor: float | None = None,
    group_size: int | None = None,
    gate: str = "softmax",
    normalize: bool = False,
    comm=None,
    dtype: torch.dtype | None = None,
    **solver_kwargs: Any,
) -> DispatchPlan:
    """Balanced-OT router: solve OT between the tokens of a routing group (``a = 1/n``)
    and the experts (``b = 1/m``, equal capacity share) with cost ``−logits``, then
    dispatch each token to the top-k nonzero entries of its plan row under capacity.

    ``method``:
    * ``"sinkhorn"`` — :func:`sinkhorn_plan` (defaults ``eps=1, tol=1e-4``: the
      S-BASE / Megatron Sinkhorn router, solved to tolerance);
    * ``"sns"`` — :func:`sns_plan` on the same entropic problem;
    * ``"sparse_ot"`` — :func:`sparse_ot_plan` with at most ``capacity`` tokens per expert
      (the paper's MoE constraint: a column cap). ``gamma`` (default 0.1) is per token:
      the solver gets ``gamma · n`` so that the regularisation acts on each token's
      distribution over experts independently of the group size. Defaults
      ``max_iter=100, tol=1e-3``, and then a Newton stall below 40 tokens' mass
      (``floor``; with an explicit ``tol``: ``10·tol``) is accepted as the capped plan's
      kink floor; the router truncates rows to k (spec §10). The solver
      is ``sparse_ot_plan``'s ``"auto"``: semi-smooth Newton, a few steps from the layer's
      warm start, stopping at the capped dual's kink floor when the capacity binds (the
      plan still respects it by construction), with L-BFGS as well where Newton stalls
      far from ``tol``. Pass ``solver=`` to override.
    ``gate``: ``"softmax"`` (router probabilities, differentiable), ``"sigmoid"``
    (Megatron's k = 1 Sinkhorn gate), or ``"plan"`` (``n·T_ij``, no gradient).
    """
    N, m = logits.shape
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be in [1, {m}]")
    if gate not in ("softmax", "sigmoid", "plan"):
        raise ValueError(f"unknown gate {gate!r}")
    scope_comm = comm if group_size is None else None
    L = _groups(logits.detach(), group_size)
    n_group = L.shape[1] if group_size is not None else _global_count(N, scope_comm, logits.device)
    cap = capacity if capacity is not None else expert_capacity(n_group, m, k, capacity_factor)
    kw = dict(solver_kwargs)
    with torch.no_grad():
        if method == "sinkhorn":
            kw.setdefault("eps", 1.0)
            kw.setdefault("tol", 1e-4)
            res = sinkhorn_plan(scores=L, comm=scope_comm, dtype=dtype, **kw)
        elif method == "sns":
            kw.setdefault("eps", 1.0)
            kw.setdefault("tol", 1e-4)
            res = sns_plan(scores=L, comm=scope_comm, dtype=dtype, **kw)
        elif method == "sparse_ot":
            gamma = kw.pop("gamma", 0.1) * n_group
            kw.setdefault("max_iter", 100)
            if "tol" not in kw:
                kw["tol"] = 1e-3
                # a capped plan at a kink misplaces the mass of the tokens tied at capacity
                # boundaries: measured 15-35 tokens' mass at E = 64 whatever the group
                # size (4e-3 at 4096 tokens, 2e-2 at 1024, 7e-2 at 512), so a Newton stall
                # below _KINK_TOKENS tokens' mass is that floor, not a case for the L-BFGS
                # fallback (~100 iterations, 0.3-0.5 s a call at 512-1024 tokens, no
                # better plan). An explicit tol asks for that convergence: 10·tol then
                kw.setdefault("floor", _KINK_TOKENS / n_group)
            res = sparse_ot_plan(scores=L, gamma=gamma, max_nz_col=cap if cap < n_group else None,
                                 comm=scope_comm, dtype=dtype, **kw)
        else:
            raise ValueError(f"unknown method {method!r}")
    if res.support is not None and k <= res.support.values.shape[-1]:
        # the plan's nonzeros lie among each token's candidates: its top-k read there
        # ([n, c] instead of [n, m]; on CPU a dense top-1 over 64 experts costs ~0.4 ms)
        cand = res.support.values
        val, slot = cand.max(-1, keepdim=True) if k == 1 else cand.topk(k, dim=-1)
        idx = res.support.experts.gather(-1, slot)
    else:
        val, idx = res.plan.topk(k, dim=-1)
    idx = torch.where(val > 0, idx, torch.full_like(idx, -1))
    pos, keep, tpe, overflow, dropped = dispatch_from_choices(idx, cap, m, scope_comm)
    # Gates only at the chosen slots: softmax_j = exp(logit_j - logsumexp), with the
    # logsumexp shared with the z-loss (no full softmax over [N, m]).
    lse = torch.logsumexp(logits.float(), dim=-1)
    if gate == "plan":
        gv = (val * n_group).to(logits.dtype)
    else:
        chosen = _groups(logits.float(), group_size).gather(-1, idx.clamp_min(0))
        gv = (chosen - _groups(lse.unsqueeze(-1), group_size)).exp() if gate == "softmax" else torch.sigmoid(chosen)
    return _finish(logits, idx, keep, pos, gv, normalize, cap, tpe, overflow, dropped, None, res, lse)


def sinkhorn_router(logits: Tensor, k: int = 1, **kw: Any) -> DispatchPlan:
    """:func:`ot_router` with ``method="sinkhorn"``."""
    return ot_router(logits, k, method="sinkhorn", **kw)


def sparse_ot_router(logits: Tensor, k: int = 1, **kw: Any) -> DispatchPlan:
    """:func:`ot_router` with ``method="sparse_ot"`` (≤ capacity tokens per expert)."""
    return ot_router(logits, k, method="sparse_ot", **kw)


def sns_router(logits: Tensor, k: int = 1, **kw: Any) -> DispatchPlan:
    """:func:`ot_router` with ``method="sns"``."""
    return ot_router(logits, k, method="sns", **kw)
