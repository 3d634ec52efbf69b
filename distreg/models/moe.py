"""Mixture-of-experts SwiGLU feed-forward with expert parallelism (EP).

Layout. One MoE layer holds a router projection `gate` ([E, dim], an ordinary
parameter: replicated / FSDP2-sharded like every other weight) and the experts as
*stacked* parameters `w1`, `w3` ([E, ffn, dim]) and `w2` ([E, dim, ffn]) - the layout
of `nn.Linear.weight` per expert, so expert e is `w2[e](silu(w1[e] x) * w3[e] x)`.
With W ranks (EP size = world size) rank r owns experts [r*E/W, (r+1)*E/W): under
FSDP2 the stacked parameters become DTensors `Shard(0)` over the expert dim
(`shard_experts`), kept out of FSDP's own sharding (`fully_shard(ignored_params=...)`),
so DCP checkpoints and `ParamShard` identity (name, full shape, flat range) work
unchanged; in a single process (W = 1) they are plain tensors holding every expert.

Routing groups (spec S5). A router decides over a *routing group* of
`group_size` consecutive tokens of this rank's micro-batch ([batch, seq] flattened
row-major; 0 = the whole local micro-batch is one group). Capacity is per expert *per
group*: `capacity = ceil(capacity_factor * group_size * top_k / E)`. Because the data
layer gives rank r the slice [r*b, (r+1)*b) of each global micro-batch, a group size
that divides the local micro-batch's token count makes every group - hence every
routing decision, capacity and drop - identical for 1, 2 or W ranks. (group_size 0
depends on W; rank-invariant configs fix it, e.g. to data.seq_len.)

Global scope (`route_scope="global"`, `model.moe_route_scope: global`). The router
solves one problem over the micro-step's tokens of *all* ranks, in rank order (the
single-process order), with capacity per expert over all of them; tokens stay on their
ranks and only per-expert statistics travel (Sinkhorn: an all-reduce of E-sized vectors
per iteration; sparse OT: the per-expert top-k over all tokens by the exact radix
selection of `distreg.sparsity`, 4 histogram all-reduces; capacity positions: one
all-gather of per-expert claim counts). Every rank stops after the same number of
iterations (decided on all-reduced values), and the plan equals the single-process
plan on the same tokens - so routing no longer depends on any group size. Global OT
solves run in float64 (see `PackageRouter`).

Per forward on each rank:
  logits = gate(x) -> router(logits [groups, G, E], top_k, capacity) -> plan: for each
  token up to top_k (expert, gate weight) slots, -1 = no expert -> capacity re-checked
  (`enforce_capacity`, a no-op for a router that already respects it) -> one float64
  all-reduce of the layer's statistics (per-expert top-k choices, dispatched counts,
  router-probability sums, token/drop counts, entropy and z sums) -> dispatch: slots
  sorted by expert, `all_to_all_single` of per-expert counts, then of the token rows ->
  every local expert runs on its rows (also on zero rows, so each expert parameter has
  a gradient on every rank) -> `all_to_all_single` back -> output = sum over the
  token's slots of gate * expert output. A token with no slot left (all dropped by
  capacity) gets 0 here, i.e. passes through the block's residual unchanged.

Gradients. The Trainer backpropagates `world * (rank's share of the loss)` because
the strategies average gradients over ranks. An expert's gradient is not averaged: it
already sums the contributions of every rank's tokens (they reached its owner through
the all-to-all, and come back through the all-to-all's backward), so it is `world`
times too large; `_ScaleGrad` divides it by the EP size on the way into the local
expert slice (identity in the forward).

Auxiliary losses (global statistics, rank-invariant). Over the *global* micro-batch
(all ranks' tokens of one micro-step; N tokens):
  load balancing (Switch/GShard, top-k form)
      aux = coef_aux * E * sum_e f_e * P_e,  f_e = (#tokens with e in their router
      top-k) / (N * top_k)  (no gradient; pre-capacity, router-independent),
      P_e = mean router softmax probability of e  (gradient through the router);
  router z-loss (ST-MoE)  z = coef_z * mean_t logsumexp_e(logits_t)^2.
`f_e` and N come from the all-reduce; each rank keeps the differentiable share of its
own tokens (sum over ranks = the global value). Losses a router computes itself (the
package's per-group `aux_loss` / `z_loss`) are not used: these global ones replace them. The layer stores the shares after
each training forward; `moe_penalties` hands them to the Trainer as `LossTerms`
penalties (scaled by the world size, like the sample loss).

Router protocol (plug-in). `model.moe_router` names a router of `distreg.moe.routers`
(`topk`, `sinkhorn`, `sparse_ot`, `sns`; adapted by `PackageRouter`, called in
routing-group scope with this layer's capacity) or, if that package is missing, the
built-in `topk_router` (softmax top-k; the same plan as the package's `topk`).
Any callable can be passed instead of a name:
    router(logits: Tensor [groups, G, E], top_k: int, capacity: int)
returning an object with `.expert` / `.gate` (or `.expert_index` / `.combine_weight`),
a tuple `(expert, gate)` of [groups, G, <=top_k] tensors (expert index, -1 for an
unused slot), or a dense [groups, G, E] combine matrix (nonzero = dispatched, value =
combine weight; a row's top_k largest entries are kept). The combine weights carry the
router gradient (e.g. softmax probabilities). Top-k dispatch rule (both
implementations): slots filled in priority order (every token's first choice in token
order, then second choices, ...), a slot beyond capacity dropped, gates = softmax
probabilities renormalised over the kept slots when k > 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from distreg.models.recompute import is_recomputing

__all__ = [
    "DispatchPlan", "MoEFeedForward", "PackageRouter", "topk_router", "enforce_capacity", "resolve_router",
    "available_routers",
    "moe_layers", "moe_penalties", "moe_metrics", "reset_moe_metrics", "shard_experts", "expert_parameters",
    "check_moe_setup",
]

EXPERT_PARAMS = ("w1", "w3", "w2")


# ------------------------------------------------------------------------------ routing


@dataclass
class DispatchPlan:
    """For each token, up to k slots: `expert` [..., k] (long, -1 = no expert) and
    `gate` [..., k] (combine weight, 0 where expert is -1)."""

    expert: Tensor
    gate: Tensor


def capacity_of(group_size: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert may take from one routing group."""
    return max(1, min(group_size, math.ceil(capacity_factor * group_size * top_k / num_experts)))


