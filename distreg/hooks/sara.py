"""`sara`: SaRA, progressive sparse low-rank adaptation (Hu et al. 2024; spec
sparsity-reweighting-ot.md section 7, adamw2 semantics; core in `distreg.sparsity.sara`).

Only the smallest-magnitude entries of each participating weight train; all others stay
frozen at their values from train start:

- trainable mask per tensor: `|theta| < threshold` (the reference code, tau = 2e-3) or,
  with `fraction`, exactly the `round(fraction * n)` smallest |theta| of each tensor (the
  paper's wording; exact over shards, spec S1);
- once, after optimizer step `progressive_iter` (so the update of step
  `progressive_iter + 1` uses it, as adamw2's `inner_iter == progressive_iter + 1`), the
  mask is re-selected: `M' = M & |theta| < tau` (fraction mode: `<=` the tensor's
  threshold found at train start). Optimizer state is kept (adamw2, not the UB variant);
- low-rank term: every optimizer step one matrix, uniform over the participating 2-D
  weights with `min(shape) > min_dim` (draw keyed on (seed, step), spec S6, the same on
  every rank), gets `lambda_rank * (U V^T) * M` added to its gradient, U V^T from the SVD
  of `theta * M`; skipped when the matrix has <= `min_trainable` trainable entries.

Order inside a step (S7): backward + reduction -> `after_backward`: the nuclear gradient is
added to the reduced local gradient of the chosen matrix, then every participant's
gradient is zeroed on frozen entries (`ParamShard.write_grad`) -> clipping -> optimizer
step -> `after_step`: frozen entries are written back to their saved values
(`ParamShard.write`: the optimizer's copy, i.e. the fp32 master under ZeRO-3, and the
forward copy) -> the re-selection when due. Zeroed gradients keep Adam's moments of frozen
entries at zero (the UB variant's masked state); the restore undoes what still moves them:
AdamW's decoupled weight decay and, after the re-selection, the momentum of newly frozen
entries. Differences from adamw2, which masks nothing before its step: the trainer's
clipping norm counts trainable entries only, and the nuclear term is clipped with the loss
gradient (adamw2 adds it inside `step()`, after any clipping).

Frozen values: each rank keeps a copy of its *whole* local shard of every participant
(same dtype as the optimizer's copy) and restores with one `where(M, theta, saved)`. A
copy of the frozen entries alone would save only the trainable fraction (10-20 % in the
paper) and need an index or a boolean gather per step. The checkpoint stores the frozen
entries only (`saved[~M]`); the trainable ones come back with the weights.

Participants: as the sparsity hooks (`include` / `exclude`, 1-D parameters and embedding
tables only if asked); the reference masks every parameter (`include_1d: true,
include_embeddings: true`). Parameters outside train normally.

Communication: at train start and at the re-selection one all-reduce of per-tensor
trainable counts (fraction mode: the S1 selection, nothing else); per step for the chosen
matrix an all-gather of its masked local slices (float64) and a broadcast of U V^T from
the owner rank (`step % world`) that computes the SVD - never more than one full matrix.
No communication under DDP. Needs `ParamShard.write_grad`: ddp, fsdp2, deepspeed ZeRO-3
(ZeRO-1/2 refused at train start; DeepSpeed fp16 not supported, its gradients are still
loss-scaled in `after_backward`).

Metrics (`<prefix>/`): `trainable_fraction` (current mask, all participants),
`trainable_fraction_initial`, `reselected` (1 from the re-selection on),
`reselection_frozen` (entries the re-selection froze, fraction of all participants),
`nuclear_norm` (||theta * M||_* of this step's matrix, before the step), `nuclear_matrix`
(its index in the eligible list), `nuclear_applied` (0 when skipped by `min_trainable`).

State (per rank): initial and adaptive local masks with their (flat_start, numel), the
frozen values, fraction-mode thresholds, the re-selection step, the seed; resume needs the
world size and strategy of the run that saved it.
"""
from __future__ import annotations

import warnings

import torch
from pydantic import Field, model_validator

