"""`model.init_from: hf://DIR`: each rank's shards initialised from an HF Llama directory.

Every rank reads only the rows its shards cover (FSDP2: its `Shard(0)` rows; ZeRO-3: the
rows its flat partition touches; DDP / ZeRO-1/2: everything), straight from the
safetensors files, so a 7B start never holds a whole model in one process. The q / k
projections are stored in HF's half-split rotary layout; a rank reads the whole heads its
rows fall in (at most one partial head at each end extra) and permutes them back to
distreg's interleaved layout (`distreg.interop.hf_config`).

Everything is checked before the first value is read: every parameter has its tensor,
with the model's shape (errors name the file and the tensor). HF's tied embeddings
(`tie_word_embeddings`, no lm_head tensor) initialise distreg's separate output head
from the input embeddings.
"""
from __future__ import annotations

import torch

from distreg.interop.hf_config import HFFormatError, from_hf_layout, hf_name, read_hf_config
from distreg.interop.safetensors_dir import SafetensorsDir

PREFIX = "hf://"


def hf_directory(init_from: str) -> str:
    return init_from.removeprefix(PREFIX)


def _rotary_heads(name: str, cfg: dict) -> int | None:
    if name.endswith("attention.wq.weight"):
        return cfg["num_attention_heads"]
    if name.endswith("attention.wk.weight"):
        return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return None


def _read_flat(files: SafetensorsDir, tensor: str, shape: torch.Size, heads: int | None, start: int,
               numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of the flattened distreg-layout tensor."""
    if numel == 0:
        return torch.empty(0)
    cols = 1 if len(shape) == 1 else shape[1]
    r0, r1 = start // cols, -(-(start + numel) // cols)
    if heads is not None:  # whole heads: the rotary permutation stays inside a head
        per_head = shape[0] // heads
        h0, h1 = r0 // per_head, -(-r1 // per_head)
        r0, r1 = h0 * per_head, h1 * per_head
        block = from_hf_layout(files.rows(tensor, r0, r1), h1 - h0)
    else:
        block = files.rows(tensor, r0, r1)
    offset = start - r0 * cols
    return block.reshape(-1)[offset:offset + numel]


def init_shards_from_hf(shards, init_from: str) -> None:
    """Write the HF directory's weights into this rank's `ParamShard`s (every rank calls
    it, for every shard: the writes are collective under ZeRO-3)."""
    directory = hf_directory(init_from)
    cfg = read_hf_config(directory)
    files = SafetensorsDir(directory)
    sources = {}
    for shard in shards:  # check everything before reading any value
        tensor = hf_name(shard.name)
        if tensor == "lm_head.weight" and tensor not in files and cfg.get("tie_word_embeddings"):
            tensor = "model.embed_tokens.weight"
        if tensor not in files:
            raise HFFormatError(f"model.init_from={init_from}: no tensor {tensor} (for parameter {shard.name}) "
                                f"in {directory}")
        shape = files.shape(tensor)
        if shape != tuple(shard.full_shape):
            raise HFFormatError(f"{files.file_of(tensor)}: tensor {tensor} has shape {shape}, the model's "
                                f"{shard.name} has {tuple(shard.full_shape)}")
        sources[shard.name] = tensor
    for shard in shards:
        values = _read_flat(files, sources[shard.name], shard.full_shape, _rotary_heads(shard.name, cfg),
                            shard.flat_start, shard.numel)
        shard.write(values.to(shard.data().dtype))


def whole_model_shards(model: torch.nn.Module) -> list:
    """`ParamShard`s covering a plain (unsharded) module's parameters whole."""
    from distreg.hooks.base import ParamShard

    out = []
    for name, p in model.named_parameters():
        flat = p.data.view(-1)
        out.append(ParamShard(name, p.shape, 0, p.numel(), True, _read=lambda flat=flat: flat,
                              _write=lambda v, flat=flat: flat.copy_(v), _grad=lambda: None))
    return out


def load_hf_into(model: torch.nn.Module, directory: str) -> None:
    """Load an HF Llama directory into a whole distreg model in one process."""
    init_shards_from_hf(whole_model_shards(model), PREFIX + directory.removeprefix(PREFIX))
