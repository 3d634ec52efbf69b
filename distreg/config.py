"""Typed, validated run configuration.

A run is described by one YAML file plus `--set key.path=value` overrides. Everything
is validated (unknown keys, wrong types, inconsistent batch arithmetic) in the driver,
before any worker starts, and every error names the offending key and the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MaeConfig(_Strict):
    """`model.kind: mae`: a small MAE-style ViT (distreg/models/mae.py) for masked image
    modeling on image data (data.kind=imagenet; image_size must equal data.image_size)."""

    image_size: int = Field(32, gt=0)
    patch_size: int = Field(8, gt=0)
    dim: int = Field(64, gt=0)
    depth: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    decoder_dim: int = Field(32, gt=0)
    decoder_depth: int = Field(1, gt=0)
    decoder_heads: int = Field(4, gt=0)
    mask_ratio: float = Field(0.75, gt=0, lt=1)  # MAE's / HPM's default
    norm_pix_loss: bool = True  # per-patch normalised pixel targets (HPM's pretrain script leaves it off)


class ModelConfig(_Strict):
    kind: Literal["llama", "torchvision", "mae"] = "llama"
    preset: str | None = "llama-tiny"
    # Llama dimensions; a preset fills the ones left unset.
    vocab_size: int | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # "meta": build without weights, shard, then initialise each rank's slice (FSDP2,
    # ZeRO-3); for models too large to build whole on one rank. Same values as "cpu".
    init_device: Literal["cpu", "meta"] = "cpu"
    # Start from these weights instead of the random init: a torch.save'd state dict (e.g.
    # model.pt of `distreg prune dsnot`, `distreg adapters merge`) or a distreg checkpoint
    # (a step directory or a checkpoint root, any strategy). Written into every rank's
    # shards after sharding; parameters only (buffers keep their init). --resume wins.
    # hf://DIR (local dir or fsspec URL): a Hugging Face Llama directory, each rank reading
    # only its slices; without model.preset the dimensions come from DIR/config.json.
    init_from: str | None = None
    # Mixture of experts (llama): 0 = dense SwiGLU everywhere. Experts are spread over the
    # ranks (expert parallelism: moe_num_experts divisible by scaling.num_workers).
    moe_num_experts: int = Field(0, ge=0)
    moe_top_k: int = Field(2, ge=1)  # experts per token
    moe_capacity_factor: float = Field(1.25, gt=0)  # capacity = ceil(cf * group_size * top_k / experts)
    moe_layers: Literal["all"] | list[int] = "all"  # block indices with an MoE feed-forward
    moe_router: str = "topk"  # routing function (distreg.models.moe.resolve_router)
    moe_aux_loss_coef: float = Field(0.01, ge=0)  # load-balancing loss (global statistics)
    moe_z_loss_coef: float = Field(0.001, ge=0)  # router z-loss
    # Tokens per routing group (capacity is per group); 0 = a rank's whole micro-batch,
    # which depends on the world size. Fix it (e.g. to data.seq_len) for rank invariance.
    moe_group_size: int = Field(0, ge=0)
    moe_ffn_dim: int | None = Field(None, gt=0)  # hidden size of each expert (default: ffn_dim)
    # "group": each routing group solved alone (no communication); "global": one routing
    # problem over all tokens of the step on all ranks (only per-expert statistics travel).
    moe_route_scope: Literal["group", "global"] = "group"
    # Feed-forward activation of the dense Llama blocks: "swiglu" (default) or "dice"
    # (Deep Interest Network's data-adaptive activation, batch moments all-reduced).
    ffn_activation: Literal["swiglu", "dice"] = "swiglu"
    # torchvision
    arch: str = "resnet50"
    num_classes: int = 1000
    mae: MaeConfig = MaeConfig()

    @model_validator(mode="after")
    def _moe(self) -> "ModelConfig":
        if not self.moe_num_experts:
            return self
        if self.kind != "llama":
            raise ValueError("model.moe_num_experts > 0 needs model.kind=llama")
        if self.moe_top_k > self.moe_num_experts:
            raise ValueError(f"model.moe_top_k={self.moe_top_k} exceeds model.moe_num_experts={self.moe_num_experts}")
        if isinstance(self.moe_layers, list):
            if not self.moe_layers or min(self.moe_layers) < 0 or len(set(self.moe_layers)) != len(self.moe_layers):
                raise ValueError(f"model.moe_layers: expected 'all' or distinct block indices >= 0, got {self.moe_layers}")
        from distreg.models.moe import available_routers  # lazy: torch

        if self.moe_router not in available_routers():
            raise ValueError(f"model.moe_router: unknown router {self.moe_router!r}; "
                             f"available: {', '.join(available_routers())}")
        if self.moe_route_scope == "global" and self.moe_group_size:
            raise ValueError(f"model.moe_group_size={self.moe_group_size} applies to moe_route_scope=group; "
                             "global scope routes all tokens of a micro-step as one problem (set it to 0)")
        return self


class MixtureSourceConfig(_Strict):
    """One component of `data.kind: mixture`: a token dataset and its sampling weight."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str
    weight: float = Field(gt=0)

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        # Made absolute where the config is loaded (the driver): Ray workers run in other
        # directories, and launch.resolve_paths only knows data.path.
        if "://" in path and not path.startswith("file://"):
            return path
        return str(Path(path.removeprefix("file://")).resolve())