from distreg.hooks.base import Hook, HookContext, ParamShard
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import local_slice, require_grad_writes
from distreg.hooks.sparsity import restore_masks, select_participants
from distreg.sparsity import ShardScores
from distreg.sparsity.sara import (
    DEFAULT_LAMBDA_RANK,
    DEFAULT_PROGRESSIVE_ITER,
    DEFAULT_THRESHOLD,
    fraction_masks,
    nuclear_direction,
    pick_matrix,
    reselect,
    threshold_mask,
)

F64 = torch.float64


@register
class Sara(Hook):
    """SaRA sparse fine-tuning (see the module docstring for order, state and metrics)."""
    writes_gradients = True  # edits reduced gradients: refused with DeepSpeed fp16 (scaled grads)

    name = "sara"

    class Params(Hook.Params):
        threshold: float = Field(DEFAULT_THRESHOLD, gt=0, description="tau: entries with |theta| < tau train")
        fraction: float | None = Field(None, gt=0, le=1,
                                       description="instead of tau: train exactly this smallest fraction per tensor")
        lambda_rank: float = Field(DEFAULT_LAMBDA_RANK, ge=0, description="nuclear-norm weight (0: off)")
        progressive_iter: int | None = Field(DEFAULT_PROGRESSIVE_ITER, ge=0,
                                             description="re-select after this optimizer step (None: never)")
        min_dim: int = Field(64, ge=0, description="nuclear term on 2-D weights with min(shape) > min_dim")
        min_trainable: int = Field(100, ge=0,
                                   description="no nuclear term on a matrix with <= this many trainable entries")
        seed: int | None = Field(None, description="seed of the matrix draw; unset: the run's train.seed")
        include: list[str] = Field(["*"], description="fnmatch patterns of parameter names that take part")
        exclude: list[str] = Field([], description="fnmatch patterns of parameter names left out (they train fully)")
        include_1d: bool = Field(False, description="let 1-D parameters (biases, norm scales) take part")
        include_embeddings: bool = Field(False, description="let nn.Embedding tables take part")
        metrics_prefix: str = "sara"

        @model_validator(mode="after")
        def _one_rule(self):
            if self.fraction is not None and "threshold" in self.model_fields_set:
                raise ValueError("set threshold or fraction, not both")
            return self

    params: "Sara.Params"

    def __init__(self, params: "Sara.Params"):
        super().__init__(params)
        # The Trainer seeds torch with train.seed right before it builds the hooks.
        self.seed = params.seed if params.seed is not None else torch.initial_seed()
        self.names: list[str] | None = None
        self.eligible: list[str] = []  # matrices the nuclear term may pick, model order
        self.initial: dict[str, torch.Tensor] | None = None  # local trainable masks (bool, flat)
        self.adaptive: dict[str, torch.Tensor] | None = None  # after the re-selection
        self.saved: dict[str, torch.Tensor] = {}  # local shard values frozen entries return to
        self.slices: dict[str, tuple[int, int]] = {}
        self.thresholds: list[float | None] | None = None  # fraction mode: per tensor
        self.reselected_at: int | None = None
        self.trainable: dict[str, int] = {}  # global trainable count per tensor (current mask)
        self.total: dict[str, int] = {}
        self.values: dict[str, float] = {}
        self._loaded: dict | None = None

    # -- helpers ---------------------------------------------------------------------------
    def shards(self, ctx: HookContext) -> list[ParamShard]:
        if self.names is None:
            self.names = select_participants(ctx, self.params)
        wanted = set(self.names)
        return [s for s in ctx.local_shards() if s.name in wanted]

    @property
    def masks(self) -> dict[str, torch.Tensor] | None:
        """The mask in force: the adaptive one after the re-selection."""
        return self.adaptive if self.adaptive is not None else self.initial

    @staticmethod
    def _counts(ctx: HookContext, shards: list[ParamShard], masks: dict[str, torch.Tensor]) -> dict[str, int]:
        """Global trainable counts per tensor (one all-reduce when sharded)."""
        local = torch.tensor([int(masks[s.name].sum()) for s in shards], dtype=torch.int64)
        return dict(zip((s.name for s in shards), ctx.sum_over_shards(local).tolist()))

    def _fraction(self, counts: dict[str, int]) -> float:
        return sum(counts.values()) / sum(self.total.values())

    @torch.no_grad()
    def _select(self, ctx: HookContext, shards: list[ParamShard]) -> dict[str, torch.Tensor]:
        p = self.params
        if p.fraction is None:
            return {s.name: threshold_mask(s.data(), p.threshold).reshape(-1) for s in shards}
        scores = [ShardScores(s.data(), s.flat_start, s.name) for s in shards]
        masks, self.thresholds = fraction_masks(scores, p.fraction, ctx.comm, replicated=not ctx.sharded)
        return {s.name: m.reshape(-1) for s, m in zip(shards, masks)}

    # -- events ----------------------------------------------------------------------------
    def on_train_start(self, ctx: HookContext) -> None:
        shards = self.shards(ctx)
        require_grad_writes(shards, ctx, self.name)
        self.total = {s.name: s.full_shape.numel() for s in shards}
        p = self.params
        self.eligible = [s.name for s in shards if len(s.full_shape) == 2 and min(s.full_shape) > p.min_dim]
        if p.lambda_rank and not self.eligible and ctx.rank == 0:
            warnings.warn(f"{self.name}: no participating 2-D weight has min(shape) > min_dim={p.min_dim}; "
                          "the nuclear-norm term is off (lower min_dim)", stacklevel=2)
        self.slices = {s.name: (s.flat_start, s.numel) for s in shards}
        if self._loaded is not None:
            self._restore(shards)
        else:
            self.initial = self._select(ctx, shards)
            self.saved = {s.name: s.data().detach().clone() for s in shards}
        self.trainable = self._counts(ctx, shards, self.masks)
        first = self.trainable if self.adaptive is None else self._counts(ctx, shards, self.initial)
        self.values["trainable_fraction_initial"] = self._fraction(first)
        self._update_values()
        self._maybe_reselect(ctx, shards)

    @torch.no_grad()
    def after_backward(self, ctx: HookContext) -> None:
        shards = self.shards(ctx)
        masks = self.masks
        extra = self._nuclear(ctx, shards)
        for s in shards:
            g = s.grad()
            if g is None:
                continue
            if extra is not None and extra[0] == s.name:
                g = g + extra[1].to(g.dtype)
            s.write_grad(torch.where(masks[s.name], g, torch.zeros((), dtype=g.dtype)))

    def _nuclear(self, ctx: HookContext, shards: list[ParamShard]) -> tuple[str, torch.Tensor] | None:
        """(name, this rank's slice of lambda (U V^T) * M) of the step's matrix, or None.
        Collective when sharded (all ranks draw the same matrix and skip alike)."""
        p = self.params
        for k in ("nuclear_norm", "nuclear_matrix", "nuclear_applied"):
            self.values.pop(k, None)
        if not p.lambda_rank or not self.eligible:
            return None
        idx = pick_matrix(self.seed, ctx.step, len(self.eligible))
        name = self.eligible[idx]
        self.values["nuclear_matrix"] = float(idx)
        if self.trainable[name] <= p.min_trainable:
            self.values["nuclear_applied"] = 0.0
            return None
        shard = next(s for s in shards if s.name == name)
        mask = self.masks[name]
        local = torch.where(mask, shard.data().detach().to(F64), torch.zeros((), dtype=F64))
        rows, cols = shard.full_shape
        if not ctx.sharded or shard.replicated:
            direction, norm = nuclear_direction(local.view(rows, cols))
            delta = direction.reshape(-1)
        else:
            full = torch.cat(ctx.comm.all_gather_uneven(local))
            if full.numel() != rows * cols:
                raise RuntimeError(f"{self.name}: {name}: gathered {full.numel()} elements, expected {rows * cols}")
            owner = ctx.step % ctx.world_size
            packed = torch.empty(rows * cols + 1, dtype=F64, device=full.device)
            if ctx.rank == owner:
                direction, norm = nuclear_direction(full.view(rows, cols))
                packed[:-1], packed[-1] = direction.reshape(-1), norm
            ctx.comm.broadcast(packed, src=owner)
            delta, norm = local_slice(shard, packed[:-1]), float(packed[-1])
        self.values.update(nuclear_norm=norm, nuclear_applied=1.0)
        return name, p.lambda_rank * delta * mask

    @torch.no_grad()
    def after_step(self, ctx: HookContext) -> None:
        shards = self.shards(ctx)
        self._restore_frozen(shards)
        self._maybe_reselect(ctx, shards)

    def _restore_frozen(self, shards: list[ParamShard]) -> None:
        """Frozen entries back to their saved values, on every rank for the same tensors
        (those with a frozen entry anywhere: `ParamShard.write` wants that under ZeRO-3)."""
        masks = self.masks
        for s in shards:
            if self.trainable[s.name] < self.total[s.name]:
                s.write(torch.where(masks[s.name], s.data(), self.saved[s.name]))

    @torch.no_grad()
    def _maybe_reselect(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        it = self.params.progressive_iter
        if it is None or self.reselected_at is not None or ctx.step < it:
            return
        inclusive = self.params.fraction is not None
        thr = self.thresholds if inclusive else [self.params.threshold] * len(shards)
        self.adaptive = {s.name: reselect(self.initial[s.name], s.data(), t, inclusive) for s, t in zip(shards, thr)}
        # newly frozen entries stay at their values now (the old frozen ones already equal saved)
        self.saved = {s.name: s.data().detach().clone() for s in shards}
        before, self.trainable = self.trainable, self._counts(ctx, shards, self.adaptive)
        self.reselected_at = ctx.step
        self.values["reselection_frozen"] = self._fraction(before) - self._fraction(self.trainable)
        self._update_values()

    def _update_values(self) -> None:
        self.values["trainable_fraction"] = self._fraction(self.trainable)
        self.values["reselected"] = float(self.reselected_at is not None)

    def metrics(self) -> dict[str, float]:
        return {f"{self.params.metrics_prefix}/{k}": v for k, v in self.values.items()}

    # -- checkpoint state ------------------------------------------------------------------
    def state_dict(self) -> dict:
        masks = self.masks
        clone = (lambda d: None if d is None else {k: v.clone() for k, v in d.items()})
        return {
            "masks": clone(self.initial), "adaptive": clone(self.adaptive), "slices": dict(self.slices),
            "frozen": None if masks is None else {k: v[~masks[k]].clone() for k, v in self.saved.items()},
            "thresholds": self.thresholds, "reselected_at": self.reselected_at, "seed": self.seed,
            "values": dict(self.values),
        }

    def load_state_dict(self, state: dict) -> None:
        # Masks are matched to this rank's shards in on_train_start (shards exist then).
        self._loaded = state
        self.seed = state.get("seed", self.seed)
        self.values = dict(state.get("values", {}))
        self.thresholds = state.get("thresholds")
        self.reselected_at = state.get("reselected_at")

    def _restore(self, shards: list[ParamShard]) -> None:
        state, self._loaded = self._loaded, None
        self.initial = restore_masks(self.name, state, shards)
        if self.initial is None:
            raise ValueError(f"{self.name}: the checkpointed state holds no masks")
        adaptive = state.get("adaptive")
        self.adaptive = None if adaptive is None else restore_masks(self.name, dict(state, masks=adaptive), shards)
        self.saved = {}
        for s in shards:  # checkpoints load on the CPU; the shards may live on a GPU
            values = s.data().detach().clone()
            self.initial[s.name] = self.initial[s.name].to(values.device)
            if self.adaptive is not None:
                self.adaptive[s.name] = self.adaptive[s.name].to(values.device)
            values[~self.masks[s.name]] = state["frozen"][s.name].to(values.device, values.dtype)
            self.saved[s.name] = values