def enforce_capacity(expert: Tensor, gate: Tensor, capacity: int, num_experts: int) -> DispatchPlan:
    """Drop slots beyond `capacity` per expert in each group ([groups, G, k] inputs).

    Priority: slot 0 of every token (in token order), then slot 1, ... (GShard order),
    so a token's first choice wins over another token's second choice."""
    n, g, k = expert.shape
    valid = expert >= 0
    onehot = F.one_hot(expert.clamp(min=0), num_experts) * valid.unsqueeze(-1)  # [n, G, k, E]
    queue = onehot.transpose(1, 2).reshape(n, k * g, num_experts)
    position = queue.cumsum(1) - 1
    keep = ((position < capacity) & (queue > 0)).any(-1).view(n, k, g).transpose(1, 2)
    return DispatchPlan(torch.where(keep, expert, -1), torch.where(keep, gate, torch.zeros_like(gate)))


def topk_router(logits: Tensor, top_k: int, capacity: int) -> DispatchPlan:
    """Plain softmax top-k routing with per-expert capacity (the built-in default)."""
    probs = torch.softmax(logits.float(), dim=-1)
    gate, expert = probs.topk(top_k, dim=-1)
    plan = enforce_capacity(expert, gate, capacity, logits.shape[-1])
    if top_k > 1:  # renormalise over the slots kept (a token that lost one keeps weight 1)
        plan.gate = plan.gate / plan.gate.sum(-1, keepdim=True).clamp_min(torch.finfo(plan.gate.dtype).tiny)
    return plan


_BUILTIN_ROUTERS: dict[str, Callable[..., Any]] = {"topk": topk_router}
# Routers of `distreg.moe.routers` by config name (their signature:
# fn(logits [N, E], k, *, capacity=, group_size=, normalize=, ...) -> their DispatchPlan).
_PACKAGE_ROUTER_FUNCS = {"topk": "topk_router", "sinkhorn": "sinkhorn_router", "sparse_ot": "sparse_ot_router",
                         "sns": "sns_router"}


