"""Model construction from config."""
from __future__ import annotations

import torch
from torch import nn

from distreg.config import ModelConfig
from distreg.models.llama import Llama, llama_args


def build_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """Build and initialise the model; identical on every rank for the same seed.

    `device="meta"` builds the structure without allocating weights (for planning and
    for very large models that are materialised shard by shard after sharding).
    """
    if cfg.kind == "llama":
        args = llama_args(
            cfg.preset, vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads, ffn_dim=cfg.ffn_dim, max_seq_len=cfg.max_seq_len, norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta, init_std=cfg.init_std,
        )
        with torch.device(device):
            model = Llama(args)
        if str(device) != "meta":
            model.init_weights(torch.Generator(device=device).manual_seed(seed))
        return model
    import torchvision

    torch.manual_seed(seed)
    with torch.device(device):
        return torchvision.models.get_model(cfg.arch, num_classes=cfg.num_classes)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards individually (one all-gather per block)."""
    if isinstance(model, Llama):
        return list(model.layers)
    return []
