"""DeepSpeed ZeRO stage 1/2/3 (the engine owns reduction, accumulation, clipping).

Which copy hooks see (`local_shards`):
- ZeRO-3: the rank's flat partition of each parameter; `data()` reads the fp32 master
  partition through `safe_get_local_fp32_param`, `write()` sets it with
  `safe_set_local_fp32_param` *and* copies into `p.ds_tensor` (the low-precision
  partition the next forward gathers, otherwise refreshed only at the next step), and
  frees a gathered full copy if one is held (persistent small params), so the next
  forward re-gathers the written partitions;
  `grad()` is `safe_get_local_grad` (reduced, averaged slice; only valid between the
  boundary backward and the step), `write_grad()` `safe_set_local_grad` (fp32 and
  bf16; under fp16 the gradient is still loss-scaled there).
- ZeRO-1/2: parameters are replicated for the forward; `data()` reads the forward copy
  (equal to the fp32 master in fp32 training), `write()` writes the forward copy and
  this rank's fragment of the fp32 master (`safe_set_full_fp32_param`, local).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from distreg.hooks.base import ParamShard
from distreg.runtime.optim import build_optimizer, lr_lambda
from distreg.runtime.strategies.base import Strategy


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    @property
    def sharded(self) -> bool:
        return self.cfg.strategy.zero_stage == 3

    def ds_config(self) -> dict:
        cfg, mp = self.cfg, self.cfg.strategy.mixed_precision
        return {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": cfg.train.grad_accum_steps,
            "train_batch_size": cfg.train.global_batch_size,
            "gradient_clipping": cfg.train.grad_clip or 0.0,
            "zero_optimization": {"stage": cfg.strategy.zero_stage},
            "bf16": {"enabled": mp.param_dtype == "bf16"},
            "fp16": {"enabled": mp.param_dtype == "fp16"},
            # Gradient reduction dtype (FSDP2's reduce_dtype); DeepSpeed's default follows
            # the parameters (bf16 reductions under bf16).
            "communication_data_type": mp.reduce_dtype,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def create_model(self, build, lazy: bool) -> nn.Module:
        if not (lazy and self.sharded):
            return build("cpu", True)
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if self.device.type == "cpu" else "cuda")
        import deepspeed
        import torch.distributed as dist

        # zero.Init reads the world size from deepspeed.comm: attach it to our (already
        # initialised) process group first, or a fresh process sees a world of 1.
        if dist.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        # Parameters are partitioned as each module is constructed: the whole model never
        # exists on one rank. Values come from `materialize` after initialize().
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config()):
            return build("cpu", False)

    def setup(self, model: nn.Module) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if self.device.type == "cpu" else "cuda")
        import deepspeed

        optimizer = build_optimizer(model, self.cfg.optim)
        schedule = lr_lambda(self.cfg.optim, self.cfg.train.max_steps)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model.to(self.device),
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=self.ds_config(),
            dist_init_required=False,
        )
        self.module = self.model.module

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        # The loss is already normalised over the whole optimizer step: no 1/GAS scaling.
        self.model.backward(loss, scale_wrt_gas=False)
        if not last_micro:
            # Advances the engine's micro-step counter; no update off the boundary.
            self.model.step()

    def step(self) -> float:
        # Called once per optimizer step, after the last micro-batch's backward: the
        # engine's micro-step counter is at the accumulation boundary here.
        self.model.step()
        norm = self.model.get_global_grad_norm()  # the engine's own (it read it back already)
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float64)

    def lr(self) -> float:
        return self.model.get_lr()[0]

    def save(self, path: str) -> None:
        self.model.save_checkpoint(path, tag="engine", save_latest=False)

    def load(self, path: str) -> None:
        loaded, _ = self.model.load_checkpoint(path, tag="engine", load_module_strict=True,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")

    def local_shards(self) -> list[ParamShard]:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_grad,
            safe_set_local_fp32_param,
            safe_set_local_grad,
        )

        out = []
        rank = self.comm.rank
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if not self.sharded:
                out.append(self._replicated_shard(name, p))
                continue
            part = p.ds_tensor.numel()  # padded partition length, equal on every rank
            start = rank * part
            n = max(0, min(part, p.ds_numel - start))

            def write(v, p=p, n=n):
                full = safe_get_local_fp32_param(p).clone()
                full[:n] = v
                safe_set_local_fp32_param(p, full)
                p.ds_tensor.data.view(-1)[:n].copy_(v.to(p.ds_tensor.dtype))
                if p.ds_status == ZeroParamStatus.AVAILABLE:
                    # A gathered full copy (persistent params, below
                    # stage3_param_persistence_threshold, stay gathered between steps and are
                    # re-gathered only at the end of the next step) would keep the old values
                    # for the next forward: free it so that forward gathers the new partitions.
                    p.partition(has_been_updated=False)

            def grad(p=p, n=n):
                g = safe_get_local_grad(p)
                return None if g is None else g.view(-1)[:n]

            def write_grad(v, p=p, n=n):
                full = safe_get_local_grad(p).clone()
                full.view(-1)[:n] = v
                safe_set_local_grad(p, full)

            out.append(ParamShard(
                name, p.ds_shape, start if n else 0, n, False,
                _read=lambda p=p, n=n: safe_get_local_fp32_param(p).view(-1)[:n],
                _write=write, _grad=grad, _write_grad=write_grad,
            ))
        return out

    @staticmethod
    def _replicated_shard(name: str, p: torch.nn.Parameter) -> ParamShard:
        from deepspeed.utils import safe_get_full_grad, safe_set_full_fp32_param

        flat = p.data.view(-1)

        def write(v, p=p, flat=flat):
            flat.copy_(v)
            safe_set_full_fp32_param(p, v.view(p.shape).float())

        return ParamShard(
            name, p.shape, 0, p.numel(), True,
            _read=lambda: flat, _write=write,
            # Collective under ZeRO-1/2 (an all-reduce of fragments): all ranks must call it.
            _grad=lambda p=p: (lambda g: None if g is None else g.view(-1))(safe_get_full_grad(p)),
        )