class RemoteReadConfig(_Strict):
    # Object-store / http shards (distreg/data/remote.py): ranged reads, at most
    # max_in_flight requests at once per rank, the next readahead_steps steps requested
    # ahead; optional local disk cache of fetched ranges (per rank, LRU, cache_bytes max).
    max_in_flight: int = Field(8, gt=0)
    readahead_steps: int = Field(2, ge=0)
    cache_dir: str | None = None
    cache_bytes: int = Field(0, ge=0)


class DataConfig(_Strict):
    # tokens: one token dataset at `path`; mixture: the token datasets of `sources`;
    # imagenet: a webdataset split (manifest.json) at `path`, e.g. DEST/train.
    kind: Literal["tokens", "imagenet", "mixture"] = "tokens"
    path: str = "data/quickstart_tokens"
    seq_len: int = Field(64, gt=0)
    shuffle: bool = True
    # A truncated token shard, corrupt tar member or undecodable image is an error
    # naming the shard and member/offset; true: skip it, count it (data/skipped_* metrics).
    skip_corrupt: bool = False
    # mixture
    sources: list[MixtureSourceConfig] = []
    # imagenet
    image_size: int = Field(224, gt=0)  # train: RandomResizedCrop; val: resize size*256/224 + centre crop
    transform: Literal["train", "val"] = "train"
    num_workers: int = Field(0, ge=0)  # decode processes per rank (torch DataLoader workers)
    prefetch: int = Field(2, gt=0)  # micro-batches each decode worker prepares ahead
    decode_device: Literal["cpu", "cuda"] = "cpu"  # cuda: batched nvjpeg decode (falls back to cpu without a GPU)
    # Shard checksums (sha256 in index.json) and token-id ranges checked on first read.
    verify: bool = True
    remote: RemoteReadConfig = RemoteReadConfig()

    @model_validator(mode="after")
    def _kind_needs(self) -> "DataConfig":
        if self.kind == "mixture":
            if not self.sources:
                raise ValueError("data.kind=mixture needs data.sources: [{name, path, weight}, ...]")
            names = [s.name for s in self.sources]
            if len(set(names)) != len(names):
                raise ValueError(f"data.sources: names must be unique (got {names})")
        elif self.sources:
            raise ValueError(f"data.sources is only used by data.kind=mixture (kind is {self.kind!r})")
        return self


class MixedPrecisionConfig(_Strict):
    param_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    reduce_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


class StrategyConfig(_Strict):
    name: Literal["ddp", "fsdp2", "deepspeed"] = "fsdp2"
    zero_stage: Literal[1, 2, 3] = 3
    mixed_precision: MixedPrecisionConfig = MixedPrecisionConfig()
    activation_checkpointing: bool = False
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Regional compilation: torch.compile each transformer block (distreg/runtime/compile.py).
    compile: bool = False
    compile_backend: str = "inductor"