def _package_routers() -> dict[str, Callable[..., Any]]:
    """The routers of `distreg.moe.routers` (a `ROUTERS` dict if it defines one, else
    the functions named in _PACKAGE_ROUTER_FUNCS); empty if the package is missing."""
    try:
        from distreg.moe import routers as ext  # noqa: PLC0415
    except ImportError:
        return {}
    table = getattr(ext, "ROUTERS", None)
    if isinstance(table, dict):
        return dict(table)
    return {name: getattr(ext, fn) for name, fn in _PACKAGE_ROUTER_FUNCS.items() if hasattr(ext, fn)}


# OT routers whose expert potentials warm-start the next micro-step (layer state).
WARM_STARTED = ("sinkhorn", "sparse_ot", "sns")
# Warm-start potentials are averaged over all routing groups of all ranks as integer
# multiples of 2^-24 (exact in float64 whatever the summation order), so the start -
# and with it the tolerance-stopped plan - is bitwise the same on any number of ranks.
_DUAL_QUANTUM = 2.0 ** -24


class PackageRouter:
    """Adapter: a `distreg.moe.routers` function under this layer's router protocol.

    The groups are passed as `group_size` (routing-group scope: no collective, capacity
    per group); `topk` is asked to renormalise its gates over the k choices when k > 1,
    as the built-in `topk_router` does, so both give the same plan."""

    supports_global = True

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name, self.fn = name, fn
        self.last_solver: tuple[int, float] | None = None  # (iterations, marginal residual) of the last solve
        self.last_duals: Tensor | None = None  # [groups, E] expert potentials of the last solve

    def __call__(self, logits: Tensor, top_k: int, capacity: int, comm=None, global_scope: bool = False,
                 init: Tensor | None = None):
        """Route `logits` [groups, G, E]: each group alone, or (`global_scope`, one group)
        one problem over the tokens of every rank of `comm` (None: this process only).
        `init` [E]: warm start of the OT solvers' expert potentials (every group)."""
        groups, g, experts = logits.shape
        kw: dict[str, Any] = {"normalize": top_k > 1} if self.name == "topk" else {}
        if init is not None and self.name in WARM_STARTED:
            kw["init"] = (None, init.to(logits.device).expand(groups, experts))
        if global_scope and self.name != "topk":
            # Global OT solves in float64: a solver stopped by its tolerance or iteration
            # cap follows a path that float32 round-off in the cross-rank sums would bend,
            # so the plan would depend on the number of ranks. (Group scope solves each
            # group alone with the same operations on any world size: float32 is exact.)
            kw["dtype"] = torch.float64
        scope = {"group_size": None, "comm": comm} if global_scope else {"group_size": g}
        plan = self.fn(logits.reshape(groups * g, experts), top_k, capacity=capacity, **scope, **kw)
        solver = getattr(plan, "solver", None)
        self.last_solver = (solver.iterations, solver.residual) if solver is not None else None
        self.last_duals = solver.g.reshape(groups, experts) if solver is not None and solver.g is not None else None
        expert, gate = _plan_fields(plan)
        return expert.reshape(groups, g, -1), gate.reshape(groups, g, -1)

    def __repr__(self) -> str:
        return f"PackageRouter({self.name!r})"


def available_routers() -> list[str]:
    return sorted(set(_BUILTIN_ROUTERS) | set(_package_routers()))


def resolve_router(router: str | Callable[..., Any]) -> Callable[..., Any]:
    """A router under this layer's protocol, from a name (`model.moe_router`: the
    `distreg.moe.routers` router of that name when the package provides it, else the
    built-in) or a callable (returned as is)."""
    if callable(router):
        return router
    package = _package_routers()
    if router in package:
        return PackageRouter(router, package[router])
    if router in _BUILTIN_ROUTERS:
        return _BUILTIN_ROUTERS[router]
    raise ValueError(f"model.moe_router: unknown router {router!r}; available: {', '.join(available_routers())}")


