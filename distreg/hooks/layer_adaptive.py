"""`layer_adaptive`: one-shot layer-wise sparsity allocation for a global target from
per-layer output-distortion curves, solved by dynamic programming (Xu et al., ICCV 2023,
"Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks";
reference code github.com/Akimoto-Cris/RD_PRUNE, see `distreg.sparsity.layer_adaptive`
for what was taken from it and what distreg decided).

Event (once, in `after_step` when `ctx.step == prune_step`, i.e. after that many optimizer
steps; masks then stay fixed and are re-applied after every step like the other
`MaskHook`s):
1. Calibration data: the micro-batches this rank trained on in the last `calib_steps`
   steps (kept in `loss`; their union over ranks is those steps' global batches, so the
   calibration set does not depend on the world size). No batch exists before the first
   step, hence `prune_step >= 1`.
2. Dense outputs: one forward per calibration micro-batch (eval mode, no_grad).
3. Curves: for each participating layer l and each level s_j of the grid with
   k = round(s_j n_l) > 0, the k smallest |w| of layer l alone are zeroed (exact selection
   over shards, one batched `select_bottom_k_fn` call per layer for all its levels, spec
   S1), a forward per micro-batch measures the output distortion against the dense output,
   and the layer is restored bit for bit from a saved copy. Cost: L x (levels with k > 0)
   forwards per calibration micro-batch (levels with the same k as the previous one reuse
   its value). Distortion (reference `gen_rd_curves`): `mse` = mean squared logit
   difference over all valid positions and output channels of all ranks' samples;
   `worst_case` = the largest per-sample mean. Each rank forwards its own samples; the
   whole [L, S] table is reduced by ONE all-reduce (sum, with the value count; max for
   worst_case), so every rank holds the same table and solves the same DP.
4. Allocation: `distreg.sparsity.layer_adaptive.allocate` on the table (its running max
   along the levels when `monotone`), target `round(sparsity x N)` of the N participating
   weights, at least that many pruned (budget rule and granularity `budget_bins` in the
   core's docstring). Then each layer's exact per-layer magnitude mask at its level
   (`select_bottom_k_per_layer`, the same selection the curve measured).
5. Masks applied; one more forward per micro-batch measures the joint distortion of the
   pruned model (the paper's additivity claim, logged beside the additive estimate).

Writes during calibration go through `ParamShard.write` on every rank for the same
parameter (ZeRO-3 frees gathered persistent copies there); forwards run on `ctx.model`
outside the train step, and FSDP2's root is resharded after each (`release_gathered`, as
the Hessian-trace monitor does). Every rank runs the same number of forwards. Memory during
the event: the dense outputs of this rank's calibration micro-batches (for a language model
B x T x vocab logits each) and the per-level keep-masks of one layer's shard.

Metrics (prefix `sparsity` unless `metrics_prefix`): `<prefix>/global`, `<prefix>/<name>`,
`<prefix>/target` (from `MaskHook`), `<prefix>/estimated_distortion` (Σ_l δ_l(s_l) of the
measured curves), `<prefix>/joint_distortion` (measured with all masks applied). Rank 0
writes the per-layer bar chart and a curves plot
(`<run_dir>/sparsity/<prefix>_layer_adaptive_curves_step<NNNNNNNN>.png`) and uploads both.

State (per rank): the local mask slices (`MaskHook`), the level grid, the measured table,
the allocation and the logged distortions; before the event, the kept calibration
micro-batches. Resuming after the event restores masks and allocation without any
forward; resume needs the same world size and strategy.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from distreg.hooks.base import HookContext, LossTerms, ParamShard
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import release_gathered
from distreg.hooks.sparsity import MaskHook, SparsityParams
from distreg.runtime.loss import IGNORE_INDEX
from distreg.sparsity import ShardScores, select_bottom_k_fn, select_bottom_k_per_layer
from distreg.sparsity.layer_adaptive import (
    F64,
    allocate,
    check_levels,
    distortion_from_sums,
    level_counts,
    level_grid,
    local_distortion,
    monotone_envelope,
    sample_sq_errors,
)


@contextmanager
def evaluating(model):
    """Eval mode (BatchNorm statistics untouched, no activation checkpointing) and no
    autograd for the calibration forwards; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def valid_of(batch: dict) -> torch.Tensor:
    """Output positions that count: those whose target is not ignored."""
    return batch["target"] != IGNORE_INDEX