class OptimConfig(_Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.0
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class TrainConfig(_Strict):
    max_steps: int = Field(100, gt=0)
    seed: int = 0
    global_batch_size: int = Field(16, gt=0)  # samples per optimizer step, all ranks together
    grad_accum_steps: int = Field(1, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    loss_reduction: Literal["token", "sample"] = "token"
    log_every: int = Field(10, gt=0)
    # Peak FLOP/s of one device for train/mfu, in TFLOP/s (default: the bf16 table in
    # distreg/runtime/mfu.py for A100/H100/H200/B200; MFU is not reported when unknown).
    peak_tflops: float | None = Field(None, gt=0)


class ScalingConfig(_Strict):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    resources_per_worker: dict[str, float] = {}
    max_failures: int = Field(0, ge=-1)
    # A collective that waits longer fails the worker group with a message (a rank that
    # took another branch, a hung peer) instead of hanging for torch's default 30 minutes.
    collective_timeout_s: int = Field(300, gt=0)


class KeepBestConfig(_Strict):
    """Keep the checkpoint with the best held-out metric beside the `keep_last` ones."""

    metric: str = "eval/loss"
    mode: Literal["min", "max"] = "min"


class CheckpointConfig(_Strict):
    # `async` is a Python keyword: the attribute is `async_`, the config key `async`.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              serialize_by_alias=True)

    dir: str | None = None  # default: <run_dir>/checkpoints
    every: int = Field(0, ge=0)  # 0: only at the end
    keep_last: int = Field(2, gt=0)
    keep_best: KeepBestConfig | None = None  # needs `eval:`; candidates: checkpoints taken at an eval step
    # Write in the background (distreg/runtime/async_checkpoint.py); COMPLETE once uploaded.
    async_: bool = Field(False, alias="async")


class EvalSourceConfig(_Strict):
    """One held-out token dataset of a mixture evaluation (metrics per source)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str

    _absolute = field_validator("path")(MixtureSourceConfig._absolute.__func__)


class EvalConfig(_Strict):
    """Held-out evaluation (distreg/runtime/evaluate.py): every sample counted once,
    whatever the world size. Off unless `path` or `sources` is set."""

    # tokens: a token dataset; imagenet: a split with manifest.json (e.g. DEST/val);
    # mixture: `sources` (one held-out dataset per domain). Default: data.kind.
    kind: Literal["tokens", "imagenet", "mixture"] | None = None
    path: str | None = None
    sources: list[EvalSourceConfig] = []
    every: int = Field(0, ge=0)  # steps between evaluations (0: only at the end)
    at_end: bool = True  # evaluate after the last step
    max_samples: int | None = Field(None, gt=0)  # the first N held-out samples (per source for a mixture)
    batch_size: int = Field(8, gt=0)  # samples per rank per forward

    @property
    def enabled(self) -> bool:
        return bool(self.path or self.sources)


class TrackingConfig(_Strict):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite under run_dir
    experiment: str = "distreg"
    run_name: str | None = None


class HookSpec(BaseModel):
    """`{name: ..., **params}`: the params are checked by the hook's own schema."""

    model_config = ConfigDict(extra="allow")
    name: str


class RunConfig(_Strict):
    run_dir: str = "runs/default"
    # A local run_dir on a Ray cluster of several nodes must be a volume every node mounts;
    # say so here (otherwise it is refused). URLs (s3://, gs://) are shared by nature.
    run_dir_shared: bool = False
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    strategy: StrategyConfig = StrategyConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    hooks: list[HookSpec] = []

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> "RunConfig":
        per_step = self.scaling.num_workers * self.train.grad_accum_steps
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not divisible by "
                f"scaling.num_workers * train.grad_accum_steps = {per_step}"
            )
        return self

    @model_validator(mode="after")
    def _lazy_init_needs_sharding(self) -> "RunConfig":
        if self.model.init_device == "meta":
            if self.model.kind != "llama":
                raise ValueError("model.init_device=meta is supported for model.kind=llama only")
            if not (self.strategy.name == "fsdp2" or (self.strategy.name == "deepspeed" and self.strategy.zero_stage == 3)):
                raise ValueError("model.init_device=meta needs strategy.name=fsdp2 or deepspeed with strategy.zero_stage=3 "
                                 f"(got {self.strategy.name}, zero_stage {self.strategy.zero_stage})")
        return self

    @model_validator(mode="after")
    def _deepspeed_checkpoints_are_local(self) -> "RunConfig":
        ckpt_dir = self.checkpoint.dir or self.run_dir
        if self.strategy.name == "deepspeed" and "://" in ckpt_dir and not ckpt_dir.startswith("file://"):
            raise ValueError("checkpoint.dir: DeepSpeed writes checkpoints to a (shared) filesystem path, "
                             f"not to {ckpt_dir!r}; use strategy.name=fsdp2 for object-store checkpoints")
        return self

    @model_validator(mode="after")
    def _mae_images(self) -> "RunConfig":
        if self.model.kind == "mae":
            m = self.model.mae
            if self.data.image_size != m.image_size:
                raise ValueError(f"model.mae.image_size={m.image_size} but data.image_size={self.data.image_size}")
            if m.image_size % m.patch_size:
                raise ValueError(f"model.mae.image_size={m.image_size} is not divisible by model.mae.patch_size")
            if self.eval.enabled:
                raise ValueError("eval: held-out evaluation is not implemented for model.kind=mae")
        return self

    @model_validator(mode="after")
    def _eval_data(self) -> "RunConfig":
        e = self.eval
        kind = e.kind or self.data.kind
        if e.enabled and kind == "mixture" and not e.sources:
            raise ValueError("eval.kind=mixture needs eval.sources: [{name, path}, ...]")
        if e.sources and kind != "mixture":
            raise ValueError(f"eval.sources is only used by eval.kind=mixture (kind is {kind!r})")
        if kind == "mixture" and e.path:
            raise ValueError("eval.path: a mixture evaluation reads eval.sources, not eval.path")
        if self.checkpoint.keep_best is not None and not e.enabled:
            raise ValueError("checkpoint.keep_best needs held-out data: set eval.path (or eval.sources)")
        return self

    @property
    def micro_batch_size(self) -> int:
        """Samples per rank per micro-batch."""
        return self.train.global_batch_size // (self.scaling.num_workers * self.train.grad_accum_steps)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    def flat(self) -> dict[str, Any]:
        """The config as `a.b.c -> value` pairs (MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                for i, v in enumerate(value):
                    walk(f"{prefix}.{i}", v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_path(raw: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{source}: --set {dotted}: no list item {key!r} at {'.'.join(keys[: i + 1])}")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{source}: --set {dotted}: {'.'.join(keys[: i + 1])} is not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        pairs.append((key.strip(), yaml.safe_load(text) if text != "" else None))
    return pairs


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{loc}'")
        else:
            lines.append(f"{source}: key '{loc}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (or defaults when `path` is None), apply `--set` overrides, validate."""
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if raw is None:  # an empty file would silently train the defaults
            raise ConfigError(f"{source}: the config file is empty (no keys); write the run's settings there "
                              "(see configs/quickstart.yaml)")
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a mapping")
    for key, value in parse_overrides(overrides):
        _set_path(raw, key, value, source)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
    if cfg.model.init_from and cfg.model.init_from.startswith("hf://"):
        from distreg.interop.hf_model_config import model_config_from_hf  # lazy: torch

        cfg.model = model_config_from_hf(cfg.model, raw.get("model") or {}, source)
    # Hook names and parameters are checked by their registry (imported lazily:
    # hooks import torch-heavy code the config layer should not need).
    from distreg.hooks.registry import validate_hook_specs

    validate_hook_specs(cfg.hooks, source)
    from distreg.runtime.precision import check_precision

    check_precision(cfg, source)
    return cfg