def _plan_fields(out: Any) -> tuple[Tensor, Tensor]:
    for e, g in (("expert", "gate"), ("expert_index", "combine_weight")):
        if hasattr(out, e) and hasattr(out, g):
            return getattr(out, e), getattr(out, g)
    raise TypeError(f"router returned {type(out).__name__}; expected a DispatchPlan, (expert, gate) or a dense plan")


def _as_plan(out: Any, top_k: int) -> DispatchPlan:
    """Normalise a router's answer to a DispatchPlan with at most top_k slots."""
    if isinstance(out, (tuple, list)) and len(out) == 2:
        expert, gate = out
    elif isinstance(out, Tensor):  # dense combine matrix [groups, G, E]
        k = min(top_k, out.shape[-1])
        gate, expert = out.topk(k, dim=-1)
        expert = torch.where(gate != 0, expert, -1)
        gate = torch.where(gate != 0, gate, torch.zeros_like(gate))
    else:
        expert, gate = _plan_fields(out)
    expert = expert.long()
    if expert.shape[-1] > top_k:  # keep the k heaviest slots of each token
        order = torch.where(expert >= 0, gate.detach(), torch.full_like(gate.detach(), -math.inf)).topk(top_k, -1).indices
        expert, gate = expert.gather(-1, order), gate.gather(-1, order)
    return DispatchPlan(expert, gate)


