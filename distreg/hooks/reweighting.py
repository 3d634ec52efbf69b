"""Sample-reweighting hooks: per-sample loss weights from statistics over the global batch.

- `loss_reweighting`: the dynamic instance-level strategies of Sow et al. (ICLR 2025,
  "dynamic loss-based sample reweighting for LLM pretraining", spec
  sparsity-reweighting-ot.md section 8): per-sample losses min/max-normalised to
  ``h in [-delta, delta]`` over the group, mapped by a strategy ``f`` and turned into
  ``w = softmax(f(h) / r)``; strategies ``linupper`` (default), ``quadratic`` (= ``mid``),
  ``extremes``, ``linear`` (the ICLR trainer's ``upper``) and ``uniform``, each with its
  reference defaults (`distreg.reweighting.DEFAULTS`: r = 1, delta = 1) unless ``r`` /
  ``delta`` are set. A temperature schedule (`temperature_schedule`) uses ``warmup_r``
  for the first ``warmup_steps`` optimizer steps: ICLR recipe ``warmup_steps: 1000`` with
  ``warmup_r: .inf`` (uniform weights first, the default ``warmup_r``), fms-fsdp 7B recipe
  ``warmup_steps: 2000, warmup_r: 100``.
- `dro_reweighting`: KL-regularised DRO weights (DRAT, spec section 9):
  ``w = softmax(loss / r)`` over the global batch (batch normaliser). ``r`` is required
  (DRAT's value is unverified); the EMA normaliser of the spec is not offered here.

Which samples form a group (gradient accumulation). The statistics (min, max, softmax
normaliser) are taken over the *global micro-batch*: the samples of micro-step ``m`` on
all ranks together, i.e. slice ``m`` of the step's global batch (``G / grad_accum``
samples). This is what the ICLR reference trainer does, needs no extra forward pass and
no retained graphs, and is rank invariant: the global micro-batch is the same set of
samples for every world size (the data sources cut micro-batch ``m`` of every rank from
the same contiguous slice of the global batch). With ``grad_accum_steps = 1`` the group
is the whole global batch. Weights depend on ``grad_accum_steps`` (the group size), not
on the world size. Each group's weights are scaled by the group's share of the step's
reduction weight, so the step's weights still sum to 1:

    w_i = M_m * b_i u_i / sum_{j in group m} b_j u_j,     M_m = sum_{j in group m} b_j

with ``b`` the Trainer's reduction weights (token reduction: ``n_i / N``; sample: ``1 / S``)
and ``u`` the strategy's softmax weights over the group. For equal-length sequences
(packed token data) ``b`` is uniform and ``w_i = u_i / grad_accum`` - the paper's weights;
otherwise this is the paper's KL-regularised problem with the reduction weights as the
prior instead of the uniform distribution (like the ICLR trainer, which multiplies the
weight by the sequence's token share). Samples with ``b_i = 0`` (no valid target) get
weight 0 and take no part in any statistic. The weights are detached: the gradient is
``sum_i w_i grad(loss_i)``.

Communication per micro-batch (`mode: allreduce`, the default) - what the method needs,
on every step, with no host read (the weights stay on the device): `loss_reweighting`
one MAX all-reduce of (-min, max) (the normalisation ``h`` needs the group's range
before anything else can be summed) and one all-gather of a 5-float row per rank (local
max of ``z``, count, shifted sums of ``e^z`` and ``b e^z``, ``sum b``) that gives ``M_m``
and the tilt normaliser together (the softmax normaliser cancels:
``w = M b e^z / sum b e^z``); `dro_reweighting` the all-gather only (``z = loss / r``
needs no range). `mode: allgather` gathers the group's (loss, valid, b) rows instead
(uneven sizes: two collectives and a host read of the sizes; bitwise identical on every
rank). While the temperature is infinite (uniform warm-up, strategy ``uniform``) the
hook returns the Trainer's weights untouched and communicates nothing. Metrics only
(`weight_stats`, three small all-reduces and host reads): on logging steps that are
also `stats_every` steps (`ctx.metrics_on`), never on the others. Every `plot_every`
steps the step's (loss, weight) pairs are
all-gathered (``G`` pairs) and rank 0 writes a weight-vs-loss figure
``<run_dir>/reweighting/<hook>_step<NNNNNNNN>.png`` and uploads it
(``ctx.log_artifact(path, "reweighting")``).

Metrics (``<hook name>/...``): ``weight_mean/std/min/max`` (the step's weights, summing
to 1 over the step), ``ess`` (effective sample size ``(sum w)^2 / sum w^2``),
``ess_fraction`` (``ess / n``), ``frac_downweighted`` (share of samples below the mean
weight), ``loss_mean`` (unweighted) and ``loss_weighted``; ``active`` (0 while the
temperature is infinite) and ``temperature`` (when finite).

State: none beyond the schedule cursor, which is the Trainer's step (checkpointed).
Order in a step: forward -> per-sample losses -> `loss` (weights) -> backward ->
optimizer step -> `after_step` (statistics, plot).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from distreg.hooks.base import Hook, HookContext, LossTerms
from distreg.hooks.registry import register
from distreg.reweighting import DEFAULTS, temperature_schedule, weight_stats
from distreg.reweighting.weights import _F_STRATEGIES, _Reducer, _check_r, loss_based_logits, prior_tilted_weights

_F64 = torch.float64


class _GroupReweighting(Hook):
    """Shared machinery: group weights, the step-sum-to-1 scaling, metrics, plots."""

    class Params(Hook.Params):
        warmup_steps: int = Field(0, ge=0)  # optimizer steps at temperature `warmup_r`
        warmup_r: float = Field(math.inf, gt=0)  # .inf: uniform weights (the Trainer's own) during warm-up
        mode: Literal["allreduce", "allgather"] = "allreduce"
        stats_every: int = Field(1, gt=0)  # weight statistics on logging steps that are multiples of N (3 scalar all-reduces)
        plot_every: int = Field(0, ge=0)  # weight-vs-loss figure every N steps (0: never)

    def __init__(self, params):
        super().__init__(params)
        self._w: list[torch.Tensor] = []  # this rank's weights, losses, validity and indices of the step
        self._l: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._i: list[torch.Tensor] = []
        self.stats: dict[str, float] = {}
        self.temperature_now: float | None = None
        self.plots: list[str] = []

    # -- what a subclass provides --------------------------------------------------------
    def base_r(self) -> float:
        raise NotImplementedError

    def group_logits(self, losses: torch.Tensor, valid: torch.Tensor, red: _Reducer, r: float) -> torch.Tensor:
        """``z`` of the strategy's softmax over the global micro-batch (float64 losses;
        collective through `red` when the strategy needs group statistics)."""
        raise NotImplementedError

    def group_weights_on_device(self, losses: torch.Tensor, valid: torch.Tensor, base: torch.Tensor,
                                ctx: HookContext, r: float) -> torch.Tensor:
        """``M_m b u / sum b u`` over the global micro-batch, float64, no host read."""
        l = torch.where(valid, losses.to(_F64), torch.zeros((), dtype=_F64, device=losses.device))
        b = base.to(device=l.device, dtype=_F64)
        if self.params.mode == "allreduce":
            red = _Reducer(ctx.comm)
            return prior_tilted_weights(self.group_logits(l, valid, red, r), valid, b, red)
        parts = ctx.comm.all_gather_uneven(torch.stack([l, valid.to(_F64), b], dim=1))
        full = torch.cat(parts)
        off = sum(p.shape[0] for p in parts[: ctx.rank])
        fv = full[:, 1] > 0.5
        red = _Reducer(None)  # the whole group is here: computed identically on every rank
        w = prior_tilted_weights(self.group_logits(full[:, 0], fv, red, r), fv, full[:, 2], red)
        return w[off: off + l.numel()]

    # -- events --------------------------------------------------------------------------
    def temperature(self, step: int) -> float:
        return temperature_schedule(step, self.base_r(), self.params.warmup_steps, self.params.warmup_r)

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        if ctx.micro_step == 0:
            self._w, self._l, self._v, self._i = [], [], [], []
        base = terms.weight.detach()
        valid = base > 0
        losses = terms.per_sample.detach()
        r = self.temperature(ctx.step)
        self.temperature_now = r
        if math.isinf(r):
            w = base  # uniform group weights: exactly the Trainer's weights
        else:  # the method's collectives (every step), no host read
            w = self.group_weights_on_device(losses, valid, base, ctx, r).to(device=base.device, dtype=base.dtype)
        self._w.append(w.detach())
        self._l.append(losses)
        self._v.append(valid)
        self._i.append(terms.index.detach())
        return LossTerms(terms.per_sample, w, terms.index, terms.penalties)

    def after_step(self, ctx: HookContext) -> None:
        if not self._w:
            return
        w, l, v = torch.cat(self._w), torch.cat(self._l), torch.cat(self._v)
        self.stats = {}  # reported only for the steps they were computed on
        if ctx.metrics_on(self.params.stats_every):  # metrics only: logging steps
            s = weight_stats(w, l, ctx.comm, v)
            pre = self.name
            self.stats = {
                f"{pre}/weight_mean": s["mean"], f"{pre}/weight_std": s["std"], f"{pre}/weight_min": s["min"],
                f"{pre}/weight_max": s["max"], f"{pre}/ess": s["ess"], f"{pre}/ess_fraction": s["ess_fraction"],
                f"{pre}/frac_downweighted": s["frac_downweighted"], f"{pre}/loss_mean": s["loss_mean"],
                f"{pre}/loss_weighted": s["loss_weighted"],
            }
        if self.params.plot_every and ctx.step % self.params.plot_every == 0:
            pairs = torch.stack([l.to(_F64), w.to(device=l.device, dtype=_F64)], dim=1)[v.to(l.device)]
            gathered = torch.cat(ctx.comm.all_gather_uneven(pairs)).cpu()  # on the losses' device (NCCL)
            if ctx.rank == 0:
                self.plots.append(self.plot(ctx, gathered[:, 0], gathered[:, 1]))

    # -- what tests and metrics read ------------------------------------------------------
    @property
    def last_weights(self) -> torch.Tensor:
        """This rank's weights of the last step (its micro-batches in order)."""
        return torch.cat(self._w) if self._w else torch.empty(0)

    @property
    def last_index(self) -> torch.Tensor:
        return torch.cat(self._i) if self._i else torch.empty(0, dtype=torch.long)

    @property
    def last_losses(self) -> torch.Tensor:
        return torch.cat(self._l) if self._l else torch.empty(0)

    def metrics(self) -> dict[str, float]:
        out = dict(self.stats)
        if self.temperature_now is not None:  # `active` 0: uniform (infinite temperature, not logged)
            out[f"{self.name}/active"] = float(not math.isinf(self.temperature_now))
            if not math.isinf(self.temperature_now):
                out[f"{self.name}/temperature"] = self.temperature_now
        return out

    def plot(self, ctx: HookContext, losses: torch.Tensor, weights: torch.Tensor) -> str:
        """Rank 0: the step's weight mass per loss bin against the uniform mass, and each
        sample's weight relative to uniform against its loss."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        l, w = losses.numpy(), weights.numpy()
        n, total = len(w), float(w.sum()) or 1.0
        fig = Figure(figsize=(9, 3.4))
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        bins = 20 if n >= 20 else max(n, 1)
        ax1.hist(l, bins=bins, weights=[1.0 / n] * n, alpha=0.5, label="uniform", color="tab:gray")
        ax1.hist(l, bins=bins, weights=w / total, alpha=0.6, label="reweighted", color="tab:blue")
        ax1.set_xlabel("per-sample loss")
        ax1.set_ylabel("share of the step's weight")
        ax1.legend(fontsize=7)
        ax2.scatter(l, w / total * n, s=6, color="tab:blue")
        ax2.axhline(1.0, color="tab:gray", lw=1)
        ax2.set_xlabel("per-sample loss")
        ax2.set_ylabel("weight x n (1 = uniform)")
        ess = total * total / float((w * w).sum()) if n else 0.0
        fig.suptitle(f"{self.name} step {ctx.step}: n={n}, r={self.temperature_now:g}, ESS={ess:.1f}", fontsize=9)
        fig.tight_layout()
        path = Path(ctx.run_dir) / "reweighting" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}_step{ctx.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        ctx.log_artifact(str(path), "reweighting")
        return str(path)


@register
class LossReweighting(_GroupReweighting):
    """`loss_reweighting`: Sow et al. (ICLR 2025) loss-based sample weights over the
    global micro-batch (see the module docstring for the group, the scaling under
    gradient accumulation and the communication)."""

    name = "loss_reweighting"

    class Params(_GroupReweighting.Params):
        strategy: Literal["linupper", "quadratic", "mid", "extremes", "linear", "uniform"] = "linupper"
        r: float | None = Field(None, gt=0)  # temperature after warm-up (default: the strategy's, 1.0)
        delta: float | None = Field(None, gt=0)  # normalisation half-range (default: the strategy's, 1.0)

    def base_r(self) -> float:
        if self.params.strategy == "uniform":
            return math.inf
        return float(self.params.r if self.params.r is not None else DEFAULTS[self.params.strategy]["r"])

    def group_logits(self, losses, valid, red, r):
        s = "quadratic" if self.params.strategy == "mid" else self.params.strategy
        delta = self.params.delta if self.params.delta is not None else DEFAULTS[s]["delta"]
        return loss_based_logits(losses, valid, red, f=_F_STRATEGIES[s], r=_check_r(r), delta=float(delta))


@register
class DroReweighting(_GroupReweighting):
    """`dro_reweighting`: KL-regularised DRO weights ``softmax(loss / r)`` over the global
    micro-batch (DRAT; batch normaliser). Same group, scaling and communication as
    `loss_reweighting` (module docstring)."""

    name = "dro_reweighting"

    class Params(_GroupReweighting.Params):
        r: float = Field(gt=0)  # required: r -> inf uniform, r -> 0 max-loss

    def base_r(self) -> float:
        return float(self.params.r)

    def group_logits(self, losses, valid, red, r):
        return losses / _check_r(r)  # no group statistic: the all-gather of the weights is the only collective
