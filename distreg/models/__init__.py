"""Model construction from config."""
from __future__ import annotations

import torch
from torch import nn

from distreg.config import ModelConfig
from distreg.models.llama import Llama, llama_args


def build_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu", init: bool = True) -> nn.Module:
    """Build and initialise the model; identical on every rank for the same seed.

    `device="meta"` (or `init=False`) builds the structure without initialising
    weights: for planning, and for large models that are sharded first and then
    initialised slice by slice (`materialize`).
    """
    if cfg.kind == "llama":
        args = llama_args(
            cfg.preset, vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads, ffn_dim=cfg.ffn_dim, max_seq_len=cfg.max_seq_len, norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta, init_std=cfg.init_std, ffn_activation=cfg.ffn_activation,
            **({} if not cfg.moe_num_experts else dict(
                moe_num_experts=cfg.moe_num_experts, moe_top_k=cfg.moe_top_k,
                moe_capacity_factor=cfg.moe_capacity_factor, moe_layers=cfg.moe_layers, moe_router=cfg.moe_router,
                moe_aux_loss_coef=cfg.moe_aux_loss_coef, moe_z_loss_coef=cfg.moe_z_loss_coef,
                moe_group_size=cfg.moe_group_size, moe_ffn_dim=cfg.moe_ffn_dim, moe_route_scope=cfg.moe_route_scope)),
        )
        with torch.device(device):
            model = Llama(args)
        if init and str(device) != "meta":
            model.init_weights(seed)
        return model
    if cfg.kind == "mae":
        from distreg.models.mae import build_mae

        return build_mae(cfg.mae, device, init, seed)
    import torchvision

    torch.manual_seed(seed)
    with torch.device(device):
        return torchvision.models.get_model(cfg.arch, num_classes=cfg.num_classes)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards individually (one all-gather per block)."""
    if isinstance(model, Llama):
        return list(model.layers)
    return []


def materialize(shards, seed: int, std: float) -> None:
    """Initialise a model that was built without weights (meta device / ZeRO-3
    partitioned), one parameter at a time: each rank writes its own slice of the
    values `init_values` gives the whole parameter, so the result equals a
    whole-model init in one process."""
    from distreg.models.llama import init_values

    for shard in shards:
        full = init_values(shard.name, shard.full_shape, seed, std).view(-1)
        shard.write(full[shard.flat_start : shard.flat_start + shard.numel])
