"""`distillation`: MEAL V2 teacher-ensemble distillation (spec regularizers.md section 13.1;
cores in `distreg.regularizers.distill`), with an optional soft-hard label adaptation in the
spirit of FerKD (13.3, see `calibrate`).

Teachers. Each entry of `teachers` is ``{checkpoint: PATH, config: YAML_or_null, set: [k=v]}``:
the teacher's model config is the ``model:`` section of its own run YAML, or the student's
model config when `config` is null; `set` overrides keys of that model section (``dim=128``
or ``model.dim=128``). In `prepare_model` every rank builds every teacher whole (on the
meta device, then allocated on the CPU: no random init, the global RNG untouched), loads
the checkpoint with `distreg.runtime.weights.load_into` (a ddp / fsdp2 DCP or DeepSpeed
checkpoint, read whole in this process; a step directory or a checkpoint root), freezes it
(``requires_grad=False``, eval mode) and keeps it on the hook, NOT as a submodule of the
student: the strategy never shards, averages or optimises it and checkpoints never contain
it. Teachers move to the logits' device at the first batch. Memory: every rank holds every
teacher whole; sharded (FSDP) teachers for models larger than one device are not offered.
The default teacher config is the student's `ModelConfig` (`ctx.model_config`); without a
Trainer it is recovered from a Llama student's `args`.
Paths are opened on every rank (fsspec for the YAML); the launcher makes relative ones
absolute before the config reaches the Ray workers (`resolve_paths`). An MoE teacher runs whole with all its experts local;
with ``moe_group_size: 0`` (or global route scope) its routing depends on the micro-batch,
i.e. on the world size: fix ``moe_group_size`` for rank-invariant targets.

Loss (replaces the Trainer's cross-entropy; ``replaces_loss``). On the same batch, without
gradient, each teacher gives logits; the target is ``p_T = mean_k softmax(T_k(x))``
(temperature 1, as the reference) and each row's loss is ``-sum_c p_T,c log softmax(z_S)_c``
(MEAL V2 uses no hard labels). Token models: one row per position, a sample's loss is the
mean over its valid tokens (targets != -100) - the Trainer's per-sample convention - so the
Trainer's reduction weights make the step loss the exact global mean over ranks and
micro-batches (P1); nothing is communicated for the loss. Labels are used only by the
metrics and by `calibrate`.

`calibrate: {below: tau, epsilon: eps}` (optional): rows whose ensemble probability of the
ground-truth class is below ``tau`` get the softened one-hot ``(1 - eps) onehot(y) + eps/C``
instead of ``p_T``. FerKD [abstract only] replaces the labels of its less-confident crops by
softened ground truth; its confidence measure, band edges and eps are unconfirmed (spec
open item 3), so this measure is this hook's choice, both values are required, and this is
not a fidelity implementation of FerKD (nor of its SelfMix or its per-crop label store).

`discriminator: true` adds MEAL V2's discriminator D (C -> C/8 -> C/64 -> 2, ReLU after every
layer) as the student submodule ``distill_discriminator`` in `prepare_model`, before sharding,
so the strategy shards, averages, optimises (one optimizer, the student's lr - the
reference's effective behaviour) and checkpoints it with the student. Its weights come from
`discriminator_seed` (the same on every rank; the Trainer's RNG is untouched). Each row adds
``L_D`` = mean of BCEWithLogits(D(z_S), [1, 0]) and BCEWithLogits(D(z_T), [0, 1]) (z_T = the
mean teacher logits), so the step's L_D is the reference's mean over 2N x 2 entries; as in
the reference there is no gradient reversal: student and D both minimise ``L_KD + L_D``. D runs
in `loss`, after the student's forward: under FSDP2 the root's parameters (D's among them)
are still gathered then (the root is not resharded after forward), ZeRO-3 gathers a
submodule's partitions around any call of it, DDP reduces D's gradients with the rest.
Needs ``model.init_device: cpu``. Student checkpoints then hold ``distill_discriminator.*``:
drop those keys to load the student into a plain model (e.g. as a later teacher).

Metrics (``distillation/...``, one 5- to 7-float all-reduce per step in `after_backward`,
global means with the Trainer's reduction weights): ``kd_loss`` (the soft-target CE: the step
loss, plus ``d_loss`` with the discriminator),
``kl`` (``kd_loss - H(target)``: KL(target || student)), ``teacher_entropy`` (entropy of the
ensemble ``p_T``), ``teacher_acc`` (argmax ``p_T`` = label), ``agreement`` (argmax student =
argmax ``p_T``), with `calibrate` ``calibrated`` (share of rows calibrated), with the
discriminator ``d_loss``. State: the last metric values (D's weights are model parameters).
Order in a step: forward -> `loss` (teacher forwards, targets, per-sample KD [+ L_D]) ->
backward -> `after_backward` (metric all-reduce) -> clipping -> optimizer step.
"""
from __future__ import annotations