# ------------------------------------------------------------------ autograd helpers


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` of rows with uneven splits; the backward sends gradients back."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def _local(p: Tensor) -> Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


# -------------------------------------------------------------------------- the layer

# Layout of the statistics vector (float64, summed over ranks): per-expert top-k
# choices [E], dispatched slots [E], router-probability sums [E], then tokens,
# dropped tokens, dropped slots, entropy sum, logsumexp^2 sum, OT solver iterations
# and marginal residual (0 for top-k; global scope: the same on every rank).
_N_SCALARS = 7


class MoEFeedForward(nn.Module):
    """Token-choice MoE SwiGLU with capacity, routing groups and expert parallelism."""

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int = 2, capacity_factor: float = 1.25,
                 group_size: int = 0, router: str | Callable[..., Any] = "topk", aux_loss_coef: float = 0.0,
                 z_loss_coef: float = 0.0, route_scope: str = "group"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"model.moe_top_k={top_k} must be in [1, model.moe_num_experts={num_experts}]")
        if route_scope not in ("group", "global"):
            raise ValueError(f"model.moe_route_scope: expected 'group' or 'global', got {route_scope!r}")
        if route_scope == "global" and group_size:
            raise ValueError("model.moe_group_size applies to model.moe_route_scope=group; global scope routes all "
                             "tokens of the step as one problem (set moe_group_size: 0)")
        self.route_scope = route_scope
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.group_size, self.aux_loss_coef, self.z_loss_coef = group_size, aux_loss_coef, z_loss_coef
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        fn = resolve_router(router)
        if route_scope == "global" and not getattr(fn, "supports_global", False):
            raise ValueError(f"model.moe_route_scope=global needs a router of distreg.moe.routers; {router!r} only "
                             "routes in group scope")
        if isinstance(fn, nn.Module):
            self.router = fn  # a router with its own parameters/buffers is a submodule
        else:
            self.router_fn = fn
        # Expert parallelism: set by `shard_experts` (W = 1: every expert local).
        self.ep_group = None
        self.ep_size, self.ep_rank = 1, 0
        self._route_comm = None  # Comm over ep_group, built on first use (global scope)
        self.aux_losses: dict[str, Tensor] = {}  # this rank's differentiable shares, last forward
        self.stats: Tensor | None = None  # summed statistics since the last reset (float64)
        # Warm start of the OT router: the expert potentials of the previous training
        # micro-step, centred per group and averaged over every group of every rank
        # (replicated, so a model buffer: checkpointed with the weights; zeros = cold).
        self.warm_start = isinstance(router, str) and router in WARM_STARTED
        self.register_buffer("router_duals", torch.zeros(num_experts, dtype=torch.float64))
        self._duals_used: Tensor | None = None  # the start of the last forward (replayed by recomputation)
        self.forwards = 0  # training forwards accumulated in `stats`
        self.record_eval = False  # accumulate `stats` in eval forwards too (set by the evaluator)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"route_scope={self.route_scope}, group_size={self.group_size}, ep_size={self.ep_size}")

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def _route(self, logits: Tensor) -> tuple[DispatchPlan, int]:
        tokens = logits.shape[0]
        router = getattr(self, "router", None)
        router = self.router_fn if router is None else router
        if self.route_scope == "global":
            # One problem over the micro-step's tokens of all EP ranks, in rank order (the
            # single-process token order). Every rank routes the same number of tokens
            # (the Trainer splits each global micro-batch evenly), so the global count
            # and capacity need no collective.
            capacity = capacity_of(tokens * self.ep_size, self.top_k, self.num_experts, self.capacity_factor)
            grouped = logits.view(1, tokens, self.num_experts)
            comm = self._comm() if self.ep_size > 1 else None
            out = router(grouped, self.top_k, capacity, comm=comm, global_scope=True, **self._warm_kw())
        else:
            g = self.group_size or tokens
            if tokens % g:
                raise ValueError(f"model.moe_group_size={self.group_size} does not divide the {tokens} tokens of "
                                 "this rank's micro-batch (micro-batch size x data.seq_len)")
            capacity = capacity_of(g, self.top_k, self.num_experts, self.capacity_factor)
            grouped = logits.view(tokens // g, g, self.num_experts)
            out = router(grouped, self.top_k, capacity, **self._warm_kw())
        plan = _as_plan(out, self.top_k)
        # Guards plugged-in routers. Skipped for the package routers, whose slot-major FCFS
        # dispatch already keeps every expert within capacity (global scope: a rank's
        # share of an expert's global capacity is below the capacity): an [N, k, E] pass saved.
        if not isinstance(router, PackageRouter):
            plan = enforce_capacity(plan.expert, plan.gate, capacity, self.num_experts)
        k = plan.expert.shape[-1]
        return DispatchPlan(plan.expert.reshape(tokens, k), plan.gate.reshape(tokens, k)), capacity

    def _warm_kw(self) -> dict[str, Any]:
        """`init=` for a warm-started OT router: the layer's potentials, or - when
        activation checkpointing re-runs this forward - the start the first run used."""
        if not (self.warm_start and isinstance(getattr(self, "router_fn", None), PackageRouter)):
            return {}
        if not is_recomputing():
            self._duals_used = self.router_duals.clone()
        return {"init": self._duals_used}

    def _duals_sum(self) -> Tensor:
        """[E + 1] float64: this rank's quantised, per-group-centred potentials summed over
        its groups, and its number of groups (zeros without a warm-started solve)."""
        duals = getattr(getattr(self, "router_fn", None), "last_duals", None) if self.warm_start else None
        out = torch.zeros(self.num_experts + 1, dtype=torch.float64, device=self.router_duals.device)
        if duals is None:
            return out
        d = duals.detach().double()
        d = torch.round((d - d.mean(-1, keepdim=True)) / _DUAL_QUANTUM)
        out[:-1] = d.sum(0)
        out[-1] = d.shape[0]
        return out

    def _comm(self):
        if self._route_comm is None:
            from distreg.runtime.comm import Comm

            self._route_comm = Comm(self.ep_group)
        return self._route_comm

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        tokens, E = xf.shape[0], self.num_experts
        logits = self.gate(xf)
        plan, _ = self._route(logits)
        solver = getattr(getattr(self, "router", None) or self.router_fn, "last_solver", None) or (0, 0.0)
        probs = torch.softmax(logits.float(), dim=-1)
        lse = torch.logsumexp(logits.float(), dim=-1)

        # One all-reduce of this layer's statistics: global token counts per expert for
        # the aux loss (rank-invariant) and everything the metrics report.
        with torch.no_grad():
            chosen = torch.bincount(probs.topk(self.top_k, dim=-1).indices.reshape(-1), minlength=E)
            assigned = plan.expert >= 0
            dispatched = torch.bincount(plan.expert[assigned], minlength=E)
            scalars = torch.stack([
                torch.tensor(float(tokens), dtype=torch.float64, device=xf.device),
                (~assigned.any(-1)).sum().double(),
                tokens * self.top_k - assigned.sum().double(),
                -(probs * torch.log(probs.clamp_min(1e-30))).sum().double(),
                lse.pow(2).sum().double(),
                torch.tensor(float(solver[0]), dtype=torch.float64, device=xf.device),
                torch.tensor(float(solver[1]), dtype=torch.float64, device=xf.device),
            ])
            duals = self._duals_sum()
            stats = torch.cat([chosen.double(), dispatched.double(), probs.sum(0).double(), scalars, duals])
            if self.ep_size > 1:
                dist.all_reduce(stats, group=self.ep_group)
            if self.warm_start and self.training and not is_recomputing():
                # next micro-step's warm start: exact mean of the integer sums, identical on
                # every rank (kept as is when no solve reported potentials; no host sync)
                mean = stats[-E - 1:-1] / stats[-1].clamp_min(1) * _DUAL_QUANTUM
                self.router_duals.copy_(torch.where(stats[-1] > 0, mean, self.router_duals))
            stats = stats[:-E - 1]
        if self.training and torch.is_grad_enabled():
            n_global = stats[3 * E]
            f = (stats[:E] / (n_global * self.top_k)).to(probs.dtype)
            aux_losses = {
                "moe_aux": self.aux_loss_coef * E * (f * probs.sum(0)).sum() / n_global.to(probs.dtype),
                "moe_z": self.z_loss_coef * lse.pow(2).sum() / n_global.to(lse.dtype),
            }
            # Activation checkpointing re-runs this forward in backward (same routing, same
            # collectives on every rank, and the same autograd ops - checkpointing checks
            # that): the losses and statistics were taken the first time.
            if not is_recomputing():
                self.aux_losses = aux_losses
                self.stats = stats if self.stats is None else self.stats + stats
                self.forwards += 1
        elif self.record_eval:
            # Held-out evaluation (distreg.runtime.evaluate) collects the same statistics
            # in eval mode: dropped tokens and load of the routing as evaluated.
            self.stats = stats if self.stats is None else self.stats + stats
            self.forwards += 1

        out = self._experts(xf, plan)
        return out.view(shape)

    def _experts(self, xf: Tensor, plan: DispatchPlan) -> Tensor:
        tokens, k = plan.expert.shape
        E, W, El = self.num_experts, self.ep_size, self.local_experts
        flat_e = plan.expert.reshape(-1)
        slots = torch.nonzero(flat_e >= 0).squeeze(1)
        slots = slots[torch.argsort(flat_e[slots], stable=True)]  # grouped by expert (hence by owner rank)
        send_e, send_tok = flat_e[slots], slots // k
        send_x = xf[send_tok]
        per_expert = torch.bincount(send_e, minlength=E)
        if W > 1:
            # Rank j receives, from every rank, the counts for its experts [j*El, (j+1)*El).
            recv_counts = torch.empty_like(per_expert)
            dist.all_to_all_single(recv_counts, per_expert, group=self.ep_group)
            send_splits = per_expert.view(W, El).sum(1).tolist()
            recv_splits = recv_counts.view(W, El).sum(1).tolist()
            recv_x = _AllToAll.apply(send_x, recv_splits, send_splits, self.ep_group)
            # Rows arrive by source rank, each sorted by expert: label them, then sort by expert.
            recv_e = torch.repeat_interleave(torch.arange(El, device=xf.device).repeat(W), recv_counts.view(-1))
            order = torch.argsort(recv_e, stable=True)
            counts = recv_counts.view(W, El).sum(0)
        else:
            recv_x, order, counts = send_x, None, per_expert
        rows = recv_x if order is None else recv_x[order]

        w1, w3, w2 = (_local(getattr(self, n)) for n in EXPERT_PARAMS)
        if W > 1:  # see "Gradients" in the module docstring
            w1, w3, w2 = (_ScaleGrad.apply(w, 1.0 / W) for w in (w1, w3, w2))
        w1, w3, w2 = (w.to(rows.dtype) for w in (w1, w3, w2))
        y = expert_swiglu(rows, counts, w1, w3, w2)
        if order is not None:
            y = torch.empty_like(y).index_copy(0, order, y)  # back to arrival order
            y = _AllToAll.apply(y, send_splits, recv_splits, self.ep_group)
        weight = plan.gate.reshape(-1)[slots].unsqueeze(1).to(y.dtype)
        return torch.zeros_like(xf).index_add(0, send_tok, y * weight)


def _grouped_mm_ok(rows: Tensor, *weights: Tensor) -> bool:
    """torch._grouped_mm runs every expert's GEMM in one call (no Python loop, no host
    read of the per-expert counts). It needs 16-byte-aligned rows (CPU and CUDA) and,
    on CUDA, bf16; anything else takes the per-expert loop."""
    if not hasattr(torch, "_grouped_mm") or (rows.is_cuda and rows.dtype != torch.bfloat16):
        return False
    return all(w.shape[-1] * w.element_size() % 16 == 0 and w.shape[-2] * w.element_size() % 16 == 0
               for w in weights)


def expert_swiglu(rows: Tensor, counts: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """SwiGLU of each local expert on its rows: `rows` sorted by expert, `counts[e]` rows
    for expert e (a device tensor), weights [El, out, in] as for F.linear."""
    if _grouped_mm_ok(rows, w1, w3, w2):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = F.silu(torch._grouped_mm(rows, w1.transpose(-2, -1), offs=offs)) \
            * torch._grouped_mm(rows, w3.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    outs = []
    for e, part in enumerate(torch.split(rows, counts.tolist())):  # every local expert, even on 0 rows
        outs.append(F.linear(F.silu(F.linear(part, w1[e])) * F.linear(part, w3[e]), w2[e]))
    return torch.cat(outs)


# ----------------------------------------------------------------- model-level helpers


def moe_layers(model: nn.Module) -> list[tuple[str, MoEFeedForward]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [getattr(m, n) for _, m in moe_layers(model) for n in EXPERT_PARAMS]


def moe_penalties(layers: list[MoEFeedForward], world_size: int) -> dict[str, Tensor]:
    """The last forward's aux / z losses as `LossTerms.penalties` entries.

    Each layer holds this rank's share (sum over ranks = the global micro-batch value);
    like the sample loss it is multiplied by the world size because the strategies
    average gradients over ranks. The Trainer divides penalties by grad_accum, so the
    step's value is the mean over micro-batches."""
    out: dict[str, Tensor] = {}
    for layer in layers:
        for key, value in layer.aux_losses.items():
            coef = layer.aux_loss_coef if key == "moe_aux" else layer.z_loss_coef
            if coef:
                out[key] = out[key] + value if key in out else value
        layer.aux_losses = {}
    return {k: v * world_size for k, v in out.items()}


def _layer_metrics(layer: MoEFeedForward) -> dict[str, Any]:
    if layer.stats is None:
        return {}
    E, s = layer.num_experts, layer.stats.cpu()
    tokens, dropped_tok, dropped_slots, ent, zsum, iters, residual = s[3 * E:3 * E + _N_SCALARS].tolist()
    if tokens == 0:
        return {}
    solves = max(1, layer.forwards * layer.ep_size)  # one solve per rank and forward
    f = s[:E] / (tokens * layer.top_k)
    p = s[2 * E:3 * E] / tokens
    dispatched = s[E:2 * E]
    # aux recomputed from summed statistics: exact for one micro-batch, the token-weighted
    # mean otherwise (the penalty itself uses each micro-batch's own statistics).
    return {
        "load": (dispatched / dispatched.sum().clamp_min(1)).tolist(),  # fraction of dispatched slots per expert
        "load_max": float(dispatched.max() / dispatched.sum().clamp_min(1)),
        "dropped_frac": dropped_slots / (tokens * layer.top_k),  # empty slots: capacity drops or < k chosen
        "dropped_tokens_frac": dropped_tok / tokens,
        "router_entropy": ent / tokens,
        "aux_loss": layer.aux_loss_coef * E * float((f * p).sum()),
        "z_loss": layer.z_loss_coef * zsum / tokens,
        "solver_iterations": iters / solves,  # mean over ranks and micro-batches
        "solver_residual": residual / solves,
        "tokens": tokens,
    }


def moe_metrics(model: nn.Module, per_layer: bool = False) -> dict[str, float]:
    """Global (already all-reduced) routing statistics since the last reset: per-expert
    load (fraction of dispatched slots, averaged over MoE layers), largest load,
    dropped fraction of slots and of tokens, mean router entropy (nats), aux and z
    losses. Identical on every rank; no collective."""
    rows = [(name, _layer_metrics(m)) for name, m in moe_layers(model)]
    rows = [(n, r) for n, r in rows if r]
    if not rows:
        return {}
    out: dict[str, float] = {}
    n = len(rows)
    for e in range(len(rows[0][1]["load"])):
        out[f"moe/load/e{e}"] = sum(r["load"][e] for _, r in rows) / n
    for key in ("load_max", "dropped_frac", "dropped_tokens_frac", "router_entropy", "aux_loss", "z_loss",
                "solver_iterations", "solver_residual"):
        out[f"moe/{key}"] = sum(r[key] for _, r in rows) / n
    if per_layer:
        for name, r in rows:
            short = name.replace("layers.", "layer").replace(".feed_forward", "")
            for key in ("load_max", "dropped_frac", "router_entropy"):
                out[f"moe/{short}/{key}"] = r[key]
    return out


def reset_moe_metrics(model: nn.Module) -> None:
    for _, m in moe_layers(model):
        m.stats = None
        m.forwards = 0


def shard_experts(model: nn.Module, mesh) -> set[nn.Parameter]:
    """Make every MoE layer expert-parallel over the 1-D `mesh`: the stacked expert
    weights become DTensors `Shard(0)` (rank r keeps experts [r*E/W, (r+1)*E/W)),
    tokens are exchanged over the mesh's process group. Works on real and meta
    weights. Returns the new expert parameters (for `fully_shard(ignored_params=...)`)."""
    from torch.distributed.tensor import DTensor, Shard

    layers = moe_layers(model)
    if not layers:
        return set()
    world, rank = mesh.size(), mesh.get_local_rank()
    group = mesh.get_group()
    out: set[nn.Parameter] = set()
    for _, m in layers:
        if m.num_experts % world:
            raise ValueError(f"model.moe_num_experts={m.num_experts} is not divisible by scaling.num_workers={world}")
        el = m.num_experts // world
        for name in EXPERT_PARAMS:
            p = getattr(m, name)
            local = p.detach()[rank * el:(rank + 1) * el]
            local = local if local.is_meta else local.clone()
            param = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
                                 requires_grad=p.requires_grad)
            setattr(m, name, param)
            out.add(param)
        m.ep_group, m.ep_size, m.ep_rank = group, world, rank
    return out


def check_moe_setup(cfg, world_size: int) -> None:
    """Config checks that need the world size (called by the Trainer before building
    anything); raises ConfigError naming the keys."""
    from distreg.config import ConfigError

    m = cfg.model
    if not m.moe_num_experts:
        return
    if m.moe_num_experts % world_size:
        raise ConfigError(f"model.moe_num_experts={m.moe_num_experts} is not divisible by scaling.num_workers="
                          f"{world_size}: expert parallelism gives every rank the same number of experts")
    s = cfg.strategy
    if s.name == "deepspeed":
        raise ConfigError("model.moe_num_experts > 0 is not supported with strategy.name=deepspeed "
                          "(expert parallelism is implemented for fsdp2, and for ddp on one worker)")
    if s.name == "ddp" and world_size > 1:
        raise ConfigError("model.moe_num_experts > 0 with strategy.name=ddp needs scaling.num_workers=1: under DDP "
                          "hooks see every parameter whole on every rank, which expert-parallel weights are not; "
                          "use strategy.name=fsdp2")
    local_tokens = cfg.micro_batch_size * cfg.data.seq_len
    if m.moe_group_size and local_tokens % m.moe_group_size:
        raise ConfigError(f"model.moe_group_size={m.moe_group_size} does not divide the {local_tokens} tokens of a "
                          f"rank's micro-batch (train.global_batch_size / (scaling.num_workers x "
                          f"train.grad_accum_steps) x data.seq_len)")
