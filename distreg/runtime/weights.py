"""Whole-model weights from a distreg checkpoint, in one process, whatever the strategy.

Tools that start from a trained model (`distreg prune dsnot`, a distillation teacher, SVD
adapters, merges) need the plain, unsharded weights of a checkpoint written by a
multi-rank run. The two on-disk formats are read with their libraries' own offline
readers, no process group needed:

- ddp / fsdp2: the DCP directory `step_N/model` (`.metadata` + per-rank shards). DCP's
  `no_dist` load with an empty planner assembles every tensor whole; only the `model.*`
  keys are read, not the optimizer moments.
- deepspeed (ZeRO 1-3): `step_N/model/engine`, consolidated by DeepSpeed's
  `zero_to_fp32` (the fp32 master partitions of all ranks concatenated).

Names are the model's own (`layers.0.attention.wq.weight`, ...), as `build_model` gives
them, so `model.load_state_dict(load_model_weights(path))` works on a fresh model.
`init_shards_from` writes such weights (or a torch.save'd state dict) into a sharded
model's local shards: `model.init_from`.
"""
from __future__ import annotations

import os
import posixpath

import fsspec
import torch

from distreg.runtime.checkpoint import MARKER, latest_checkpoint


class CheckpointError(ValueError):
    pass


def resolve_checkpoint(path: str) -> str:
    """A complete `step_N` directory: `path` itself, or the latest one under `path` (a
    checkpoint root such as `<run_dir>/checkpoints`)."""
    fs, local = fsspec.core.url_to_fs(path)
    if fs.exists(posixpath.join(local, MARKER)):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (a step_N directory with a {MARKER} marker)")
    return found[1]


def load_model_weights(path: str) -> dict[str, torch.Tensor]:
    """Full fp32 tensors of the model saved at `path` (a step directory or a checkpoint
    root), keyed by parameter name."""
    step_dir = resolve_checkpoint(path)
    model_dir = posixpath.join(step_dir, "model")
    fs, local = fsspec.core.url_to_fs(model_dir)
    if fs.exists(posixpath.join(local, "engine")):
        return _deepspeed_weights(model_dir)
    if fs.exists(posixpath.join(local, ".metadata")):
        return _dcp_weights(model_dir)
    raise CheckpointError(f"{model_dir}: neither a DCP checkpoint (.metadata) nor a DeepSpeed one (engine/)")


def _dcp_weights(model_dir: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from distreg.runtime.strategies.torch_native import _storage

    state: dict = {}
    _load_state_dict(state, storage_reader=_storage(model_dir, False), planner=_EmptyStateDictLoadPlanner(keys={"model"}),
                     no_dist=True)
    if "model" not in state:
        raise CheckpointError(f"{model_dir}: the DCP checkpoint has no 'model' entry")
    return {name: t.float() for name, t in state["model"].items() if isinstance(t, torch.Tensor)}


def _deepspeed_weights(model_dir: str) -> dict[str, torch.Tensor]:
    if "://" in model_dir and not model_dir.startswith("file://"):
        raise CheckpointError(f"{model_dir}: DeepSpeed checkpoints are read from a local path; copy it first")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(os.fspath(model_dir.removeprefix("file://")), tag="engine")
    return {name: t.float() for name, t in state.items()}


def load_into(model: torch.nn.Module, path: str) -> None:
    """Load a checkpoint's weights into a whole (unsharded) model; a missing or extra
    parameter is an error naming it."""
    weights = load_model_weights(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise CheckpointError(f"{path}: checkpoint does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, t in weights.items():
        if own[name].shape != t.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)} in the checkpoint, "
                                  f"{tuple(own[name].shape)} in the model")
    model.load_state_dict(weights)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict file (memory-mapped, so ranks on one node share the
    pages), or the weights of a distreg checkpoint directory."""
    fs, local = fsspec.core.url_to_fs(path)
    if fs.isfile(local):
        if "://" in path and not path.startswith("file://"):
            with fs.open(local, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        return torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    return load_model_weights(path)


def init_shards_from(shards, path: str) -> None:
    """Write the weights at `path` into this rank's local shards (`ParamShard`s); called
    on every rank (the writes are collective under ZeRO-3). Every trainable parameter
    must be there with its full shape; extra entries (buffers, other heads) are ignored.
    `hf://DIR`: a Hugging Face Llama directory, read slice by slice (distreg.interop)."""
    if path.startswith("hf://"):
        from distreg.interop.hf_import import init_shards_from_hf

        return init_shards_from_hf(shards, path)
    write_shards(shards, read_weights(path), f"model.init_from={path}")


def write_shards(shards, weights: dict[str, torch.Tensor], source: str) -> None:
    """Write each shard's range of the full tensors in `weights` (name -> tensor);
    a missing or wrongly sized tensor is a CheckpointError naming `source`."""
    for shard in shards:
        if shard.name not in weights:
            raise CheckpointError(f"{source}: no weights for parameter {shard.name}")
        full = weights[shard.name].reshape(-1)
        if full.numel() != shard.full_shape.numel():
            raise CheckpointError(f"{source}: {shard.name} has {full.numel()} values, "
                                  f"the model's has {shard.full_shape.numel()} ({tuple(shard.full_shape)})")
        shard.write(full[shard.flat_start:shard.flat_start + shard.numel].to(shard.data().dtype))
