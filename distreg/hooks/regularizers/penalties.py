"""Parameter penalties applied as gradient additions on the reduced local gradients (spec
P2b), and TRP's periodic low-rank projection.

- `orthogonality`: coef(step) * ||W W^T - I||_F^2 (or W^T W, the smaller Gram by default)
  on every participating nn.Linear / conv weight (as a matrix [out, in*k*k]).
- `nuclear_norm`: coef * ||W||_* with the exact subgradient U V^T.
- `trained_rank_pruning`: TRP (Xu et al. 2020): every `period` steps, before the forward,
  W <- U_k S_k V_k^T with k the energy rank; in that step's after_backward,
  grad += nuclear_weight * U_k V_k^T (the reference's optional nuclear term).
- `wdr`: EQ-Net weight-distribution regulariser (kurtosis / skewness of every weight).
- `mba_l2`: DIN mini-batch-aware L2 on an embedding table: only rows whose id occurs in
  the step's *global* batch, scaled by 1 / n_j (n_j = running count of samples containing
  id j, all-reduced each step).

Order inside a step (all but TRP's projection): forward -> loss -> backward + reduction
-> `after_backward`: the term's gradient (computed from the weights the step started
from) is added to the reduced local gradient -> clipping (the penalty gradient is
clipped together with the loss gradient) -> optimizer step. TRP's projection runs in
`after_step` (so before the next step's forward) and in `on_train_start` for step 0.
Put `perp_grad` after these hooks in the hook list: hooks run in list order.

Values are identical on every rank; each rank gets exactly its slice of the full
gradient (routes in `_common`). The three matrix penalties run on `_matrices` (one fused
collective of each kind per application, eigendecompositions dealt over the ranks).
Precision and default cadence, chosen from measurements (`benchmarks/regularizer_overhead.py`,
llama-small fsdp2 x2, 256 tokens per rank: a small batch, where a whole-matrix term costs
as much as the matrix's forward and backward):
- orthogonality: parameter dtype, squared error summed in float64; `every` 4 (~0.3 step
  per application);
- nuclear_norm: float64 (U V^T over *all* nonzero singular values: the Gram squares the
  condition number, fp32 loses every sigma below ~1e-2 sigma_max - see
  test_low_rank_terms_param_dtype_against_the_float64_svd); `every` 16 (~1.5 steps per
  application, an eigendecomposition per matrix);
- trained_rank_pruning: parameter dtype (the energy-truncated terms are well conditioned:
  fp32 agrees with the float64 SVD to 1e-5); `period` 8 (~0.8 step per projection; the
  reference's train_TPR.sh uses 5, its argparse default 1).
Each default keeps the amortised cost near 1.1x the no-hook step on that benchmark.
A larger batch shrinks these costs relative to the step: set `every: 1` / `period: 1` there.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from distreg.hooks.base import HookContext, LossTerms, ParamShard
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import (
    ValuesHook,
    F64,
    SelectParams,
    EveryParams,
    every_field,
    add_to_grad,
    gather_full,
    io_weight_names,
    layer_weight_names,
    local_rows,
    local_slice,
    matrix_shape,
    plan_routes,
    require_grad_writes,
    schedule_factor,
    select_shards,
)
from distreg.regularizers import (
    low_rank_project,
    low_rank_project_gram,
    standardized_moments,
    trp_matrix,
    trp_unmatrix,
)
from distreg.regularizers._dist import active
from distreg.hooks.regularizers._matrices import MatrixPlan, low_rank_terms, make_plan, orthogonality_terms


class _ParamPenalty(ValuesHook):
    """Participants (layer weights by default), routes, metrics and state plumbing."""
    writes_gradients = True  # edits reduced gradients: refused with DeepSpeed fp16 (scaled grads)

    params: SelectParams
    candidates_all = False  # True: every trainable parameter is a candidate, not only layer weights

    def __init__(self, params):
        super().__init__(params)
        self.values: dict[str, float] = {}
        self.names: list[str] | None = None
        self.routes: list[str] | None = None

    @property
    def prefix(self) -> str:
        return self.params.metrics_prefix or self.name

    def shards(self, ctx: HookContext) -> list[ParamShard]:
        if self.names is None:
            cands = None if self.candidates_all else layer_weight_names(ctx.model)
            if cands is not None and not getattr(self.params, "include_io", True):
                io = io_weight_names(ctx.model)
                cands = [c for c in cands if c not in io]
            shards = select_shards(ctx, self.params.include, self.params.exclude, cands, self.name)
            self.names = [s.name for s in shards]
            return shards
        by_name = {s.name: s for s in ctx.local_shards()}
        return [by_name[n] for n in self.names]

    def on_train_start(self, ctx: HookContext) -> None:
        shards = self.shards(ctx)
        require_grad_writes(shards, ctx, self.name)
        self.plan(ctx, shards)

    def plan(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        pass



class MatrixParams(SelectParams):
    include_io: bool = Field(False, description="also the embedding tables and the output head (left out by default)")


class _MatrixPenalty(_ParamPenalty):
    matrix_plan: MatrixPlan | None = None

    def plan(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        self.routes = plan_routes(ctx, shards, getattr(self.params, "route", "auto"))
        self.matrix_plan = make_plan(ctx, shards, self.routes)

    def due(self, ctx: HookContext) -> bool:
        """Applied in the step that `ctx.step` (completed steps) starts, every `every`."""
        return ctx.step % getattr(self.params, "every", 1) == 0


# --------------------------------------------------------------------------- orthogonality


@register
class Orthogonality(_MatrixPenalty):
    """Soft orthogonality (Bansal et al. SO / Wang et al. matrix form, spec 7.2):
    coef * factor(step) * sum_layers ||Gram - I||_F^2 (`squared: false`: the non-squared
    norm of Wang's `orth_dist`), Gram = W W^T (`side: rows`), W^T W (`cols`) or the smaller
    one (`auto`, default). `milestones` {step: factor} gives SRIP-style piecewise-constant
    coefficient decays. Metrics: `penalty` (coef * error), `error` (sum over layers of
    ||Gram - I||^2), `error_mean` (per layer), `coef`.
    Communication per applied step: one all-reduce of every row-sharded matrix's [D, D]
    Gram (route gram), one all-gather of the other matrices' slices (route gather: each
    rank then forms only its own rows of W W^T and of the gradient), and on logging steps
    one all-reduce of those matrices' partial values; none under DDP.
    Cost: `every: N` (default 4, see the module docstring) applies it on every N-th step
    with the gradient times N (the same mean force, as with gradient accumulation); the
    value is computed on logging steps only (every due step when N > 1); the embedding tables and output head are
    left out unless `include_io`; the Gram and the gradient (closed form 4 W (G - I), no
    autograd) are formed in the parameter's dtype (`precision: param`; the squared error
    is summed in float64) - `precision: fp64` forms them in float64, for metrics exact to
    round-off (the tests' 1e-10 checks); fp32 products agree to ~1e-6 relative."""

    name = "orthogonality"

    class Params(MatrixParams, EveryParams):
        coef: float = Field(1e-4, ge=0, description="penalty coefficient (lambda)")
        every: int = every_field(4, "one application costs ~0.3 of a llama-small fsdp2 x2 step (two products "
                                    "per matrix the size of its forward at 256 tokens per rank)")
        milestones: dict[int, float] = Field({}, description="{step: factor} piecewise-constant coefficient schedule")
        side: Literal["auto", "rows", "cols"] = "auto"
        squared: bool = True
        route: Literal["auto", "gram", "gather"] = "auto"
        precision: Literal["param", "fp64"] = "param"

    params: "Orthogonality.Params"

    def coef(self, step: int) -> float:
        return self.params.coef * schedule_factor(self.params.milestones, step)

    def after_backward(self, ctx: HookContext) -> None:
        if not self.due(ctx):
            return
        p = self.params
        coef = self.coef(ctx.step)
        shards = self.shards(ctx)
        # the value only on logging steps (or with every > 1, where the next logging step may
        # not be a due step); it is free on the gram / local routes, one small all-reduce else
        need_value = ctx.metrics_due or p.every > 1
        values, grads = orthogonality_terms(ctx, self.matrix_plan, shards, p.side, p.squared,
                                            F64 if p.precision == "fp64" else None, need_value)
        if coef:
            for shard, grad in zip(shards, grads):
                add_to_grad(shard, (coef * p.every) * grad)
        if values is not None and need_value:
            total = values.sum()
            self.values = {"penalty": coef * total, "error": total,  # device tensors: read in metrics()
                           "error_mean": total / len(shards), "coef": coef}


# --------------------------------------------------------------------------- nuclear norm / TRP


def _low_rank(ctx: HookContext, shard: ParamShard, route: str, energy: float, owner: int,
              kind: str = "NC") -> tuple[torch.Tensor, torch.Tensor, int]:
    """(this rank's slice of the projection U_k S_k V_k^T, of the subgradient U_k V_k^T,
    k) for one weight, float64. Route gather: the owner rank does the SVD and broadcasts."""
    if route == "gram":
        res = low_rank_project_gram(local_rows(shard), ctx.comm, energy)
        return res.projection.reshape(-1), res.subgradient.reshape(-1), int(res.rank)
    full = gather_full(ctx, shard) if route == "gather" else local_rows(shard)
    shape = tuple(shard.full_shape)
    conv = kind != "NC"
    if route == "local" or not active(ctx.comm):
        res = low_rank_project(trp_matrix(full.view(shape), kind) if conv else full, energy)
        proj, sub, k = res.projection, res.subgradient, int(res.rank.sum())
    else:
        n = full.numel()
        packed = torch.empty(2 * n + 1, dtype=F64)
        if ctx.rank == owner:
            res = low_rank_project(trp_matrix(full.view(shape), kind) if conv else full, energy)
            proj = trp_unmatrix(res.projection, kind, shape) if conv else res.projection
            sub = trp_unmatrix(res.subgradient, kind, shape) if conv else res.subgradient
            packed[:n], packed[n:2 * n], packed[-1] = proj.reshape(-1), sub.reshape(-1), float(res.rank.sum())
        ctx.comm.broadcast(packed, src=owner)
        return local_slice(shard, packed[:n]), local_slice(shard, packed[n:2 * n]), int(packed[-1])
    if conv:
        proj, sub = trp_unmatrix(proj, kind, shape), trp_unmatrix(sub, kind, shape)
    return local_slice(shard, proj), local_slice(shard, sub), k


def _num_matrices(shard: ParamShard, kind: str) -> int:
    """Matrices one weight contributes (ND: one per output filter)."""
    return shard.full_shape[0] if kind == "ND" else 1


def _max_rank(shard: ParamShard, kind: str) -> int:
    if kind == "NC" or len(shard.full_shape) != 4:
        return min(matrix_shape(shard))
    n, c, kh, kw = shard.full_shape
    return n * min(c, kh * kw) if kind == "ND" else min(c * kh, n * kw)


@register
class NuclearNorm(_MatrixPenalty):
    """coef * sum_layers ||W||_* (trace norm), gradient = coef * U V^T over the numerically
    nonzero singular values (`distreg.regularizers.nuclear_subgradient`), from the
    eigendecomposition of the smaller Gram (float64 by default, `precision`). The value is
    sum sigma_i (from the owner's eigenvalues: no collective). Metrics: `penalty`, `value`
    (sum of nuclear norms), `rank_mean` (numerical rank), `coef`.
    Communication per application: one all-reduce of all row-sharded matrices' Grams, one
    all-gather of the others' slices, one all-gather of the owners' V S^-1 V^T (each matrix
    factorised once, on its owner rank, round-robin). `every: N` (default 16, see the module
    docstring): applied on every N-th step, subgradient times N; embedding tables and
    output head left out unless `include_io`."""

    name = "nuclear_norm"

    class Params(MatrixParams, EveryParams):
        coef: float = Field(3e-4, ge=0, description="penalty coefficient (lambda)")
        every: int = every_field(16, "an exact U V^T needs one float64 eigendecomposition per matrix; one "
                                     "application costs ~1.5 llama-small fsdp2 x2 steps")
        milestones: dict[int, float] = Field({}, description="{step: factor} piecewise-constant coefficient schedule")
        route: Literal["auto", "gram", "gather"] = "auto"
        precision: Literal["fp64", "param"] = Field("fp64", description="Gram / eigh / products in float64 (exact "
                                                                       "U V^T), or the parameter dtype (drops "
                                                                       "sigma < ~1e-2 sigma_max)")

    params: "NuclearNorm.Params"

    def after_backward(self, ctx: HookContext) -> None:
        if not self.due(ctx):
            return
        coef = self.params.coef * schedule_factor(self.params.milestones, ctx.step)
        shards = self.shards(ctx)
        dtype = F64 if self.params.precision == "fp64" else shards[0].data().dtype
        res = low_rank_terms(ctx, self.matrix_plan, shards, 1.0, want_proj=False, want_sub=True, dtype=dtype)
        if coef:
            for shard, sub in zip(shards, res.subgradient):
                add_to_grad(shard, (coef * self.params.every) * sub)
        value = res.sigma_sum.sum()  # sum of the singular values, on the owner ranks: no collective
        self.values = {"penalty": coef * value, "value": value, "rank_mean": res.rank.mean(), "coef": coef}


@register
class TrainedRankPruning(_MatrixPenalty):
    """TRP (spec sparsity-reweighting-ot.md section 6). At steps s with s % period == 0,
    before the forward: every participating weight W (as the `kind` matrix; NC for linear
    layers) is replaced by its energy-threshold truncated SVD U_k S_k V_k^T (k = smallest
    rank keeping `energy` of sum sigma^2, reference 0.9), if `projection`; and in that
    step's after_backward, `nuclear_weight` * U_k V_k^T (from the same SVD) is added to the
    reduced gradient (reference: optional, README value 3e-4). The subgradient slices
    are kept from the projection to the after_backward (and checkpointed in between).
    Kinds VH / ND (conv) always take the gather route. Metrics: `rank_mean`, `rank_ratio`
    (sum k / sum max rank), `truncated_nuclear` (sum_i<=k sigma_i), `penalty`
    (nuclear_weight * truncated_nuclear), `projected_at` (last projection step).
    Communication per projection (NC): as `nuclear_norm`, the owners sending V_k V_k^T and
    V_k S_k^-1 V_k^T; in the parameter dtype by default (`precision`). `period` is this
    hook's `every` (default 8, see the module docstring; the reference's train_TPR.sh uses
    `-dp 5`, its argparse default is 1): the projection is a weight edit and, as in the reference, the nuclear term is
    added on projection steps only, unscaled. Embedding tables and output head left out
    unless `include_io`."""

    name = "trained_rank_pruning"

    class Params(MatrixParams):
        period: int = Field(8, gt=0, description="steps between projections (m); default 8: a projection costs "
                                                  "~0.8 of a llama-small fsdp2 x2 step (the reference: argparse "
                                                  "default 1, train_TPR.sh -dp 5)")
        energy: float = Field(0.9, gt=0, le=1, description="energy threshold e on sum sigma^2")
        projection: bool = True
        nuclear_weight: float | None = Field(None, ge=0, description="lambda of the nuclear term (None: off)")
        kind: Literal["NC", "VH", "ND"] = "NC"
        route: Literal["auto", "gram", "gather"] = "auto"
        precision: Literal["param", "fp64"] = Field("param", description="Gram / eigh / products in the parameter "
                                                                       "dtype, or float64 (NC kind)")

    params: "TrainedRankPruning.Params"

    def __init__(self, params):
        super().__init__(params)
        self.pending: dict[str, torch.Tensor] | None = None  # local subgradient slices for step `pending_step`
        self.pending_step: int | None = None

    def plan(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        self.routes = plan_routes(ctx, shards, self.params.route)
        if self.params.kind != "NC":
            self.routes = ["local" if r == "local" else "gather" for r in self.routes]
        else:
            self.matrix_plan = make_plan(ctx, shards, self.routes)
        if ctx.step % self.params.period == 0 and self.pending_step != ctx.step:
            self.project(ctx, shards)

    @torch.no_grad()
    def project(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        p = self.params
        if p.kind != "NC":  # conv layouts: one weight at a time
            return self._project_conv(ctx, shards)
        dtype = F64 if p.precision == "fp64" else shards[0].data().dtype
        res = low_rank_terms(ctx, self.matrix_plan, shards, p.energy, want_proj=p.projection,
                             want_sub=bool(p.nuclear_weight), dtype=dtype)
        pending = {}
        for shard, proj, sub in zip(shards, res.projection, res.subgradient):
            if p.projection:
                shard.write(proj.to(shard.data().dtype))
            if p.nuclear_weight:
                pending[shard.name] = sub.to(torch.float32)
        ks, trunc = res.rank.sum(), res.sigma_sum.sum()  # device tensors, read in metrics()
        self.pending, self.pending_step = (pending or None), ctx.step
        self.values = {"rank_mean": ks / len(shards), "rank_ratio": ks / sum(min(m) for m in self.matrix_plan.shapes),
                       "truncated_nuclear": trunc, "penalty": (p.nuclear_weight or 0.0) * trunc,
                       "projected_at": float(ctx.step)}

    def _project_conv(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        p = self.params
        dots, ks, max_k = torch.zeros((), dtype=F64, device=shards[0].data().device if shards else None), 0, 0
        pending = {}
        for i, (shard, route) in enumerate(zip(shards, self.routes)):
            proj, sub, k = _low_rank(ctx, shard, route, p.energy, i % ctx.world_size, p.kind)
            if p.projection:
                shard.write(proj.to(shard.data().dtype))
            if p.nuclear_weight:
                pending[shard.name] = sub.to(torch.float32)
            dots += torch.dot(proj, sub)
            ks, max_k = ks + k, max_k + _max_rank(shard, p.kind)
        n_mat = sum(_num_matrices(s, p.kind) for s in shards)
        trunc = float(ctx.sum_over_shards(dots.reshape(1)))
        self.pending, self.pending_step = (pending or None), ctx.step
        self.values = {"rank_mean": ks / n_mat, "rank_ratio": ks / max_k, "truncated_nuclear": trunc,
                       "penalty": (p.nuclear_weight or 0.0) * trunc, "projected_at": float(ctx.step)}

    def after_backward(self, ctx: HookContext) -> None:
        if self.pending is not None and self.pending_step == ctx.step:
            for shard in self.shards(ctx):
                add_to_grad(shard, self.params.nuclear_weight * self.pending[shard.name])
        self.pending = None

    def after_step(self, ctx: HookContext) -> None:
        if ctx.step % self.params.period == 0:
            self.project(ctx, self.shards(ctx))

    def state_dict(self) -> dict:
        return {"values": dict(self.values), "pending_step": self.pending_step,
                "pending": None if self.pending is None else {k: v.clone() for k, v in self.pending.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pending_step = state.get("pending_step")
        self.pending = state.get("pending")


# --------------------------------------------------------------------------- WDR


@register
class Wdr(_ParamPenalty):
    """EQ-Net WDR-Loss (spec 14): coef * (kurt_rate * mean (Kurt - 1.8)^2 + skew_rate *
    mean Skew^2) over the participating layer weights in module order, the first one
    dropped (`skip_first`, reference). Exact whole-tensor moments from local shards of any
    split (two all-reduces for all layers together; `distreg.regularizers.standardized_moments`).
    The reference back-propagates it with the loss at every step; here its gradient is
    added to the reduced gradient (same sum, before clipping). Metrics: `penalty`,
    `kurtosis_mean`, `skewness_abs_mean`."""

    name = "wdr"

    class Params(SelectParams):
        kurt_rate: float = Field(0.015, ge=0)
        skew_rate: float = Field(1.0, ge=0)
        skip_first: bool = True
        coef: float = Field(1.0, ge=0, description="overall multiplier")

    params: "Wdr.Params"

    def on_train_start(self, ctx: HookContext) -> None:
        super().on_train_start(ctx)
        if len(self.names) < 1 + int(self.params.skip_first):
            raise ValueError(f"wdr: needs at least {1 + int(self.params.skip_first)} layer weights, got {self.names}")

    def after_backward(self, ctx: HookContext) -> None:
        p = self.params
        shards = self.shards(ctx)[int(p.skip_first):]
        leaves = [s.data().detach().to(F64).requires_grad_() for s in shards]
        ks = standardized_moments(leaves, ctx.comm if ctx.sharded else None)
        value = p.coef * (p.kurt_rate * ((ks[:, 0] - 1.8) ** 2).mean() + p.skew_rate * (ks[:, 1] ** 2).mean())
        grads = torch.autograd.grad(value, leaves)
        for s, g in zip(shards, grads):
            add_to_grad(s, g)
        ks = ks.detach()  # device tensors, read back in metrics() on logging steps
        self.values = {"penalty": value.detach(), "kurtosis_mean": ks[:, 0].mean(),
                       "skewness_abs_mean": ks[:, 1].abs().mean()}


# --------------------------------------------------------------------------- MBA


@register
class MbaL2(_ParamPenalty):
    """DIN mini-batch-aware L2 (spec 10) on an embedding table (default the Llama's
    `tok_embeddings.weight`; ids = the batch's input tokens): the gradient
    lam * alpha_j / n_j * w_j is added for every row j whose id occurs in any sample of the
    step's global batch (all micro-batches, all ranks), where n_j counts the samples
    containing j seen so far in training, this step included (so n_j >= 1 for present
    rows). The paper's n_j is over the whole training set [PAPER]; running counts are our
    choice (`counts_file`: a saved [num_rows] tensor of fixed counts instead, added to by
    nothing). lam has no published default (spec open item 7): required.
    Communication per step: one all-reduce of a [num_rows] int64 count vector (any
    strategy with >1 rank: the ids are data) + one scalar all-reduce (sharded tables).
    Metrics: `penalty` ((lam / 2) sum_j alpha_j / n_j ||w_j||^2), `rows_present` (fraction
    of rows in the batch), `lam`. State: the running counts."""

    name = "mba_l2"
    path_params = ("counts_file",)
    candidates_all = True

    class Params(SelectParams):
        lam: float = Field(ge=0, description="lambda (no published default)")
        include: list[str] = ["tok_embeddings.weight"]
        pad_id: int | None = Field(None, description="id that is never counted")
        counts_file: str | None = Field(None, description="torch.save'd [num_rows] counts n_j (fixed)")

    params: "MbaL2.Params"

    def __init__(self, params):
        super().__init__(params)
        self.counts: torch.Tensor | None = None
        self.fixed = params.counts_file is not None
        self._step_counts: torch.Tensor | None = None

    def on_train_start(self, ctx: HookContext) -> None:
        super().on_train_start(ctx)
        if len(self.names) != 1 or len(self.shards(ctx)[0].full_shape) != 2:
            raise ValueError(f"mba_l2: include must select exactly one 2-D embedding table, got {self.names}")
        rows = self.shards(ctx)[0].full_shape[0]
        if self.counts is None:
            if self.fixed:
                self.counts = torch.as_tensor(torch.load(self.params.counts_file), dtype=torch.int64).reshape(-1)
            else:
                self.counts = torch.zeros(rows, dtype=torch.int64)
        if self.counts.numel() != rows:
            raise ValueError(f"mba_l2: {self.counts.numel()} counts for a table of {rows} rows")
        self.counts = self.counts.to(self.shards(ctx)[0].data().device)  # counted where the table lives

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        ids = batch["input"].detach()  # counted on the device: no host copy per micro-batch
        ids = ids.reshape(ids.shape[0], math.prod(ids.shape[1:]))
        pad = -1 if self.params.pad_id is None else self.params.pad_id
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
        valid = ids != pad
        pairs = torch.unique(torch.stack([rows[valid], ids[valid]]), dim=1)  # (sample, id) once per sample
        local = torch.bincount(pairs[1], minlength=self.counts.numel())
        self._step_counts = local if self._step_counts is None else self._step_counts + local
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        step = self._step_counts if self._step_counts is not None else torch.zeros_like(self.counts)
        step = ctx.comm.all_reduce(step.clone())  # the global batch (data are split over ranks)
        self._step_counts = None
        present = step > 0
        if not self.fixed:
            self.counts += step
        # Bad counts_file rows are flagged on the device and raised on the next logging step
        # (a per-step check would be a host read every step); until then they count as 1.
        bad = (present & (self.counts <= 0)).any()
        self._bad = bad if getattr(self, "_bad", None) is None else self._bad | bad
        if ctx.metrics_on() and bool(self._bad):
            raise ValueError("mba_l2: a present id has count 0 in counts_file")
        shard = self.shards(ctx)[0]
        dim = shard.full_shape[1]
        row = torch.arange(shard.flat_start, shard.flat_start + shard.numel, device=self.counts.device) // dim
        coef = torch.where(present, 1.0 / self.counts.clamp(min=1).to(F64), torch.zeros((), dtype=F64))[row].to(shard.data().device)
        w = shard.data().detach().to(F64)
        lam = self.params.lam
        add_to_grad(shard, lam * coef * w)
        if ctx.metrics_on():  # the value is a metric only: its all-reduce and read on logging steps
            value = ctx.sum_over_shards((0.5 * lam * coef * w * w).sum().reshape(1))
            self.values = {"penalty": float(value), "rows_present": float(present.double().mean()), "lam": lam}

    def state_dict(self) -> dict:
        return {"values": dict(self.values), "counts": None if self.counts is None else self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("counts") is not None:
            self.counts = state["counts"].clone()
