"""The Hook protocol and the context (`ctx`) that hides the strategy from hooks.

Order inside one optimizer step (every hook that touches gradients relies on it):
  `prepare_batches` hooks (once per step) -> [`inner_step` of `adversarial` hooks, over all the step's micro-batches]
  -> per micro-batch: `before_forward` -> forward -> `loss` hooks (sample weights, penalties) -> backward + gradient reduction
  -> `after_backward` hooks (once per optimizer step, on already-reduced gradients)
  -> clipping -> optimizer step -> `after_step` hooks (re-masking, proximal steps,
  store writes, schedules) -> metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from distreg.runtime.comm import Comm


@dataclass
class ParamShard:
    """This rank's piece of one parameter, with its global identity.

    The local elements are the contiguous range [flat_start, flat_start + numel) of the
    flattened full parameter (row-major). DDP and ZeRO-1/2 hold the whole tensor on
    every rank (`replicated=True`); FSDP2 holds a `Shard(0)` row slice and ZeRO-3 a flat
    partition, both rank-ordered (rank r's range precedes rank r+1's).
    """

    name: str
    full_shape: torch.Size
    flat_start: int
    numel: int
    replicated: bool
    _read: Callable[[], torch.Tensor]
    _write: Callable[[torch.Tensor], None]
    _grad: Callable[[], torch.Tensor | None]
    _write_grad: Callable[[torch.Tensor], None] | None = None

    def data(self) -> torch.Tensor:
        """The local elements (1-D, length `numel`) of the copy the optimizer updates."""
        return self._read()

    def write(self, values: torch.Tensor) -> None:
        """Overwrite the local elements, in the optimizer's copy and the forward copy.

        Call it for a parameter on every rank or on none (empty slices included): under
        ZeRO-3 it releases a gathered full copy of the parameter (small parameters stay
        gathered between steps), which the next forward then re-gathers collectively."""
        if values.numel() != self.numel:
            raise ValueError(f"{self.name}: write of {values.numel()} values into a shard of {self.numel}")
        with torch.no_grad():
            self._write(values.reshape(-1))

    def grad(self) -> torch.Tensor | None:
        """The local elements of the reduced (rank-averaged) gradient, or None."""
        return self._grad()

    def write_grad(self, values: torch.Tensor) -> None:
        """Overwrite the local elements of the reduced gradient (in `after_backward`: after
        the reduction, before clipping and the step). Gradient edits made this way are
        not averaged over ranks again."""
        if self._write_grad is None:
            raise NotImplementedError(f"{self.name}: this strategy does not support gradient writes")
        if values.numel() != self.numel:
            raise ValueError(f"{self.name}: gradient write of {values.numel()} values into a shard of {self.numel}")
        with torch.no_grad():
            self._write_grad(values.reshape(-1))


@dataclass
class LossTerms:
    """What `loss` hooks receive and return for one micro-batch of this rank.

    `per_sample` holds each sample's loss (differentiable); `weight` each sample's
    reduction weight, normalised so the weights of the whole optimizer step (all ranks,
    all micro-batches) sum to 1 - a reweighting hook rescales these; `penalties` are
    terms added once per optimizer step, in units of the global mean loss.
    """

    per_sample: torch.Tensor
    weight: torch.Tensor
    index: torch.Tensor
    penalties: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class HookContext:
    comm: Comm
    strategy: str
    model: nn.Module
    step: int = 0  # optimizer steps completed so far
    micro_step: int = 0  # index of the micro-batch inside the current step
    grad_accum_steps: int = 1
    shards_fn: Callable[[], list[ParamShard]] | None = None
    sharded: bool = False  # whether parameters are split across ranks
    run_dir: str = "."  # where hooks may write files (plots, reports)
    num_samples: int | None = None  # size of the sample index space (per-sample stores)
    epoch_fn: Callable[[], int] | None = None  # the data position's current epoch
    artifact_fn: Callable[[str, str | None], None] | None = None  # MLflow upload, rank 0 only
    lr_fn: Callable[[], float] | None = None  # the optimizer's current learning rate
    base_lr: float | None = None  # optim.lr: the schedule's peak learning rate
    model_config: Any = None  # the run's ModelConfig (hooks that build related models: teachers)
    # Whether the step now running is a logging step (train.log_every, the last step):
    # the only steps whose metrics() are read. A hook skips metric-only work (host
    # reads, statistic all-reduces) when False; values it keeps may be 0-dim device
    # tensors, read back in metrics().
    metrics_due: bool = True

    def metrics_on(self, every: int = 1) -> bool:
        """Whether a hook computes its metrics in the step now running: a logging step
        (`metrics_due`) that is also one of the hook's own `every` steps. Off such steps
        a hook runs only what its method needs (e.g. reweighting's group statistics):
        no metric reduction, no host read. `ctx.step` is read as the hook reads it in the
        event at hand (completed steps in `loss` / `after_backward`, the new count in
        `after_step`)."""
        return self.metrics_due and self.step % every == 0

    @property
    def lr(self) -> float | None:
        """The learning rate of the next optimizer step (the schedule is stepped right
        after each optimizer step, so in `after_step` this is already the next step's);
        None when the Trainer did not provide it."""
        return self.lr_fn() if self.lr_fn is not None else None

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def local_shards(self) -> list[ParamShard]:
        """This rank's shard of every trainable parameter, in model order."""
        if self.shards_fn is None:
            raise RuntimeError("local_shards() is only available after the model is sharded (on_train_start onward)")
        return self.shards_fn()

    @property
    def epoch(self) -> int:
        return self.epoch_fn() if self.epoch_fn is not None else 0

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a file to the run's MLflow artifacts (rank 0; a no-op elsewhere)."""
        if self.artifact_fn is not None:
            self.artifact_fn(local_path, artifact_path)

    def sum_over_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """Complete a sum of per-shard partial results: all-reduce when parameters are
        sharded, nothing when every rank already holds whole tensors."""
        return self.comm.all_reduce(tensor) if self.sharded else tensor


class Hook:
    """Base class: override the events you need. Parameters come from `Params`."""

    name: str = ""
    replaces_loss: bool = False  # two hooks that replace the loss cannot be combined
    # Writes reduced gradients in after_backward (`write_grad`): refused where the
    # gradients it sees are loss-scaled (DeepSpeed fp16). tests/gpu checks the declaration.
    writes_gradients: bool = False
    # Parameters holding local file paths: made absolute in the driver before the config
    # travels to Ray workers, whose working directory differs (`resolve_paths`).
    path_params: tuple[str, ...] = ()

    @classmethod
    def resolve_paths(cls, params: dict, resolve: Callable[[str], str]) -> dict:
        """`params` (the YAML entry) with its local paths passed through `resolve`."""
        return {k: resolve(v) if k in cls.path_params and isinstance(v, str) else v for k, v in params.items()}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, params: "Hook.Params"):
        self.params = params

    # Inner maximisation (adversarial methods, e.g. `adv_style`): the Trainer calls
    # `inner_step` once per optimizer step, before the step's real forwards, with every
    # micro-batch of this rank and `loss_fn(batch)`: a forward of the model in training
    # mode (the strategy's compute dtype, no gradient sync) returning that micro-batch's
    # share of the global mean task loss (reduction weights over all ranks' and
    # micro-batches' samples, no hook terms), differentiable. The hook maximises over its
    # *own* variables with `torch.autograd.grad(loss, its_variables)`: no parameter
    # gradient is formed or accumulated, so no DDP all-reduce / FSDP2 reduce-scatter /
    # ZeRO-3 gradient partitioning runs (FSDP2 / ZeRO-3 still all-gather the weights for
    # the backward, as for any backward); summing its gradient over ranks (one all-reduce
    # of its own, small) makes the update the single-process one. Cost: one extra forward
    # + backward per micro-batch per inner iteration; BatchNorm running statistics are
    # updated by the inner forwards as by any training forward.
    adversarial: bool = False

    def inner_step(self, ctx: HookContext, micro_batches: list[dict],
                   loss_fn: Callable[[dict], torch.Tensor]) -> None: ...

    def before_forward(self, ctx: HookContext, batch: dict) -> None:
        """Right before the real forward of each micro-batch (e.g. to key per-sample
        randomness on `batch["index"]`)."""

    def prepare_model(self, model: nn.Module, ctx: HookContext) -> None: ...

    def on_train_start(self, ctx: HookContext) -> None: ...

    def prepare_batches(self, ctx: HookContext, micro_batches: list[dict]) -> list[dict]:
        """Once per optimizer step, before the first forward: this rank's micro-batches
        (on the device), returned possibly changed (e.g. `visible`, the patches a masked
        image model sees). Extra forwards made here are the hook's cost."""
        return micro_batches

    def loss(self, ctx: HookContext, out: Any, batch: dict, terms: LossTerms) -> LossTerms:
        return terms

    def after_backward(self, ctx: HookContext) -> None: ...

    def after_step(self, ctx: HookContext) -> None: ...

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