from typing import Literal

import fsspec
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from distreg.hooks.base import HookContext, LossTerms
from distreg.hooks.registry import register
from distreg.hooks.regularizers._common import F64, per_sample_mean
from distreg.hooks.regularizers._common import StatHook
from distreg.regularizers.distill import (
    MealDiscriminator,
    discriminator_loss,
    ensemble_logits,
    ensemble_soft_targets,
    entropy,
    soft_cross_entropy,
    soft_hard_adapt,
)
from distreg.runtime.loss import IGNORE_INDEX

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DISCRIMINATOR = "distill_discriminator"  # the student submodule holding MEAL V2's discriminator


def _model_fields() -> set[str]:
    from distreg.config import ModelConfig

    return set(ModelConfig.model_fields)


def parse_set(items: list[str]) -> dict:
    """`["dim=128", "model.n_layers=4"]` -> {"dim": 128, "n_layers": 4} (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip().removeprefix("model.")
        if key not in _model_fields():
            raise ValueError(f"{item!r}: {key!r} is not a model config key")
        out[key] = yaml.safe_load(text) if text != "" else None
    return out


class TeacherSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    checkpoint: str = Field(description="a distreg checkpoint: a step_N directory or a checkpoint root")
    config: str | None = Field(None, description="the teacher's run YAML (its model section); null: the student's")
    overrides: list[str] = Field([], alias="set", description="model-config overrides, key=value")

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, items: list[str]) -> list[str]:
        parse_set(items)
        return items


def teacher_paths(teacher, resolve):
    """A teacher entry (YAML mapping) with its `checkpoint` and `config` paths resolved."""
    if not isinstance(teacher, dict):
        return teacher
    return {k: resolve(v) if k in ("checkpoint", "config") and isinstance(v, str) else v for k, v in teacher.items()}


class Calibrate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    below: float = Field(gt=0, le=1, description="ensemble probability of the label under which a row is calibrated")
    epsilon: float = Field(ge=0, le=1, description="smoothing of the softened ground-truth label")


def student_model_config(ctx: HookContext, model: nn.Module):
    """The student's ModelConfig: `ctx.model_config` when the Trainer provides it, else
    rebuilt from a Llama's `args` (every architecture field is there); None otherwise."""
    from dataclasses import fields

    from distreg.config import ModelConfig
    from distreg.models.llama import Llama

    cfg = getattr(ctx, "model_config", None)
    if cfg is not None:
        return cfg
    if not isinstance(model, Llama):
        return None
    known = _model_fields()
    raw = {f.name: getattr(model.args, f.name) for f in fields(model.args) if f.name in known}
    raw["moe_layers"] = list(raw["moe_layers"]) if model.args.moe_num_experts else "all"
    return ModelConfig.model_validate({**raw, "kind": "llama", "preset": None})