@register
class LayerAdaptivePruning(MaskHook):
    name = "layer_adaptive"

    class Params(SparsityParams):
        sparsity: float = Field(ge=0, le=1, description="global target: fraction of the participating weights pruned")
        prune_step: int = Field(1, ge=1, description="optimizer steps completed when the masks are computed")
        calib_steps: int = Field(1, ge=1, description="calibration set: the global batches of this many steps "
                                                      "up to prune_step")
        num_levels: int = Field(20, ge=2, le=1000, description="levels 0 .. max_level, evenly spaced")
        max_level: float = Field(0.95, gt=0, le=1, description="largest per-layer sparsity tried")
        levels: list[float] | None = Field(None, description="explicit level grid (instead of num_levels / max_level)")
        distortion: Literal["mse", "worst_case"] = "mse"
        monotone: bool = Field(True, description="allocate on the running max of each curve along the levels")
        budget_bins: int = Field(100_000, ge=1, description="DP resolution: budget unit = ceil(N / budget_bins) "
                                                            "weights")

        @model_validator(mode="after")
        def _check(self):
            if self.calib_steps > self.prune_step:
                raise ValueError(f"calib_steps ({self.calib_steps}) must not exceed prune_step ({self.prune_step}): "
                                 "only steps up to prune_step have batches")
            if self.levels is not None:
                if {"num_levels", "max_level"} & self.model_fields_set:
                    raise ValueError("levels: set either levels or num_levels / max_level, not both")
                self.levels = check_levels(self.levels)
            top = self.grid()[-1]
            if self.sparsity > top:
                raise ValueError(f"sparsity ({self.sparsity}) exceeds the largest level ({top}): "
                                 "no allocation reaches it (raise max_level)")
            return self

        def grid(self) -> list[float]:
            return list(self.levels) if self.levels is not None else level_grid(self.num_levels, self.max_level)

    params: "LayerAdaptivePruning.Params"

    def __init__(self, params: "LayerAdaptivePruning.Params"):
        super().__init__(params)
        self.levels = params.grid()
        self.batches: dict[int, list[dict[str, torch.Tensor]]] = {}  # step -> this rank's micro-batches
        self.table: list[list[float]] | None = None  # measured distortion [layer][level]
        self.allocation: dict[str, float] = {}  # name -> allocated level
        self.values: dict[str, float] = {}  # estimated / joint distortion, ...

    # -- calibration data ------------------------------------------------------------------
    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        p = self.params
        if self.masks is None and p.prune_step - p.calib_steps <= ctx.step < p.prune_step:
            kept = self.batches.setdefault(ctx.step, [])
            if len(kept) < ctx.grad_accum_steps:
                kept.append({"input": batch["input"].detach().clone(), "target": batch["target"].detach().clone()})
        return terms

    # -- events ------------------------------------------------------------------------------
    def target(self, ctx: HookContext) -> float:
        return self.params.sparsity if self.masks is not None else 0.0

    def start(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        if self.masks is None and ctx.step >= self.params.prune_step:
            raise ValueError(f"{self.name}: prune_step ({self.params.prune_step}) has passed (step {ctx.step}) "
                             "and no masks were restored: resume from a checkpoint taken after the pruning event")
        self.apply_masks(shards)

    def step(self, ctx: HookContext, shards: list[ParamShard]) -> bool:
        if self.masks is not None or ctx.step != self.params.prune_step:
            return False
        batches = [b for s in sorted(self.batches) for b in self.batches[s]]
        if not batches:
            raise RuntimeError(f"{self.name}: no calibration batch was kept before step {ctx.step}")
        with evaluating(ctx.model):
            refs = [self._forward(ctx, b) for b in batches]
            values = float(sum(valid_of(b).sum() * r.shape[-1] for b, r in zip(batches, refs)))
            table = self.measure(ctx, shards, batches, refs, values)
            totals = [s.full_shape.numel() for s in shards]
            n_all = sum(totals)
            target_count = round(self.params.sparsity * n_all)
            unit = max(1, -(-n_all // self.params.budget_bins))
            try:
                alloc = allocate(monotone_envelope(table) if self.params.monotone else table, totals, self.levels,
                                 target_count, unit=unit)
            except ValueError as e:
                raise ValueError(f"{self.name}: sparsity {self.params.sparsity}: {e}") from None
            scores = [ShardScores(s.data(), s.flat_start, s.name) for s in shards]
            keep = select_bottom_k_per_layer(scores, alloc.pruned, ctx.comm, by_abs=True,
                                             replicated=self.replicated(ctx)).keep
            self.set_masks(ctx, shards, keep)
            self.apply_masks(shards)
            joint = self._reduce(ctx, self._local(ctx, batches, refs).reshape(1), values)
        self.table = table.tolist()
        self.allocation = {s.name: self.levels[j] for s, j in zip(shards, alloc.level_index)}
        self.values = {
            "estimated_distortion": float(sum(table[l, j] for l, j in enumerate(alloc.level_index))),
            "joint_distortion": float(joint[0]), "allocated_distortion": alloc.distortion,
            "target_count": float(target_count), "pruned_count": float(alloc.total_pruned), "budget_unit": float(unit),
        }
        self.update_stats(ctx, shards)  # the masks are on the weights already
        self.plot(ctx, f"step {ctx.step}")
        self.plot_curves(ctx, shards, alloc.level_index)
        self.batches = {}
        return True

    # -- distortion curves -------------------------------------------------------------------
    def _forward(self, ctx: HookContext, batch: dict) -> torch.Tensor:
        out = ctx.model(batch["input"])
        release_gathered(ctx.model)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{self.name}: the model output is {type(out).__name__}, not a tensor of logits")
        return out

    def _local(self, ctx: HookContext, batches: list[dict], refs: list[torch.Tensor]) -> torch.Tensor:
        """This rank's share of the current model's distortion over its micro-batches
        (one forward each)."""
        parts = []
        for b, ref in zip(batches, refs):
            sq, n = sample_sq_errors(self._forward(ctx, b), ref, valid_of(b))
            parts.append(local_distortion(sq, n, self.params.distortion).cpu())
        stacked = torch.stack(parts)
        return stacked.sum() if self.params.distortion == "mse" else stacked.max()

    def _reduce(self, ctx: HookContext, local: torch.Tensor, values: float) -> torch.Tensor:
        """Rank-global distortion(s) from local shares: one all-reduce."""
        if self.params.distortion == "worst_case":
            return ctx.comm.all_reduce(local, op="max")
        both = ctx.comm.all_reduce(torch.cat([local.reshape(-1), torch.tensor([values], dtype=F64)]))
        return distortion_from_sums(both[:-1], float(both[-1]), "mse").reshape(local.shape)

    @torch.no_grad()
    def measure(self, ctx: HookContext, shards: list[ParamShard], batches: list[dict], refs: list[torch.Tensor],
                values: float) -> torch.Tensor:
        """The [layers, levels] distortion table against the dense outputs `refs`
        (identical on every rank; `values`: this rank's count of output values). Collective."""
        counts = level_counts([s.full_shape.numel() for s in shards], self.levels)
        local = torch.zeros(len(shards), len(self.levels), dtype=F64)
        for li, s in enumerate(shards):
            todo = [j for j, k in enumerate(counts[li]) if k > 0]  # k = 0: the dense model, distortion 0
            if not todo:
                continue
            ks = [counts[li][j] for j in todo]
            score = ShardScores(s.data(), s.flat_start, s.name)
            keeps = select_bottom_k_fn([score] * len(todo), list(range(len(todo))), lambda e, t, ks=ks: ks,
                                       ctx.comm, by_abs=True, replicated=self.replicated(ctx)).keep
            saved = s.data().detach().clone()
            zero = torch.zeros((), dtype=saved.dtype, device=saved.device)
            try:
                for pos, (j, keep) in enumerate(zip(todo, keeps)):
                    if pos and ks[pos] == ks[pos - 1]:  # same count, same mask
                        local[li, j] = local[li, todo[pos - 1]]
                        continue
                    s.write(torch.where(keep, saved, zero))
                    local[li, j] = self._local(ctx, batches, refs)
            finally:
                s.write(saved)
        return self._reduce(ctx, local, values)

    # -- reporting -----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        pre = self.params.metrics_prefix
        out = dict(self.stats)
        for key in ("estimated_distortion", "joint_distortion"):
            if key in self.values:
                out[f"{pre}/{key}"] = self.values[key]
        return out

    def plot_curves(self, ctx: HookContext, shards: list[ParamShard], picked: list[int]) -> str | None:
        """Rank 0: each layer's distortion curve with its allocated level marked."""
        if ctx.rank != 0 or not self.params.plot or self.table is None:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        positive = [v for row in self.table for v in row if v > 0]
        for s, row, j in zip(shards, self.table, picked):
            line, = ax.plot(self.levels, row, lw=1, label=s.name if len(shards) <= 16 else None)
            ax.plot([self.levels[j]], [row[j]], "o", color=line.get_color(), ms=5)
        ax.set_yscale("symlog", linthresh=min(positive) if positive else 1e-12)
        ax.set_xlabel("layer sparsity (only this layer pruned)")
        ax.set_ylabel(f"output distortion ({self.params.distortion})")
        ax.set_title(f"{self.name}: curves at step {ctx.step}, dots = allocation "
                     f"(estimated {self.values['estimated_distortion']:.3g}, "
                     f"joint {self.values['joint_distortion']:.3g})", fontsize=9)
        if len(shards) <= 16:
            ax.legend(fontsize=6, loc="upper left")
        fig.tight_layout()
        pre = re.sub(r"[^A-Za-z0-9_.-]", "_", self.params.metrics_prefix)
        path = Path(ctx.run_dir) / "sparsity" / f"{pre}_{self.name}_curves_step{ctx.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        ctx.log_artifact(str(path), "sparsity")
        return str(path)

    # -- checkpoint state ------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"levels": list(self.levels), "table": self.table, "allocation": dict(self.allocation),
                "values": dict(self.values),
                "batches": {s: [{k: v.clone() for k, v in b.items()} for b in bs] for s, bs in self.batches.items()}}

    def load_extra_state(self, state: dict) -> None:
        self.levels = list(state.get("levels", self.levels))
        self.table = state.get("table")
        self.allocation = dict(state.get("allocation", {}))
        self.values = dict(state.get("values", {}))
        self.batches = {int(s): [dict(b) for b in bs] for s, bs in state.get("batches", {}).items()}
