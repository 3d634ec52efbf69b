"""Per-sample-store hooks for classification: `elr` and `ps_kd` (spec regularizers.md
sections 3, 4 and pattern P4).

- `elr` (Liu et al., NeurIPS 2020, early-learning regularisation): keeps a running
  target ``t_i <- beta t_i + (1 - beta) p_hat_i`` per sample and adds
  ``lam * log(1 - <t_i, p_i>)`` to each sample's loss (targets updated before the
  regulariser, as the reference does; ``p`` = clamped softmax). Defaults: the CIFAR-10
  preset (beta 0.7, lam 3); ``preset: cifar100 | cifar10_asym`` picks the others. The
  sample loss it adds to is whatever the Trainer (or an earlier hook) computed - the
  hard-label cross-entropy by default - so `elr` combines with other hooks.
- `ps_kd` (Kim et al., ICCV 2021, progressive self-knowledge distillation): replaces each
  sample's loss by the cross-entropy against ``(1 - alpha_e) onehot(y) + alpha_e P_i``
  where ``P_i`` is the softmax the model gave sample ``i`` at its previous visit (the
  previous epoch) and ``alpha_e = alpha_T (e + 1) / num_epochs`` (``e`` = the data
  position's 0-based epoch). Epoch 0, and any sample not yet visited, uses one-hot
  targets. Replaces the loss (cannot be combined with another loss-replacing hook).

Both keep an ``N x C`` table (``N`` = `ctx.num_samples`, set by the Trainer from the data
source's ``num_samples``; ``C`` = the logits' width, or `num_classes`) in a
`distreg.reweighting.ShardedSampleStore`: rank ``r`` owns the contiguous rows
``[r S, (r+1) S)``, ``S = ceil(N / W)``, on the logits' device (``store_on_host: true``
keeps it in host memory). Rows are keyed by the stable global sample index
(``terms.index``). Per micro-batch, one collective read of the batch's rows and one
collective write of the new rows (each rank sends/receives O(global micro-batch x C)
floats, never the table); samples with zero reduction weight (no valid label) are not
written. Reads of a step precede its writes and every index occurs once per epoch, so
the table - and the loss - equal a single process consuming the global batch.
Batch means come from the Trainer's reduction weights (sum to 1 over the step's global
batch), so they are global means (P1) for any split over ranks and micro-batches.

Metrics: ``elr/ce`` and ``elr/reg`` (global means of the sample loss before the hook and
of the added ``lam * log(1 - <t, p>)``; one 2-float all-reduce per step),
``ps_kd/alpha``. State (per rank, in the checkpoint): the local table slice with its row
range (`ShardedSampleStore.state_dict`); resume needs the same world size (a slice that
does not cover this rank's rows is an error naming them). The PS-KD schedule is a
function of the data position's epoch, which the Trainer checkpoints.
Order in a step: forward -> `loss` (store read, targets, store write) -> backward ->
optimizer step.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from distreg.hooks.base import Hook, HookContext, LossTerms
from distreg.hooks.registry import register
from distreg.reweighting import (
    ELR_PRESETS,
    ShardedSampleStore,
    elr_probs,
    elr_target_update,
    pskd_alpha,
    pskd_targets,
)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _StoreHook(Hook):
    fill = 0.0

    class Params(Hook.Params):
        num_classes: int | None = Field(None, gt=0)  # default: the logits' width, at the first batch
        store_dtype: Literal["fp32", "bf16"] = "fp32"  # bf16 halves the table and rounds every write
        store_on_host: bool = False  # keep the table in host memory (collectives on the logits' device)

    def __init__(self, params):
        super().__init__(params)
        self.store: ShardedSampleStore | None = None
        self._pending: dict | None = None

    def _ensure_store(self, ctx: HookContext, width: int, device: torch.device) -> ShardedSampleStore:
        if self.store is None:
            if ctx.num_samples is None:
                raise RuntimeError(f"{self.name}: the data source does not say how many samples it has "
                                   "(num_samples); a per-sample store needs it")
            table_device = torch.device("cpu") if self.params.store_on_host else device
            self.store = ShardedSampleStore(ctx.num_samples, width, ctx.comm, _DTYPES[self.params.store_dtype],
                                            device=table_device, transport_device=device, fill=self.fill)
            if self._pending is not None:
                self.store.load_state_dict(self._pending)
                self._pending = None
        elif self.store.width != width:
            raise ValueError(f"{self.name}: logits have {width} classes but the store has {self.store.width}")
        return self.store

    @staticmethod
    def _logits(hook: str, out) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ValueError(f"{hook}: needs classification logits [batch, classes], got "
                             f"{getattr(out, 'shape', type(out))}")
        return out

    def on_train_start(self, ctx: HookContext) -> None:
        if self.params.num_classes is not None and self.store is None:
            device = next(iter(ctx.model.parameters()), torch.empty(0)).device
            self._ensure_store(ctx, self.params.num_classes, device)

    def state_dict(self) -> dict:
        if self.store is not None:
            return {"store": self.store.state_dict()}
        return {"store": self._pending} if self._pending is not None else {}

    def load_state_dict(self, state: dict) -> None:
        sd = state.get("store")
        if sd is None:
            return
        if self.store is not None:
            self.store.load_state_dict(sd)
        else:
            self._pending = sd  # applied when the store is allocated (its width comes from the logits)


@register
class Elr(_StoreHook):
    name = "elr"

    class Params(_StoreHook.Params):
        preset: Literal["cifar10", "cifar100", "cifar10_asym"] | None = None  # sets beta and lam
        beta: float | None = Field(None, ge=0, lt=1)  # target momentum (default 0.7)
        lam: float | None = Field(None, ge=0)  # regulariser weight (default 3)
        clamp: float = Field(1e-4, gt=0, lt=0.5)

    def __init__(self, params):
        super().__init__(params)
        preset = ELR_PRESETS[params.preset or "cifar10"]
        self.beta = params.beta if params.beta is not None else preset["beta"]
        self.lam = params.lam if params.lam is not None else preset["lam"]
        self._sums = torch.zeros(2, dtype=torch.float64)
        self.values: dict[str, float] = {}

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        logits = self._logits(self.name, out)
        store = self._ensure_store(ctx, logits.shape[-1], logits.device)
        valid = terms.weight > 0
        t = store.read(terms.index).to(logits.device)
        p = elr_probs(logits, self.params.clamp)
        t_new = elr_target_update(t, p, self.beta)
        # ELR's R_i (spec section 4), per sample; `elr_regularizer` is its batch mean.
        reg = self.lam * torch.log(1.0 - (t_new.detach() * p).sum(dim=-1))
        store.write(terms.index, t_new, valid)
        if ctx.micro_step == 0:  # kept on the logits' device: the all-reduce may be NCCL
            self._sums = torch.zeros(2, dtype=torch.float64, device=logits.device)
        w = terms.weight.detach().double()
        self._sums += torch.stack([(w * terms.per_sample.detach().double()).sum(), (w * reg.detach().double()).sum()])
        return LossTerms(terms.per_sample + reg, terms.weight, terms.index, terms.penalties)

    def after_step(self, ctx: HookContext) -> None:
        if not ctx.metrics_on():  # metrics only: logging steps
            return
        ce, reg = ctx.comm.all_reduce(self._sums.clone()).tolist()
        self.values = {"elr/ce": ce, "elr/reg": reg}

    def metrics(self) -> dict[str, float]:
        return dict(self.values)


@register
class PsKd(_StoreHook):
    name = "ps_kd"
    replaces_loss = True
    fill = float("nan")  # "not visited yet": such rows give one-hot targets

    class Params(_StoreHook.Params):
        num_epochs: int = Field(gt=0)  # E of alpha_e = alpha_T (e + 1) / E
        alpha_T: float = Field(0.8, ge=0, le=1)

    def __init__(self, params):
        super().__init__(params)
        self.alpha: float | None = None

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        logits = self._logits(self.name, out)
        num_classes = logits.shape[-1]
        store = self._ensure_store(ctx, num_classes, logits.device)
        valid = terms.weight > 0
        labels = torch.where(valid, batch["target"], torch.zeros_like(batch["target"]))  # ignored labels: weight 0
        epoch = ctx.epoch
        self.alpha = pskd_alpha(epoch, self.params.num_epochs, self.params.alpha_T)
        prev = None
        if epoch > 0:  # the same epoch on every rank, so every rank reads (collective)
            prev = store.read(terms.index).to(logits.device)
            onehot = F.one_hot(labels.long(), num_classes).to(prev.dtype)
            prev = torch.where(torch.isnan(prev[:, :1]), onehot, prev)
        targets = pskd_targets(labels, prev, self.alpha, num_classes)
        per_sample = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
        store.write(terms.index, F.softmax(logits.detach().float(), dim=-1), valid)
        return LossTerms(per_sample, terms.weight, terms.index, terms.penalties)

    def metrics(self) -> dict[str, float]:
        return {"ps_kd/alpha": self.alpha} if self.alpha is not None else {}
