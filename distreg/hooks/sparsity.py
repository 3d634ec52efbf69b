"""Sparsity hooks: masks over sharded parameters (spec sections 1-3, patterns S1, S2, S6).

- `magnitude_pruning`: one-shot or gradual (Zhu & Gupta cubic schedule) magnitude
  pruning, global (one threshold over all participating tensors) or layer-wise.
- `random_pruning`: a random mask fixed at initialisation, ER / ERK / uniform layer
  densities (Liu et al. 2022); element keep-draws keyed by (seed, name, global index).
- `iss_p`: iterative soft shrinkage-percentage (Wang et al. 2023): after every step the
  currently smallest fraction of each layer is multiplied by `alpha`; after
  `prune_steps` steps the last selection is frozen into a mask.
- `mask_sparsity`: MaskSparsity (Jiang et al. 2021): an L1 gradient term on the
  normalisation scales of the channels a mask marks for pruning only (spec section 4);
  a gradient hook, not a weight mask (see its docstring).

The three pruning hooks keep one bool keep-mask per participating parameter, as this
rank's local slice (`ParamShard.flat_start .. + numel`), and re-apply it after every optimizer
step to the copy the optimizer updates (`ParamShard.write`: the parameter under DDP, the
local DTensor shard under FSDP2, the fp32 master partition and the forward partition
under ZeRO-3). Gradients are not masked: masked weights are re-zeroed after each step,
which is equivalent for elementwise optimizers (spec section 2).

Order inside a step (S7): optimizer step -> `after_step`: ISS-P shrink / scheduled
mask recomputation (new masks from the post-step weights; already-pruned entries stay
pruned) -> re-apply masks -> sparsity statistics (one all-reduce of per-layer zero
counts when sharded). Selections are exact and identical on every rank count and
strategy (`distreg.sparsity`, S1); nothing is gathered.

Which parameters take part: names matching one of `include` and none of `exclude`
(fnmatch), minus 1-D parameters (biases, norm scales) and embedding tables unless
`include_1d` / `include_embeddings`. The participant list (model order) is the same on
every rank.

Metrics (fraction of exact zeros in the weights, so a mask that does not reach the
weights shows up as 0): `<prefix>/global`, `<prefix>/<param name>` and
`<prefix>/target`; prefix `sparsity` unless `metrics_prefix` is set. At each pruning
event rank 0 writes a per-layer bar chart
`<run_dir>/sparsity/<prefix>_<hook>_step<NNNNNNNN>.png` and uploads it (`ctx.log_artifact(path, "sparsity")`).

State (per rank, in the checkpoint): the local mask slices with their (flat_start,
numel), and each hook's schedule position; resume needs the same sharding (world size
and strategy) as the run that saved it.
"""
from __future__ import annotations

import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from distreg.hooks.base import Hook, HookContext, ParamShard
from distreg.hooks.registry import register
from distreg.sparsity import (
    ShardScores,
    is_pruning_step,
    iss_count,
    iss_select,
    iss_shrink,
    layer_densities,
    magnitude_masks,
    nm_select,
    random_keep_mask,
    select_bottom_k_per_layer,
    sparsity_at,
)


class SparsityParams(Hook.Params):
    include: list[str] = Field(["*"], description="fnmatch patterns of parameter names that take part")
    exclude: list[str] = Field([], description="fnmatch patterns of parameter names left dense")
    include_1d: bool = Field(False, description="let 1-D parameters (biases, norm scales) take part")
    include_embeddings: bool = Field(False, description="let nn.Embedding tables take part")
    metrics_prefix: str = "sparsity"
    metrics_every: int = Field(1, gt=0, description="steps between sparsity statistics (one all-reduce)")
    plot: bool = Field(True, description="per-layer sparsity bar chart at each pruning event (rank 0)")


