"""Precision settings each strategy can honour, checked at config time.

What each strategy does with `strategy.mixed_precision`:
- fsdp2: `MixedPrecisionPolicy(param_dtype, reduce_dtype)` (fp32 master weights).
- ddp: `torch.autocast(param_dtype)` around forward and loss (bf16); gradients are
  reduced in fp32 (the parameters' dtype), so reduce_dtype must be fp32.
- deepspeed: its bf16 / fp16 engine (`bf16.enabled` / `fp16.enabled`) with
  `communication_data_type = reduce_dtype`.
fp16 needs loss scaling: DeepSpeed scales dynamically (but then the gradients hooks see
in after_backward are scaled, so gradient-writing hooks are refused); fsdp2 and ddp have
no scaler wired in and refuse fp16 (use bf16, which needs none).
"""
from __future__ import annotations


def check_precision(cfg, source: str = "<config>") -> None:
    """Raise ConfigError (one line naming the fields) for a combination that would
    train with wrong numbers; called before any compute is spent."""
    from distreg.config import ConfigError

    mp, name = cfg.strategy.mixed_precision, cfg.strategy.name
    if mp.param_dtype == "fp16" and name in ("fsdp2", "ddp"):
        raise ConfigError(f"{source}: strategy.mixed_precision.param_dtype=fp16 with strategy.name={name}: fp16 needs "
                          "gradient scaling, which this strategy does not do; use bf16 (or strategy.name=deepspeed)")
    if name == "ddp" and mp.reduce_dtype != "fp32":
        raise ConfigError(f"{source}: strategy.mixed_precision.reduce_dtype={mp.reduce_dtype} with strategy.name=ddp: "
                          "DDP reduces gradients in the parameters' dtype (fp32); set reduce_dtype: fp32")
    if name == "deepspeed" and mp.param_dtype == "fp16":
        from distreg.hooks.registry import hook_class

        writers = [h.name for h in cfg.hooks if hook_class(h.name).writes_gradients]
        if writers:
            raise ConfigError(f"{source}: hooks {writers} edit gradients, which DeepSpeed fp16 keeps loss-scaled: "
                              "use strategy.mixed_precision.param_dtype=bf16 or fp32")