def teacher_model_config(where: str, spec: TeacherSpec, student_cfg):
    """The teacher's ModelConfig (its YAML's model section or the student's, plus `set`)."""
    from distreg.config import ModelConfig

    if spec.config is not None:
        try:
            with fsspec.open(spec.config, "r") as f:
                raw = yaml.safe_load(f.read()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{where}.config {spec.config}: cannot read a YAML run config: {e}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("model", {}), dict):
            raise ValueError(f"{where}.config {spec.config}: expected a run config with a 'model:' mapping")
        raw = dict(raw.get("model", {}))
    elif student_cfg is not None:
        raw = student_cfg.model_dump()
    else:
        raise ValueError(f"{where}.config: required here (the student is not a Llama and the Trainer does not "
                         "provide its model config)")
    raw.update(parse_set(spec.overrides))
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"{where}: invalid teacher model config: {e}") from None


def build_teacher(where: str, spec: TeacherSpec, student_cfg, dtype: torch.dtype) -> nn.Module:
    """A frozen, eval-mode teacher with the checkpoint's weights, on the CPU."""
    from distreg.models import build_model
    from distreg.runtime.weights import CheckpointError, load_into

    cfg = teacher_model_config(where, spec, student_cfg)
    try:
        with torch.random.fork_rng(devices=[]):  # torchvision's builder reseeds; keep the Trainer's RNG
            teacher = build_model(cfg, 0, "meta", init=False)
    except ValueError as e:
        raise ValueError(f"{where}: invalid teacher model config: {e}") from None
    teacher.to_empty(device="cpu")
    if hasattr(teacher, "reset_buffers"):
        teacher.reset_buffers()  # non-persistent buffers (RoPE tables) are not in checkpoints
    try:
        load_into(teacher, spec.checkpoint)
    except (CheckpointError, FileNotFoundError) as e:
        raise ValueError(f"{where}.checkpoint {spec.checkpoint}: {e}") from None
    teacher.requires_grad_(False).eval()
    return teacher.to(dtype)


def logit_width(model: nn.Module) -> int:
    """The student's number of classes: a Llama's vocabulary, else the last nn.Linear's outputs."""
    args = getattr(model, "args", None)
    if args is not None and hasattr(args, "vocab_size"):
        return int(args.vocab_size)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("distillation: cannot tell the logit width; set num_classes")
    return linears[-1].out_features


def add_discriminator(model: nn.Module, params) -> None:
    """MEAL V2's discriminator as a student submodule (before sharding): the strategy shards,
    averages, optimises and checkpoints it with the student (one optimizer, as the reference)."""
    if any(p.is_meta or hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("distillation: discriminator needs model.init_device=cpu (it joins the whole student "
                         "before sharding)")
    if hasattr(model, DISCRIMINATOR):
        raise ValueError(f"distillation: the model already has a {DISCRIMINATOR!r} submodule")
    width = params.num_classes or logit_width(model)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):  # the same weights on every rank, the Trainer's RNG untouched
        torch.manual_seed(params.discriminator_seed)
        disc = MealDiscriminator(width, params.discriminator_reduction)
    model.add_module(DISCRIMINATOR, disc.to(device))