def select_participants(ctx: HookContext, p: SparsityParams) -> list[str]:
    """Names of the parameters a sparsity hook acts on, in model order."""
    embeddings = {f"{mod_name}.weight" if mod_name else "weight"
                  for mod_name, mod in ctx.model.named_modules() if isinstance(mod, (nn.Embedding, nn.EmbeddingBag))}
    names = []
    for shard in ctx.local_shards():
        n = shard.name
        if not any(fnmatchcase(n, pat) for pat in p.include) or any(fnmatchcase(n, pat) for pat in p.exclude):
            continue
        if (len(shard.full_shape) < 2 and not p.include_1d) or (n in embeddings and not p.include_embeddings):
            continue
        names.append(n)
    if not names:
        raise ValueError(f"no parameter matches include={p.include} exclude={p.exclude} "
                         f"(include_1d={p.include_1d}, include_embeddings={p.include_embeddings})")
    return names


def restore_masks(hook: str, state: dict, shards: list[ParamShard]) -> dict[str, torch.Tensor] | None:
    """This rank's mask slices from checkpointed hook state, checked against its shards."""
    if state.get("masks") is None:
        return None
    here = {s.name: (s.flat_start, s.numel) for s in shards}
    saved = {k: tuple(v) for k, v in state["slices"].items()}
    if saved != here:
        diff = sorted(k for k in set(saved) | set(here) if saved.get(k) != here.get(k))
        raise ValueError(f"{hook}: checkpointed mask slices do not match this rank's shards "
                         f"({', '.join(diff[:3])}...): resume with the same world size and strategy")
    device = {s.name: s.data().device for s in shards}
    return {k: v.to(device.get(k), copy=True) for k, v in state["masks"].items()}


