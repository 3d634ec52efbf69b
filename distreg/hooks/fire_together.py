"""`fire_together`: dynamic filter pruning with self-supervised mask predictors (Fire
Together Wire Together, Elkerdawy et al., CVPR 2022; core in distreg.sparsity.fire_together).

For each gated Conv2d of a torchvision CNN (`layers`, e.g. ResNet's `layer1.0.conv1`), a
predictor (global pool of the conv's input -> optional softmax over channels -> one linear
map to a logit per output filter; the reference's 1x1 conv on the pooled input) is added
in `prepare_model` as the model submodule `fire_together.<layer with dots as _>`: it is
built before the strategy wraps the model, so DDP replicates, FSDP2 / ZeRO-3 shard,
the optimizer updates and checkpoints save it like any other parameter.

The gate sits on the output of the BatchNorm2d that follows the conv (ResNet naming:
`convN` -> `bnN`, `downsample.0` -> `downsample.1`). Per forward in training mode, the
predictor reads the conv's input *detached* and the targets come from that sample's own
BatchNorm output (after a ReLU where `layers` says `relu`, as the reference scores conv1 of
a BasicBlock, and before the residual add for conv2), so the task loss never reaches the
predictors and the predictor loss never reaches the backbone (the reference's
`decoupled` mode; `joint` is not offered; note that `train.grad_clip` clips all
parameters together, so with clipping on the predictor gradients rescale the backbone's
step: set it to null for a strictly decoupled backbone). The loss (BCE summed over filters, mean over
gated layers, weighted per sample by the task loss's reduction weights) is a penalty times
`weight`; the rank-averaged gradients then equal the single-process ones: targets and
logits are per sample, the predictors are ordinary replicated/sharded parameters.

Masking: where the mask applies (`apply_in_training` in training mode, `apply_at_eval` in
eval mode) the BatchNorm output is multiplied by the predicted keep bits (logit > 0): the
filters predicted off output exactly zero, which is what skipping them computes (their
cost is counted, not saved, on this hardware). The reference applies the predicted mask in
training as well; whether to do so here is required config.

Not confirmed from what could be read (only the abstract; the rest is the authors' code,
github selkerdawy/FTWT), hence required parameters with no default: the mass threshold r
(`mass_threshold`; the reference script uses 1.0), the pooling (`pool`; the code uses
average pooling, a summary of the paper says max), the softmax over pooled channels
(`softmax`; the code's default is on) and `apply_in_training`. Not supported: the
reference's separate predictor learning rate (0.1, no weight decay) and its cooldown
(predictor loss weight 0 after half the epochs): the predictors share the run's optimizer.

Metrics (all ranks' samples, one 7-float all-reduce every `every` steps):
`mask_accuracy`, `mask_loss`, `keep_fraction` (predicted kept filters / filters, the mean
k), `target_keep_fraction`, `flops_reduction` (multiply-accumulates of the gated convs
saved by the predicted output masks, input channels counted dense).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from distreg.hooks.base import HookContext, LossTerms
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import F64, StatHook
from distreg.sparsity.fire_together import (conv_macs, heat_scores, mask_accuracy, mask_bce, mass_targets,
                                            predicted_keep)

SUBMODULE = "fire_together"
STAT_KEYS = ("mask_accuracy", "target_keep_fraction", "keep_fraction", "kept_macs", "dense_macs", "mask_loss", "n")


class MaskPredictor(nn.Module):
    """Pooled previous activations -> one keep-logit per filter of the gated conv."""

    def __init__(self, in_channels: int, out_channels: int, pool: str, softmax: bool):
        super().__init__()
        self.pool, self.softmax = pool, softmax
        self.fc = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(dim=(2, 3)) if self.pool == "avg" else x.amax(dim=(2, 3))
        if self.softmax:
            z = z.softmax(dim=1)
        return self.fc(z)


def norm_name(conv_name: str) -> str:
    """The BatchNorm2d after a torchvision ResNet conv: convN -> bnN, downsample.0 -> .1."""
    head, _, last = conv_name.rpartition(".")
    if last.startswith("conv"):
        last = "bn" + last[len("conv"):]
    elif last.isdigit():
        last = str(int(last) + 1)
    return f"{head}.{last}" if head else last


class _Gate:
    """One gated layer: its conv geometry, predictor and the last forward's record."""

    def __init__(self, name: str, conv: nn.Conv2d, predictor: MaskPredictor, relu: bool):
        self.name, self.predictor, self.relu = name, predictor, relu
        self.in_channels, self.groups = conv.in_channels, conv.groups
        self.kernel_area = conv.kernel_size[0] * conv.kernel_size[1]
        self.input: torch.Tensor | None = None