@register
class Distillation(StatHook):
    name = "distillation"
    replaces_loss = True

    @classmethod
    def resolve_paths(cls, params: dict, resolve) -> dict:
        """Teachers' `checkpoint` and `config` are read on every worker: make them absolute."""
        teachers = [teacher_paths(t, resolve) for t in params.get("teachers", [])]
        return {**params, "teachers": teachers} if "teachers" in params else params

    class Params(StatHook.Params):
        teachers: list[TeacherSpec] = Field(min_length=1, description="the ensemble (MEAL V2: 2 teachers)")
        teacher_dtype: Literal["fp32", "bf16"] = Field("fp32", description="teachers' weights and forward dtype")
        calibrate: Calibrate | None = Field(None, description="soft-hard adaptation (FerKD-style; see docstring)")
        discriminator: bool = Field(False, description="MEAL V2's logit discriminator (a student submodule)")
        discriminator_reduction: int = Field(8, gt=1, description="K of C -> C/K -> C/K^2 -> 2 (reference: 8)")
        discriminator_seed: int = Field(0, description="seed of the discriminator's initial weights")
        num_classes: int | None = Field(None, gt=0, description="logit width for the discriminator "
                                                                  "(default: a Llama's vocab / the last linear layer)")

    params: "Distillation.Params"

    def __init__(self, params):
        super().__init__(params)
        self.teachers: list[nn.Module] = []  # a plain list: never submodules of the student
        self._device: torch.device | None = None

    def prepare_model(self, model: nn.Module, ctx: HookContext) -> None:
        student_cfg = student_model_config(ctx, model)
        dtype = _DTYPES[self.params.teacher_dtype]
        self.teachers = [build_teacher(f"{self.name}: teachers.{i}", spec, student_cfg, dtype)
                         for i, spec in enumerate(self.params.teachers)]
        if self.params.discriminator:
            add_discriminator(model, self.params)

    def teacher_logits(self, inputs: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        if not self.teachers:
            raise RuntimeError(f"{self.name}: teachers are loaded in prepare_model, which has not run")
        if self._device != device:
            for t in self.teachers:
                t.to(device)
            self._device = device
        dtype = _DTYPES[self.params.teacher_dtype]
        x = inputs.to(dtype) if inputs.is_floating_point() else inputs
        with torch.no_grad():
            return [t(x) for t in self.teachers]

    def loss(self, ctx: HookContext, out, batch: dict, terms: LossTerms) -> LossTerms:
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            raise ValueError(f"{self.name}: needs logits [..., classes], got {getattr(out, 'shape', type(out))}")
        logits_t = self.teacher_logits(batch["input"], out.device)
        for i, z in enumerate(logits_t):
            if z.shape != out.shape:
                raise ValueError(f"{self.name}: teachers.{i} gives logits {tuple(z.shape)}, the student "
                                 f"{tuple(out.shape)}")
        target = batch["target"]
        valid = target != IGNORE_INDEX
        labels = torch.where(valid, target, torch.zeros_like(target))
        p_t = ensemble_soft_targets(logits_t)
        soft = p_t
        calibrated = None
        if self.params.calibrate is not None:
            c = self.params.calibrate
            calibrated = (p_t.gather(-1, labels.unsqueeze(-1)).squeeze(-1) < c.below) & valid
            soft = soft_hard_adapt(p_t, labels, calibrated, c.epsilon)
        rows = soft_cross_entropy(out, soft)
        d_rows = None
        if self.params.discriminator:
            d = getattr(ctx.model, DISCRIMINATOR)
            d_rows = discriminator_loss(d(out), d(ensemble_logits(logits_t).to(out.dtype)))
        terms.per_sample = per_sample_mean(rows if d_rows is None else rows + d_rows, valid)
        if ctx.metrics_on():  # statistics for the logging step only
            self._accumulate_stats(terms.weight, rows, out, p_t, soft, labels, valid, calibrated, d_rows)
        return terms

    def _accumulate_stats(self, weight, rows, out, p_t, soft, labels, valid, calibrated, d_rows) -> None:
        with torch.no_grad():
            teacher_pred = p_t.argmax(-1)
            per_row = [rows, rows - entropy(soft), entropy(p_t), (teacher_pred == labels).float(),
                       (out.argmax(-1) == teacher_pred).float()]
            if calibrated is not None:
                per_row.append(calibrated.float())
            if d_rows is not None:
                per_row.append(d_rows)
            w = weight.detach().to(F64)
            self.accumulate(torch.stack([(w * per_sample_mean(r.to(F64), valid)).sum() for r in per_row]))

    def after_backward(self, ctx: HookContext) -> None:
        if not ctx.metrics_on():
            return
        keys = ["kd_loss", "kl", "teacher_entropy", "teacher_acc", "agreement"]
        if self.params.calibrate is not None:
            keys.append("calibrated")
        if self.params.discriminator:
            keys.append("d_loss")
        self.values = dict(zip(keys, self.reduced(ctx, len(keys)).tolist()))
