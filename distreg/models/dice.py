"""Dice, the data-adaptive activation of DIN (Zhou et al., KDD 2018; spec regularizers.md
section 10), as a module that behaves like BatchNorm across ranks.

Paper form (the default): p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps)),
f(s) = p(s) s + (1 - p(s)) alpha s, one learnable alpha per feature (initialised to 0 as
in the DIN repository), eps = 1e-8. In training E and Var are the per-feature mean and
population variance of the *global* batch: every leading dimension (batch, sequence) is a
sample, and the sums (sum s, sum s^2, count) are all-reduced over the data-parallel ranks
by a differentiable all-reduce (`distreg.regularizers.embedding.dice_batch_stats`,
SyncBN style), so the output and the gradients equal the single-process ones on the same
global batch. With gradient accumulation that batch is the global micro-batch (micro-batch
m of every rank), as for BatchNorm. Running averages (momentum 0.1, of the same population
variance used in training) serve evaluation and are persistent buffers, checkpointed with
the model; they are identical on every rank, so DDP's buffer broadcast changes nothing.

`reference_compat=True` is what the public DIN repository computes instead
(`dice_reference`): p = sigmoid(beta s / sqrt(1 + 1e-3)) with a second learnable
per-feature beta (init 0) and no batch statistics at all (its BatchNorm is never put in
training mode).

Collectives: the forward in training mode all-reduces one [2C + 1] vector and its
backward one more, on every rank in the same order (the module is called by every rank
for every micro-batch). Under activation checkpointing the recomputed forward repeats the
all-reduce (all ranks recompute) but does not update the running statistics a second
time. Padding tokens, if a batch has any, count as samples (the FFN sees no mask).
"""
from __future__ import annotations

import torch
from torch import nn

from distreg.models.recompute import is_recomputing
from distreg.regularizers.embedding import dice, dice_batch_stats, dice_reference
from distreg.runtime.comm import Comm

# Parameter-name suffixes initialised to zero by the name-keyed init (`llama.init_values`).
ZERO_INIT_SUFFIXES = (".dice.alpha", ".dice.beta")


class Dice(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1, reference_compat: bool = False,
                 bn_eps: float = 1e-3, comm: Comm | None = None):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Dice: momentum must be in [0, 1], got {momentum}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.reference_compat, self.bn_eps = reference_compat, bn_eps
        self.alpha = nn.Parameter(torch.zeros(num_features))
        if reference_compat:
            self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.comm = comm  # None: the default process group when one is initialised

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.alpha)
        if self.reference_compat:
            nn.init.zeros_(self.beta)

    def reset_running_stats(self) -> None:
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def _comm(self) -> Comm:
        if self.comm is None:
            self.comm = Comm()  # world size 1 without a process group: collectives are no-ops
        return self.comm

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if s.shape[-1] != self.num_features:
            raise ValueError(f"Dice: expected {self.num_features} features in the last dimension, got {s.shape[-1]}")
        x = s.reshape(-1, self.num_features).float()
        if self.reference_compat:
            return dice_reference(x, self.alpha.float(), self.beta.float(), self.bn_eps).to(s.dtype).reshape(s.shape)
        if self.training:
            mean, var, n = dice_batch_stats(x, self._comm())
            var = var.clamp(min=0)  # one-pass E[s^2] - E[s]^2 may round below 0
            # A checkpointed block's forward is re-run inside backward: same statistics,
            # but the running averages must move once per micro-batch.
            if not is_recomputing() and n > 0:
                with torch.no_grad():
                    m = self.momentum
                    self.running_mean.mul_(1 - m).add_(m * mean.detach().to(self.running_mean.dtype))
                    self.running_var.mul_(1 - m).add_(m * var.detach().to(self.running_var.dtype))
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        return dice(x, self.alpha.float(), mean, var, self.eps).to(s.dtype).reshape(s.shape)

    def extra_repr(self) -> str:
        form = "reference_compat" if self.reference_compat else f"eps={self.eps}, momentum={self.momentum}"
        return f"{self.num_features}, {form}"


def set_dice_comm(model: nn.Module, comm: Comm | None) -> int:
    """Point every Dice module of `model` at `comm` (tests with thread ranks, or a
    data-parallel group other than the world); returns how many were set."""
    mods = [m for m in model.modules() if isinstance(m, Dice)]
    for m in mods:
        m.comm = comm
    return len(mods)