@register
class FireTogether(StatHook):
    name = "fire_together"

    class Params(StatHook.Params):
        layers: dict[str, Literal["relu", "identity"]] = Field(
            min_length=1, description="gated Conv2d names -> activation applied to the following BatchNorm "
                                      "output before scoring (reference: relu for conv1, identity for conv2)")
        mass_threshold: float = Field(gt=0, le=1, description="heat-map mass r kept per sample (required)")
        pool: Literal["avg", "max"] = Field(description="global pooling of the predictor input (required)")
        softmax: bool = Field(description="softmax over the pooled channels (required)")
        apply_in_training: bool = Field(description="mask with the predicted bits in training mode (required)")
        apply_at_eval: bool = Field(True, description="mask with the predicted bits in eval mode")
        weight: float = Field(1.0, ge=0, description="predictor loss weight (reference 1)")
        every: int = Field(1, gt=0, description="metrics every N steps")

    params: "FireTogether.Params"

    def __init__(self, params):
        super().__init__(params)
        self.gates: list[_Gate] = []
        self._records: dict[str, tuple] = {}  # gate name -> the training forward's tensors
        self.eval_sums = torch.zeros(4, dtype=F64)  # keep fractions, kept MACs, dense MACs, samples x gates

    # -- wiring ---------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, ctx: HookContext) -> None:
        cfg = ctx.model_config
        if cfg is not None and getattr(cfg, "init_device", "cpu") != "cpu":
            raise ValueError("fire_together: the predictors are built on the model; needs model.init_device=cpu")
        if hasattr(model, SUBMODULE):
            raise ValueError(f"fire_together: the model already has a submodule {SUBMODULE!r}")
        predictors = nn.ModuleDict()
        for layer, act in self.params.layers.items():
            conv, norm = self._find(model, layer)
            pred = MaskPredictor(conv.in_channels, conv.out_channels, self.params.pool, self.params.softmax)
            predictors[layer.replace(".", "_")] = pred
            gate = _Gate(layer, conv, pred, act == "relu")
            conv.register_forward_pre_hook(self._save_input(gate))
            norm.register_forward_hook(self._gate_output(gate))
            self.gates.append(gate)
        model.add_module(SUBMODULE, predictors)

    @staticmethod
    def _find(model: nn.Module, layer: str) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        try:
            conv = model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"fire_together: layers: no module {layer!r} in the model") from None
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"fire_together: layers: {layer!r} is a {type(conv).__name__}, not a Conv2d")
        bn = norm_name(layer)
        try:
            norm = model.get_submodule(bn)
        except AttributeError:
            norm = None
        if not isinstance(norm, nn.BatchNorm2d) or norm.num_features != conv.out_channels:
            raise ValueError(f"fire_together: layers: {layer!r} is not followed by a BatchNorm2d {bn!r} "
                             f"of {conv.out_channels} features (torchvision ResNet naming)")
        return conv, norm

    @staticmethod
    def _save_input(gate: _Gate):
        def pre_hook(mod, args):
            gate.input = args[0].detach()  # decoupled: no task gradient through the predictor input
        return pre_hook

    def _gate_output(self, gate: _Gate):
        def hook(mod, args, out):
            x, gate.input = gate.input, None
            logits = gate.predictor(x)
            hw = (out.shape[2], out.shape[3])
            dense = conv_macs(gate.in_channels, out.shape[1], hw, gate.kernel_area, gate.groups)
            keep = predicted_keep(logits)
            kept = conv_macs(gate.in_channels, keep.sum(dim=1).double(), hw, gate.kernel_area, gate.groups)
            if mod.training:
                scored = torch.relu(out.detach()) if gate.relu else out.detach()
                targets = mass_targets(heat_scores(scored), self.params.mass_threshold)
                self._records[gate.name] = (logits, targets, keep, kept, dense)
                apply = self.params.apply_in_training
            else:
                apply = self.params.apply_at_eval
                if apply:  # evaluation only: host copies are fine here
                    n = len(keep)
                    self.eval_sums += torch.tensor([keep.double().mean(dim=1).sum().item(), kept.sum().item(),
                                                    float(dense) * n, float(n)], dtype=F64)
            if apply:
                return out * keep.to(out.dtype)[:, :, None, None]
            return None
        return hook

    # -- training ---------------------------------------------------------------------------
    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        if not self._records:
            return terms
        if set(self._records) != {g.name for g in self.gates}:
            raise RuntimeError(f"fire_together: gated layers not run in this forward: "
                               f"{sorted({g.name for g in self.gates} - set(self._records))}")
        recs = [self._records[g.name] for g in self.gates]
        self._records = {}
        per_sample = torch.stack([mask_bce(logits.float(), t) for logits, t, *_ in recs]).mean(dim=0)
        # weights sum to 1 over the whole step (all ranks, micro-batches); the strategies
        # average over ranks and the trainer divides penalties by the micro-batch count
        scale = self.params.weight * ctx.world_size * ctx.grad_accum_steps
        terms.penalties[self.name] = scale * (terms.weight.detach().to(per_sample.dtype) * per_sample).sum()
        if ctx.metrics_on(self.params.every):
            with torch.no_grad():
                acc = torch.stack([mask_accuracy(lg, t) for lg, t, *_ in recs]).mean(dim=0)
                tkeep = torch.stack([t.double().mean(dim=1) for _, t, *_ in recs]).mean(dim=0)
                pkeep = torch.stack([k.double().mean(dim=1) for _, _, k, *_ in recs]).mean(dim=0)
                kept = sum(r[3] for r in recs)
                dense = sum(float(r[4]) for r in recs) * len(acc)
                self.accumulate(torch.stack([acc.sum(), tkeep.sum(), pkeep.sum(), kept.sum(),
                                             torch.tensor(dense, dtype=F64, device=acc.device),
                                             per_sample.detach().double().sum(),
                                             torch.tensor(float(len(acc)), dtype=F64, device=acc.device)]))
        return terms

    def after_backward(self, ctx: HookContext) -> None:
        if not ctx.metrics_on(self.params.every):
            return
        c = dict(zip(STAT_KEYS, self.reduced(ctx, len(STAT_KEYS)).tolist()))
        n = max(c["n"], 1.0)
        self.values = {"mask_accuracy": c["mask_accuracy"] / n, "mask_loss": c["mask_loss"] / n,
                       "keep_fraction": c["keep_fraction"] / n, "target_keep_fraction": c["target_keep_fraction"] / n,
                       "flops_reduction": 1 - c["kept_macs"] / c["dense_macs"] if c["dense_macs"] else 0.0}

    # -- evaluation ---------------------------------------------------------------------------
    def pop_eval(self, comm=None) -> dict[str, float]:
        """Mean predicted keep fraction and MACs saved over the eval forwards since the last
        call (all ranks when `comm` is given: one all-reduce; every rank must call it)."""
        s, self.eval_sums = self.eval_sums, torch.zeros(4, dtype=F64)
        if comm is not None:
            s = comm.all_reduce(s.clone())
        keep, kept, dense, n = s.tolist()
        return {"keep_fraction": keep / n if n else 0.0, "flops_reduction": 1 - kept / dense if dense else 0.0}
