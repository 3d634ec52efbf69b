"""DDP and FSDP2: PyTorch-native strategies, checkpointed with torch.distributed.checkpoint."""
from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from distreg.hooks.base import ParamShard
from distreg.models import transformer_blocks
from distreg.models.moe import shard_experts
from distreg.runtime.optim import build_optimizer, build_scheduler
from distreg.runtime.strategies.base import DTYPES, Strategy


def _storage(path: str, write: bool):
    """DCP storage for a local path or any fsspec URL."""
    if "://" in path and not path.startswith("file://"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        return FsspecWriter(path) if write else FsspecReader(path)
    path = path.removeprefix("file://")
    return dcp.FileSystemWriter(path) if write else dcp.FileSystemReader(path)


class _TorchStrategy(Strategy):
    def _build_optim(self) -> None:
        self.optimizer = build_optimizer(self.module, self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.train.max_steps)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        clip = self.cfg.train.grad_clip or float("inf")
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=None)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()  # the one reduction of the norm (FSDP2: partial sums)
        if clip != float("inf"):
            # Scales by min(1, clip / norm) on the device: no host read, no second reduction.
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm, foreach=None)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()  # on the device: read back on logging steps only

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, path: str) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        # The schedule is replicated: DCP stores its (non-tensor) state once.
        state = {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict()}
        dcp.save(state, storage_writer=_storage(path, True))

    def load(self, path: str) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict()}
        dcp.load(state, storage_reader=_storage(path, False))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])


class DDPStrategy(_TorchStrategy):
    """Replicated parameters; gradients averaged by DDP (plain module on 1 rank)."""

    name, sharded = "ddp", False

    def setup(self, model: nn.Module) -> None:
        self.module = model.to(self.device)
        if self.comm.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.module, device_ids=[self.device] if self.device.type == "cuda" else None)
        else:
            self.model = self.module
        self._build_optim()

    def accumulation_context(self, last_micro: bool):
        import contextlib

        stack = contextlib.ExitStack()
        if not last_micro and hasattr(self.model, "no_sync"):
            stack.enter_context(self.model.no_sync())
        dtype = DTYPES[self.cfg.strategy.mixed_precision.param_dtype]
        if dtype != torch.float32:
            # bf16 compute over fp32 weights (fp16 is refused at config time: no scaler).
            stack.enter_context(torch.autocast(self.device.type, dtype=dtype))
        return stack

    def local_shards(self) -> list[ParamShard]:
        out = []
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                flat = p.data.view(-1)
                out.append(ParamShard(
                    name, p.shape, 0, p.numel(), True,
                    _read=lambda flat=flat: flat,
                    _write=lambda v, flat=flat: flat.copy_(v),
                    _grad=lambda p=p: None if p.grad is None else p.grad.view(-1),
                    _write_grad=lambda v, p=p: p.grad.view(-1).copy_(v),
                ))
        return out


class FSDP2Strategy(_TorchStrategy):
    """`fully_shard` on every transformer block and the root; parameters are DTensors
    sharded by rows (`Shard(0)`), kept in fp32 and cast by the mixed-precision policy."""

    name, sharded = "fsdp2", True

    def create_model(self, build, lazy: bool) -> nn.Module:
        return build("meta", False) if lazy else build("cpu", True)

    def setup(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = self.cfg.strategy.mixed_precision
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[mp.param_dtype], reduce_dtype=DTYPES[mp.reduce_dtype])
        mesh = init_device_mesh(self.device.type, (self.comm.world_size,))
        if not any(p.is_meta for p in model.parameters()):
            model = model.to(self.device)
        # MoE: expert weights become DTensors Shard(0) over the experts (expert
        # parallelism, distreg.models.moe) and stay out of FSDP's own sharding and
        # gradient averaging. Dense models: `experts` is empty, nothing changes.
        experts = shard_experts(model, mesh)
        for block in transformer_blocks(model):
            ignored = {p for p in block.parameters() if any(p is e for e in experts)}
            fully_shard(block, mesh=mesh, mp_policy=policy, **({"ignored_params": ignored} if ignored else {}))
        fully_shard(model, mesh=mesh, mp_policy=policy, **({"ignored_params": experts} if experts else {}))
        if any(p.is_meta for p in model.parameters()):
            # Allocate only this rank's shards; values come from `materialize`.
            model.to_empty(device=self.device)
            model.reset_buffers()
        self.module = self.model = model
        self._build_optim()

    def accumulation_context(self, last_micro: bool):
        # Reduce-scatter gradients once per optimizer step, not per micro-batch.
        self.model.set_requires_gradient_sync(last_micro)
        return super().accumulation_context(last_micro)

    def local_shards(self) -> list[ParamShard]:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        out = []
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            local = p.detach().to_local()  # shares storage with the sharded parameter
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            row = p.shape[1:].numel()
            flat = local.view(-1)
            out.append(ParamShard(
                name, p.shape, offset[0] * row if local.numel() else 0, local.numel(), False,
                _read=lambda flat=flat: flat,
                _write=lambda v, flat=flat: flat.copy_(v),
                _grad=lambda p=p: None if p.grad is None else p.grad.to_local().view(-1),
                _write_grad=lambda v, p=p: p.grad.to_local().view(-1).copy_(v),
            ))
        return out
