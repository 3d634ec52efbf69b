"""`dsnot` hook: Wanda + DSnoT masks computed inside a training run, then held fixed.

Spec section 5 (Zhang et al., ICLR 2024; the offline command is `distreg prune dsnot`).

Calibration: from step `at_step` on, forward pre-hooks on the participating nn.Linear
modules accumulate their input statistics (`CalibrationStats`: fp64 sums of x^2, x and
within-sequence variances, per sequence) over the next `calib_steps` optimizer steps'
training forwards (every micro-batch; forwards without grad and activation-checkpointing
recomputations in backward are not counted). The hooks read the inputs only: gradients
and the training step are unchanged. Note the difference to the command: these statistics
come from the *dense* model's forward during training (every layer sees dense inputs),
not from the reference's sequential propagation through already-pruned blocks, and the
weights move a little over the calibration steps.

After the last calibration step (`after_step` at step `at_step + calib_steps`): the sums
are all-reduced (one fp64 all-reduce for all layers), and every rank computes the Wanda
(or magnitude) initial mask and the DSnoT refinement (`distreg.sparsity.dsnot.prune_rows`)
for rows it holds, since rows are independent:
- DDP / ZeRO-1/2: the whole matrix (every rank the same; no communication);
- FSDP2 (`Shard(0)`), or a ZeRO-3 partition that falls on row boundaries on every rank:
  its block of whole rows directly, nothing gathered;
- a ZeRO-3 partition that cuts rows: that one matrix is all-gathered (one layer at a
  time, `gather_full`), the rank computes the rows overlapping its partition and keeps
  its slice (`local_slice`).
From then on the masks are fixed and re-applied after every optimizer step (`MaskHook`).

`mask_file` mode: no calibration; the keep-masks `distreg prune dsnot` wrote (`masks.pt`,
{name: bool full mask}) are sliced to each rank's shard at train start and held fixed, so
a run continues training the pruned model with its masks.

Participants: the `weight` of nn.Linear modules whose names match `include` (default
`layers.*`: the decoder blocks, not the output head, as the reference) and not `exclude`.
With `skip_layer: mlp` (the reference default) the feed-forward projections keep their
initial mask; only attention projections get DSnoT.

Metrics: `<prefix>/global`, `<prefix>/<param>` (fraction of zero weights, from MaskHook),
`<prefix>/target`, and from the mask computation `<prefix>/error_before` /
`<prefix>/error_after` (mean |e| over all participating rows, e = expected
dense-minus-sparse output of a row), `<prefix>/cycles` (max over layers) and
`<prefix>/swaps`. State: the mask slices (MaskHook), the per-rank partial statistics
while calibrating, the calibration start step and the metrics.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from distreg.hooks.base import HookContext, ParamShard
from distreg.hooks.regularizers._common import gather_full, matrix_shape, plan_routes
from distreg.hooks.registry import register
from distreg.hooks.sparsity import MaskHook, SparsityParams, select_participants
from distreg.sparsity.dsnot import CalibrationStats, all_reduce_stats, parse_nm, prune_rows, skipped

F64 = torch.float64


def _in_backward() -> bool:
    """True inside autograd's backward (activation-checkpointing recomputation)."""
    return torch._C._current_graph_task_id() != -1


