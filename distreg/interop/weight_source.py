"""Tensor-at-a-time reads of a distreg checkpoint, for streaming export.

`runtime.weights.load_model_weights` assembles a whole model; a 7B export must not. Here
each source gives the parameter shapes up front and one full fp32 tensor per `get`:

- a torch.save'd state dict (`model.pt` of `prune dsnot` / `adapters merge`): loaded
  memory-mapped, so only the pages of the tensor being converted are resident;
- ddp / fsdp2 DCP directories: the metadata gives the shapes, and each `get` is a DCP
  `no_dist` load of that one tensor (assembled from every rank's chunks);
- DeepSpeed: `zero_to_fp32` in lazy mode (ZeRO-3: rank files memory-mapped, one tensor
  gathered per `get`; ZeRO-1/2: DeepSpeed's reader merges the flat fp32 groups first).
"""
from __future__ import annotations

import os
import posixpath
import re
import warnings

import fsspec
import torch

from distreg.runtime.weights import CheckpointError, resolve_checkpoint


class WeightSource:
    path: str
    step: int | None
    shapes: dict[str, torch.Size]

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class StateDictFile(WeightSource):
    def __init__(self, path: str):
        self.path, self.step = path, None
        local = path.removeprefix("file://")
        if "://" in local:
            raise CheckpointError(f"{path}: a state-dict file is read from a local path; copy it first")
        self.state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        self.shapes = {k: v.shape for k, v in self.state.items() if isinstance(v, torch.Tensor)}

    def get(self, name: str) -> torch.Tensor:
        return self.state[name].float()


class DCPSource(WeightSource):
    def __init__(self, step_dir: str, model_dir: str):
        from distreg.runtime.strategies.torch_native import _storage

        self.path, self.model_dir, self._storage = step_dir, model_dir, _storage
        metadata = _storage(model_dir, False).read_metadata()
        self.shapes = {key.removeprefix("model."): meta.size for key, meta in metadata.state_dict_metadata.items()
                       if key.startswith("model.") and hasattr(meta, "chunks")}
        self.step = _step_of(step_dir)

    def get(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        out = torch.empty(self.shapes[name], dtype=torch.float32)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": {name: out}}, storage_reader=self._storage(self.model_dir, False), no_dist=True)
        return out


class DeepSpeedSource(WeightSource):
    def __init__(self, step_dir: str, model_dir: str):
        if "://" in model_dir and not model_dir.startswith("file://"):
            raise CheckpointError(f"{model_dir}: DeepSpeed checkpoints are read from a local path; copy it first")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        self.path, self.step = step_dir, _step_of(step_dir)
        self.state = get_fp32_state_dict_from_zero_checkpoint(os.fspath(model_dir.removeprefix("file://")),
                                                              tag="engine", lazy_mode=True)
        self.shapes = {k: torch.Size(v.shape) for k, v in self.state.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.state[name].contiguous().float()


def _step_of(step_dir: str) -> int | None:
    m = re.fullmatch(r"step_(\d+)", posixpath.basename(step_dir.rstrip("/")))
    return int(m.group(1)) if m else None


def open_weights(path: str) -> WeightSource:
    """A state-dict file, a step directory or a checkpoint root (its latest step)."""
    fs, local = fsspec.core.url_to_fs(path)
    if fs.isfile(local):
        return StateDictFile(path)
    step_dir = resolve_checkpoint(path)
    model_dir = posixpath.join(step_dir, "model")
    fs, local = fsspec.core.url_to_fs(model_dir)
    if fs.exists(posixpath.join(local, "engine")):
        return DeepSpeedSource(step_dir, model_dir)
    if fs.exists(posixpath.join(local, ".metadata")):
        return DCPSource(step_dir, model_dir)
    raise CheckpointError(f"{model_dir}: neither a DCP checkpoint (.metadata) nor a DeepSpeed one (engine/)")