class MaskHook(Hook):
    """Shared machinery: participants, local mask slices, re-masking, statistics,
    plots and checkpoint state. Subclasses decide when masks change."""

    params: SparsityParams

    def __init__(self, params: SparsityParams):
        super().__init__(params)
        self.names: list[str] | None = None
        self.masks: dict[str, torch.Tensor] | None = None  # local keep-mask slices (bool, flat)
        self.pruned: dict[str, int] = {}  # name -> masked entries in the full parameter
        self.slices: dict[str, tuple[int, int]] = {}  # name -> (flat_start, numel) of the mask slices
        self.full_numel: dict[str, int] = {}  # name -> global element count
        self.stats: dict[str, float] = {}
        self._loaded: dict | None = None

    # -- helpers ---------------------------------------------------------------------------
    def shards(self, ctx: HookContext) -> list[ParamShard]:
        """This rank's shards of the participating parameters (same order on every rank)."""
        if self.names is None:
            self.names = select_participants(ctx, self.params)
        wanted = set(self.names)
        shards = [s for s in ctx.local_shards() if s.name in wanted]
        self.full_numel = {s.name: s.full_shape.numel() for s in shards}
        return shards

    @staticmethod
    def replicated(ctx: HookContext) -> bool:
        return not ctx.sharded

    def apply_masks(self, shards: list[ParamShard]) -> None:
        """w <- w * m on the optimizer's copy (and the forward copy), for every parameter
        whose full mask has zeros (the same parameters on every rank: `write` wants that)."""
        if self.masks is None:
            return
        for s in shards:
            if self.pruned[s.name]:
                w = s.data()
                s.write(torch.where(self.masks[s.name].to(w.device), w, torch.zeros((), dtype=w.dtype)))

    def target(self, ctx: HookContext) -> float | None:
        """The sparsity this hook aims at now (logged as `<prefix>/target`)."""
        return None

    @torch.no_grad()
    def update_stats(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        """Fraction of exact zeros per participating parameter and over all of them
        (local counts, one all-reduce when sharded). Collective: call on every rank."""
        zeros = torch.tensor([int((s.data() == 0).sum()) if s.numel else 0 for s in shards], dtype=torch.int64)
        zeros = ctx.sum_over_shards(zeros).tolist()
        totals = [s.full_shape.numel() for s in shards]
        pre = self.params.metrics_prefix
        stats = {f"{pre}/global": sum(zeros) / sum(totals)}
        stats.update({f"{pre}/{s.name}": z / n for s, z, n in zip(shards, zeros, totals)})
        t = self.target(ctx)
        if t is not None:
            stats[f"{pre}/target"] = t
        self.stats = stats

    def plot(self, ctx: HookContext, title: str) -> str | None:
        """Rank 0: per-layer sparsity bar chart of the current statistics, saved under
        `<run_dir>/sparsity/` and uploaded as an artifact. Returns the path."""
        if ctx.rank != 0 or not self.params.plot or not self.stats:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        pre = self.params.metrics_prefix
        layers = [(k[len(pre) + 1:], v) for k, v in self.stats.items() if k not in (f"{pre}/global", f"{pre}/target")]
        fig = Figure(figsize=(8, 1.2 + 0.22 * len(layers)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.barh(range(len(layers)), [v for _, v in layers], color="tab:blue")
        ax.set_yticks(range(len(layers)), [n for n, _ in layers], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.axvline(self.stats[f"{pre}/global"], color="tab:red", lw=1, label="global")
        ax.set_xlabel("sparsity (fraction of zero weights)")
        ax.set_title(f"{self.name} {title}: global {self.stats[f'{pre}/global']:.4f}", fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        stem = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', pre)}_{self.name}_step{ctx.step:08d}"
        path = Path(ctx.run_dir) / "sparsity" / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        ctx.log_artifact(str(path), "sparsity")
        return str(path)

    def event(self, ctx: HookContext, shards: list[ParamShard], title: str) -> None:
        """After masks changed: apply them, refresh statistics, plot."""
        self.apply_masks(shards)
        self.update_stats(ctx, shards)
        self.plot(ctx, title)

    # -- events ----------------------------------------------------------------------------
    def on_train_start(self, ctx: HookContext) -> None:
        shards = self.shards(ctx)
        if self._loaded is not None:
            self._restore(shards)
            if self.masks is not None:
                self._count_pruned(ctx, shards)
        self.start(ctx, shards)
        if not self.stats:
            self.update_stats(ctx, shards)

    def start(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        """Subclass work at train start (after any checkpoint state is restored)."""
        self.apply_masks(shards)

    def after_step(self, ctx: HookContext) -> None:
        shards = self.shards(ctx)
        if not self.step(ctx, shards):
            self.apply_masks(shards)
            if ctx.metrics_on(self.params.metrics_every):  # metrics only: logging steps
                self.update_stats(ctx, shards)

    def step(self, ctx: HookContext, shards: list[ParamShard]) -> bool:
        """Subclass work after an optimizer step; True if it handled masks and stats."""
        return False

    def metrics(self) -> dict[str, float]:
        return dict(self.stats)

    # -- checkpoint state ------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None: ...

    def state_dict(self) -> dict:
        return {
            "masks": None if self.masks is None else {k: v.clone() for k, v in self.masks.items()},
            "slices": dict(self.slices), **self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        # Masks are matched to this rank's shards in on_train_start (shards exist then).
        self._loaded = state
        self.load_extra_state(state)

    def _restore(self, shards: list[ParamShard]) -> None:
        state, self._loaded = self._loaded, None
        self.masks = restore_masks(self.name, state, shards)
        self.slices = {s.name: (s.flat_start, s.numel) for s in shards} if self.masks is not None else {}

    def set_masks(self, ctx: HookContext, shards: list[ParamShard], keep: list[torch.Tensor]) -> None:
        # Masks live with the shards they mask (random/file masks are drawn on the CPU).
        self.masks = {s.name: k.reshape(-1).to(s.data().device, copy=True) for s, k in zip(shards, keep)}
        self.slices = {s.name: (s.flat_start, s.numel) for s in shards}
        self._count_pruned(ctx, shards)

    def _count_pruned(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        """Global masked count per parameter (one all-reduce when sharded)."""
        local = torch.tensor([int((~self.masks[s.name]).sum()) for s in shards], dtype=torch.int64)
        self.pruned = dict(zip((s.name for s in shards), ctx.sum_over_shards(local).tolist()))


@register
class MagnitudePruning(MaskHook):
    """Magnitude pruning, one-shot (`end_step` unset) or gradual: at the schedule points
    start_step, start_step + frequency, ..., end_step the target sparsity follows
    `s_f + (s_i - s_f)(1 - p)^exponent` and the smallest |w| are pruned until exactly
    `round(s * N)` of the scope's N weights are masked (already-masked ones count and stay
    masked). Scope `global`: one exact threshold over all participating tensors; `layer`:
    each tensor separately at the same sparsity. Exact selection over shards (spec S1)."""

    name = "magnitude_pruning"

    class Params(SparsityParams):
        sparsity: float = Field(ge=0, le=1, description="final sparsity (fraction pruned)")
        initial_sparsity: float = Field(0.0, ge=0, le=1)
        start_step: int = Field(0, ge=0, description="first pruning event (optimizer steps completed)")
        end_step: int | None = Field(None, ge=0, description="last event; unset: one-shot at start_step")
        frequency: int = Field(100, gt=0, description="steps between events")
        exponent: float = Field(3.0, gt=0)
        scope: Literal["global", "layer"] = "global"

        @model_validator(mode="after")
        def _schedule(self):
            if self.end_step is not None and self.end_step < self.start_step:
                raise ValueError(f"end_step ({self.end_step}) must be >= start_step ({self.start_step})")
            if self.initial_sparsity > self.sparsity:
                raise ValueError("initial_sparsity must not exceed sparsity (masks only grow)")
            return self

    params: "MagnitudePruning.Params"

    def __init__(self, params: "MagnitudePruning.Params"):
        super().__init__(params)
        self.last_event: int | None = None

    def _end(self) -> int:
        p = self.params
        return p.start_step if p.end_step is None else p.end_step

    def target_at(self, step: int) -> float:
        p = self.params
        if self.last_event is None and step < p.start_step:
            return 0.0
        return sparsity_at(step, p.start_step, self._end(), p.frequency, p.initial_sparsity, p.sparsity, p.exponent)

    def target(self, ctx: HookContext) -> float:
        return self.target_at(ctx.step)

    @torch.no_grad()
    def compute_masks(self, ctx: HookContext, shards: list[ParamShard], sparsity: float) -> list[torch.Tensor]:
        """New local keep-masks at `sparsity` from the current weights (collective; does
        not change the hook's masks or the weights)."""
        eligible = [None if self.masks is None else self.masks[s.name] for s in shards]
        scores = [ShardScores(s.data(), s.flat_start, s.name, e) for s, e in zip(shards, eligible)]
        return magnitude_masks(scores, sparsity, ctx.comm, per_layer=self.params.scope == "layer",
                               replicated=self.replicated(ctx))

    def _maybe_prune(self, ctx: HookContext, shards: list[ParamShard]) -> bool:
        p = self.params
        t = ctx.step
        if t == self.last_event or not is_pruning_step(t, p.start_step, self._end(), p.frequency):
            return False
        self.set_masks(ctx, shards, self.compute_masks(ctx, shards, self.target_at(t)))
        self.last_event = t
        self.event(ctx, shards, f"step {t}")
        return True

    def start(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        self.apply_masks(shards)
        self._maybe_prune(ctx, shards)

    def step(self, ctx: HookContext, shards: list[ParamShard]) -> bool:
        return self._maybe_prune(ctx, shards)

    def extra_state(self) -> dict:
        return {"last_event": self.last_event}

    def load_extra_state(self, state: dict) -> None:
        self.last_event = state.get("last_event")


@register
class RandomPruning(MaskHook):
    """Static random sparse training: at train start each participating tensor gets a
    Bernoulli(d_l) keep-mask, d_l from ER / ERK / uniform layer densities for the global
    `density` (computed from global shapes, identical on every rank); fixed for the run.
    Element j of parameter `name` is kept iff U(seed, name, j) < d_l (counter-based,
    spec S6), so any sharding yields the same full mask with no communication."""

    name = "random_pruning"

    class Params(SparsityParams):
        density: float = Field(gt=0, lt=1, description="global fraction of weights kept")
        method: Literal["erk", "er", "uniform"] = "erk"
        power_scale: float = Field(1.0, gt=0, description="ERK/ER raw scores are raised to this power")
        seed: int | None = Field(None, description="mask seed; unset: the run's train.seed")

    params: "RandomPruning.Params"

    def __init__(self, params: "RandomPruning.Params"):
        super().__init__(params)
        # The Trainer seeds torch with train.seed right before it builds the hooks.
        self.seed = params.seed if params.seed is not None else torch.initial_seed()
        self.densities: dict[str, float] = {}

    def target(self, ctx: HookContext) -> float | None:
        if not self.densities:
            return None
        n = self.full_numel
        return 1.0 - sum(self.densities[k] * n[k] for k in n) / sum(n.values())

    def start(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        p = self.params
        self.densities = layer_densities({s.name: tuple(s.full_shape) for s in shards}, p.density, p.method,
                                         p.power_scale)
        if self.masks is None:
            keep = [random_keep_mask(self.seed, s.name, s.flat_start, s.numel, self.densities[s.name]) for s in shards]
            self.set_masks(ctx, shards, keep)
            self.event(ctx, shards, "init")
        else:
            self.apply_masks(shards)

    def extra_state(self) -> dict:
        return {"seed": self.seed}

    def load_extra_state(self, state: dict) -> None:
        self.seed = state.get("seed", self.seed)


@register
class IssP(MaskHook):
    """ISS-P: for steps 1 .. prune_steps - 1, after the optimizer step the
    `min(ceil(ratio * n_l), floor(0.995 n_l))` smallest |w| of each layer (exact, per
    layer over the whole tensor, spec S1) are multiplied by `alpha`; at step
    `prune_steps` that step's selection is frozen into a mask and zeroed, and re-applied
    after every later step. `nm: "N:M"` selects the N smallest of every M consecutive
    weights instead (local; slices must hold whole groups)."""

    name = "iss_p"

    class Params(SparsityParams):
        ratio: float = Field(0.95, ge=0, le=1, description="fraction of each layer selected (p)")
        alpha: float = Field(0.95, ge=0, lt=1, description="shrink factor (0: iterative hard thresholding)")
        prune_steps: int = Field(100_020, gt=0, description="length of the pruning phase K_p, in optimizer steps")
        rounding: Literal["exact", "float_ceil"] = Field("exact", description="float_ceil: the reference's ceil(p*n)")
        nm: str | None = Field(None, pattern=r"^\d+:\d+$", description="N:M selection, e.g. '19:20'")

    params: "IssP.Params"

    def _nm(self) -> tuple[int, int] | None:
        if self.params.nm is None:
            return None
        n, m = map(int, self.params.nm.split(":"))
        return n, m

    def target(self, ctx: HookContext) -> float:
        """Fraction of the participating weights selected each step (and finally masked)."""
        totals = list(self.full_numel.values())
        nm = self._nm()
        sel = [t // nm[1] * nm[0] if nm else iss_count(self.params.ratio, t, self.params.rounding) for t in totals]
        return sum(sel) / sum(totals)

    @torch.no_grad()
    def select(self, ctx: HookContext, shards: list[ParamShard]) -> list[torch.Tensor]:
        """This step's keep-masks (False = selected for shrinking). Collective."""
        nm = self._nm()
        if nm is not None:
            out = []
            for s in shards:
                try:
                    out.append(nm_select(s.data(), nm[0], nm[1], s.flat_start))
                except ValueError as e:
                    raise ValueError(f"{self.name}: {s.name}: {e}") from None
            return out
        scores = [ShardScores(s.data(), s.flat_start, s.name) for s in shards]
        return iss_select(scores, [self.params.ratio] * len(shards), ctx.comm, rounding=self.params.rounding,
                          replicated=self.replicated(ctx))

    @torch.no_grad()
    def step(self, ctx: HookContext, shards: list[ParamShard]) -> bool:
        if self.masks is not None:
            return False  # frozen: the caller re-applies the mask
        keep = self.select(ctx, shards)
        if ctx.step < self.params.prune_steps:
            for s, k in zip(shards, keep):
                s.write(iss_shrink(s.data(), k, self.params.alpha))
            return False
        self.set_masks(ctx, shards, keep)
        self.event(ctx, shards, f"mask frozen at step {ctx.step}")
        return True


def norm_scale_names(model: nn.Module) -> set[str]:
    """Names of the scale (`weight`) parameters of normalisation layers: BatchNorm,
    LayerNorm, GroupNorm, and any module class whose name ends in `Norm` (RMSNorm)."""
    out = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or \
                type(mod).__name__.endswith("Norm"):
            if isinstance(getattr(mod, "weight", None), nn.Parameter):
                out.add(f"{mod_name}.weight" if mod_name else "weight")
    return out


@register
class MaskSparsity(Hook):
    """MaskSparsity (Jiang et al. 2021, spec section 4): an L1 (or L2) penalty on the
    norm-layer scales gamma of the channels a mask marks for pruning only:
    `grad_c += strength * sign(gamma_c) * m_c` (`l2`: `strength * gamma_c * m_c`), added in
    `after_backward` to the already-reduced local gradient slice, once per optimizer step,
    before clipping. The mask comes from `mask_file` ({param name: bool tensor of KEPT
    channels}; layers not in the file are left alone) or, at train start, from
    `|gamma| <= threshold`, keeping at least `min_channels` per layer unpenalised (the
    largest |gamma|, ties to the lowest channel; exact over shards, spec S1).
    Participants: 1-D scales of normalisation layers matching `include` / `exclude`.
    Metrics: `<prefix>/penalised_fraction`, `<prefix>/penalised_abs_mean` (mean |gamma| of
    the penalised channels) and `<prefix>/penalised_below_threshold`. State: the local
    mask slices. Needs `ParamShard.write_grad` (DDP, FSDP2, ZeRO-3; not fp16 loss scaling)."""
    writes_gradients = True  # edits reduced gradients: refused with DeepSpeed fp16 (scaled grads)

    name = "mask_sparsity"
    path_params = ("mask_file",)

    class Params(Hook.Params):
        strength: float = Field(5e-4, ge=0, description="s, the penalty weight")
        penalty: Literal["l1", "l2"] = "l1"
        threshold: float = Field(0.01, ge=0, description="penalise channels with |gamma| <= threshold at train start")
        min_channels: int = Field(1, ge=0, description="per layer, channels (largest |gamma|) never penalised")
        mask_file: str | None = Field(None, description="torch file {name: bool KEPT channels}, instead of threshold")
        include: list[str] = ["*"]
        exclude: list[str] = []
        metrics_prefix: str = "mask_sparsity"
        metrics_every: int = Field(1, gt=0)

    params: "MaskSparsity.Params"

    def __init__(self, params: "MaskSparsity.Params"):
        super().__init__(params)
        self.names: list[str] | None = None
        self.masks: dict[str, torch.Tensor] | None = None  # local slices, True = penalised
        self.slices: dict[str, tuple[int, int]] = {}
        self.count = 0  # penalised channels, all layers, all ranks
        self.stats: dict[str, float] = {}
        self._loaded: dict | None = None

    def shards(self, ctx: HookContext) -> list[ParamShard]:
        if self.names is None:
            p, norms = self.params, norm_scale_names(ctx.model)
            self.names = [s.name for s in ctx.local_shards()
                          if s.name in norms and len(s.full_shape) == 1
                          and any(fnmatchcase(s.name, i) for i in p.include)
                          and not any(fnmatchcase(s.name, e) for e in p.exclude)]
            if not self.names:
                raise ValueError(f"{self.name}: no normalisation-layer scale matches include={p.include} "
                                 f"exclude={p.exclude}")
        wanted = set(self.names)
        return [s for s in ctx.local_shards() if s.name in wanted]

    @torch.no_grad()
    def build_masks(self, ctx: HookContext, shards: list[ParamShard]) -> dict[str, torch.Tensor]:
        p = self.params
        if p.mask_file is not None:
            import fsspec

            with fsspec.open(p.mask_file, "rb") as f:
                kept = torch.load(f, weights_only=True)
            out = {}
            for s in shards:
                full = kept.get(s.name)
                if full is None:
                    out[s.name] = torch.zeros(s.numel, dtype=torch.bool)
                    continue
                if full.numel() != s.full_shape.numel():
                    raise ValueError(f"{self.name}: {p.mask_file}: {s.name} has {full.numel()} channels, "
                                     f"the model {s.full_shape.numel()}")
                out[s.name] = ~full.reshape(-1).bool()[s.flat_start:s.flat_start + s.numel]
            return {name: m.to(s.data().device) for (name, m), s in zip(out.items(), shards)}
        keep = [s.data().abs().clamp_min(1e-18) > p.threshold for s in shards]
        kept = ctx.sum_over_shards(torch.tensor([int(k.sum()) for k in keep], dtype=torch.int64)).tolist()
        ks = [min(p.min_channels, s.full_shape.numel()) if n < p.min_channels else 0 for s, n in zip(shards, kept)]
        if any(ks):
            scores = [ShardScores(-s.data().abs(), s.flat_start, s.name) for s in shards]
            top = select_bottom_k_per_layer(scores, ks, ctx.comm, replicated=not ctx.sharded).keep
            keep = [k | ~t for k, t in zip(keep, top)]
        return {s.name: ~k for s, k in zip(shards, keep)}

    def on_train_start(self, ctx: HookContext) -> None:
        shards = self.shards(ctx)
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            self.masks = restore_masks(self.name, state, shards)
        if self.masks is None:
            self.masks = self.build_masks(ctx, shards)
        self.slices = {s.name: (s.flat_start, s.numel) for s in shards}
        local = torch.tensor([int(self.masks[s.name].sum()) for s in shards], dtype=torch.int64)
        self.count = int(ctx.sum_over_shards(local).sum())
        self.update_stats(ctx, shards)

    @torch.no_grad()
    def after_backward(self, ctx: HookContext) -> None:
        if not self.count:
            return
        for s in self.shards(ctx):
            g = s.grad()
            if g is None:
                continue
            gamma = s.data()
            term = gamma.sign() if self.params.penalty == "l1" else gamma
            add = torch.where(self.masks[s.name], term, torch.zeros((), dtype=gamma.dtype)) * self.params.strength
            s.write_grad(g + add.to(g.dtype))

    @torch.no_grad()
    def update_stats(self, ctx: HookContext, shards: list[ParamShard]) -> None:
        sums = torch.zeros(2, dtype=torch.float64, device=shards[0].data().device if shards else None)
        for s in shards:
            a = s.data().abs().double()[self.masks[s.name]]
            sums += torch.stack([a.sum(), (a <= self.params.threshold).sum().double()])
        sums = ctx.sum_over_shards(sums).tolist()
        total = sum(s.full_shape.numel() for s in shards)
        pre = self.params.metrics_prefix
        self.stats = {f"{pre}/penalised_fraction": self.count / total,
                      f"{pre}/penalised_abs_mean": sums[0] / self.count if self.count else 0.0,
                      f"{pre}/penalised_below_threshold": sums[1] / self.count if self.count else 0.0}

    def after_step(self, ctx: HookContext) -> None:
        if ctx.metrics_on(self.params.metrics_every):  # metrics only: logging steps
            self.update_stats(ctx, self.shards(ctx))

    def metrics(self) -> dict[str, float]:
        return dict(self.stats)

    def state_dict(self) -> dict:
        if self.masks is None:
            return {"masks": None}
        return {"masks": {k: v.clone() for k, v in self.masks.items()}, "slices": dict(self.slices)}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = state