@register
class DSnoTHook(MaskHook):
    """Wanda + DSnoT masks from calibration statistics of training forwards (or from a
    `mask_file`), held fixed afterwards. See the module docstring."""

    name = "dsnot"
    path_params = ("mask_file",)

    class Params(SparsityParams):
        include: list[str] = Field(["layers.*"], description="fnmatch patterns of nn.Linear weights that take part")
        metrics_prefix: str = "dsnot"
        sparsity: float | None = Field(None, ge=0, lt=1, description="fraction pruned per row (N/M with nm)")
        nm: str | None = Field(None, description="'N:M' semi-structured sparsity")
        at_step: int = Field(0, ge=0, description="optimizer steps completed when calibration starts")
        calib_steps: int = Field(1, gt=0, description="optimizer steps whose training forwards are accumulated")
        max_cycles: int = Field(50, ge=0)
        threshold: float = Field(0.1, ge=0, description="update threshold tau on |e|")
        pow_of_var: float = Field(1.0, ge=0, description="gamma in the growth key c / v^gamma")
        skip_layer: Literal["mlp", "self_attn", "no_skip"] = "mlp"
        initial: Literal["wanda", "magnitude"] = "wanda"
        same_sign: bool = False
        fidelity_cursor_quirk: bool = False
        mask_file: str | None = Field(None, description="masks.pt of `distreg prune dsnot`: hold those masks fixed")

        @model_validator(mode="after")
        def _target(self):
            if self.nm is not None:
                n, m = parse_nm(self.nm)
                if self.sparsity is not None and abs(self.sparsity - n / m) > 1e-12:
                    raise ValueError(f"nm={self.nm} prunes {n}/{m} of every row; sparsity must be {n / m:g} or unset")
                self.sparsity = n / m
            elif self.sparsity is None and self.mask_file is None:
                raise ValueError("set sparsity (or nm, or mask_file)")
            return self

    params: "DSnoTHook.Params"

    def __init__(self, params: "DSnoTHook.Params"):
        super().__init__(params)
        self.calib_start: int | None = None
        self.calib: dict[str, CalibrationStats] = {}
        self.values: dict[str, float] = {}
        self._handles: list = []
        self._ctx: HookContext | None = None

    # -- participants ----------------------------------------------------------------------
    @staticmethod
    def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
        return {f"{n}.weight" if n else "weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def shards(self, ctx: HookContext) -> list[ParamShard]:
        if self.names is None:
            linear = self.linear_modules(ctx.model)
            names = [n for n in select_participants(ctx, self.params) if n in linear]
            if not names:
                raise ValueError(f"{self.name}: no nn.Linear weight matches include={self.params.include} "
                                 f"exclude={self.params.exclude}")
            self.names = names
        return super().shards(ctx)

    def target(self, ctx: HookContext) -> float | None:
        return self.params.sparsity

    # -- calibration -----------------------------------------------------------------------
    def _collecting(self) -> bool:
        ctx, start = self._ctx, self.calib_start
        return (self.masks is None and ctx is not None and start is not None
                and start <= ctx.step < start + self.params.calib_steps)

    def _pre_hook(self, name: str):
        def hook(_module, args):
            if self._collecting() and torch.is_grad_enabled() and not _in_backward():
                self.calib[name].add(args[0])
        return hook

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def start(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        self._ctx = ctx
        if self.masks is None and self.params.mask_file is not None:
            self.set_masks(ctx, shards, self.read_mask_file(shards))
            self.event(ctx, shards, f"masks from {self.params.mask_file}")
            return
        if self.masks is None:
            if self.calib_start is None:
                # a run (or resume) that begins past at_step calibrates from where it starts
                self.calib_start = max(self.params.at_step, ctx.step)
            modules = self.linear_modules(ctx.model)
            for s in shards:
                if s.name not in self.calib:
                    self.calib[s.name] = CalibrationStats(modules[s.name].in_features)
                self._handles.append(modules[s.name].register_forward_pre_hook(self._pre_hook(s.name)))
        self.apply_masks(shards)

    def read_mask_file(self, shards: list[ParamShard]) -> list[torch.Tensor]:
        import fsspec

        path = self.params.mask_file
        with fsspec.open(path, "rb") as f:
            kept = torch.load(f, map_location="cpu", weights_only=True)
        out = []
        for s in shards:
            full = kept.get(s.name)
            if full is None:
                raise ValueError(f"{self.name}: mask_file {path} has no mask for {s.name}; narrow include/exclude")
            if tuple(full.shape) != tuple(s.full_shape):
                raise ValueError(f"{self.name}: mask_file {path}: {s.name} has shape {tuple(full.shape)}, "
                                 f"the model {tuple(s.full_shape)}")
            local = full.reshape(-1).bool()[s.flat_start:s.flat_start + s.numel]
            out.append(local.to(s.data().device, copy=True))
        return out

    # -- the mask computation --------------------------------------------------------------
    def step(self, ctx: HookContext, shards: list[ParamShard]) -> bool:
        if self.masks is not None or self.calib_start is None:
            return False
        if ctx.step < self.calib_start + self.params.calib_steps:
            return False
        self._remove_hooks()
        self.set_masks(ctx, shards, self.compute_masks(ctx, shards))
        self.calib = {}
        self.event(ctx, shards, f"masks at step {ctx.step}")
        return True

    @torch.no_grad()
    def compute_masks(self, ctx: HookContext, shards: list[ParamShard]) -> list[torch.Tensor]:
        """This rank's keep-mask slices from the all-reduced statistics. Collective."""
        p = self.params
        stats = [self.calib[s.name] for s in shards]
        all_reduce_stats(stats, ctx.comm)  # every strategy: the ranks saw different sequences
        if any(st.sequences == 0 for st in stats):
            empty = [s.name for s, st in zip(shards, stats) if st.sequences == 0]
            raise RuntimeError(f"{self.name}: no calibration input reached {', '.join(empty[:3])} "
                               f"(steps {self.calib_start}..{self.calib_start + p.calib_steps})")
        routes = plan_routes(ctx, shards, "gram")
        keeps, sums, cycles = [], torch.zeros(4, dtype=F64), 0
        for s, route, st in zip(shards, routes, stats):
            _, d = matrix_shape(s)
            first_row = s.flat_start // d
            if route == "gather":
                full = gather_full(ctx, s)
                last_row = -(-(s.flat_start + s.numel) // d)
                rows, offset = full[first_row:last_row], s.flat_start - first_row * d
                owned = -(-s.flat_start // d) - first_row  # rows that start inside this slice count here
            else:
                rows, offset, owned = s.data().detach().reshape(-1, d), 0, 0
            res = prune_rows(rows, st, p.sparsity, nm=p.nm, initial=p.initial, dsnot=not skipped(s.name, p.skip_layer),
                             max_cycles=p.max_cycles, threshold=p.threshold, pow_of_var=p.pow_of_var,
                             same_sign=p.same_sign, fidelity_cursor_quirk=p.fidelity_cursor_quirk)
            keeps.append(res.keep.reshape(-1)[offset:offset + s.numel].clone())
            sums += torch.tensor([float(res.error_before[owned:].abs().sum()),
                                  float(res.error_after[owned:].abs().sum()),
                                  float(res.swaps[owned:].sum()), float(res.keep.shape[0] - owned)], dtype=F64)
            cycles = max(cycles, res.cycles)
        sums = ctx.sum_over_shards(sums).tolist()
        if ctx.sharded:
            cycles = int(ctx.comm.all_reduce(torch.tensor([cycles], dtype=torch.int64), op="max"))
        rows_total = max(sums[3], 1.0)
        pre = p.metrics_prefix
        self.values = {f"{pre}/error_before": sums[0] / rows_total, f"{pre}/error_after": sums[1] / rows_total,
                       f"{pre}/swaps": sums[2], f"{pre}/cycles": float(cycles)}
        return keeps

    # -- metrics and state -------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        return {**self.stats, **self.values}

    def extra_state(self) -> dict:
        return {"calib_start": self.calib_start, "values": dict(self.values),
                "calib": {k: v.state_dict() for k, v in self.calib.items()}}

    def load_extra_state(self, state: dict) -> None:
        self.calib_start = state.get("calib_start")
        self.values = dict(state.get("values", {}))
        self.calib = {k: CalibrationStats.from_state(v) for k, v in state.get("calib", {}).items()}
