"""A Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

Kept deliberately plain (one file, no fused kernels) so that every strategy (DDP,
FSDP2 per block, ZeRO-3) shards the same modules; `model.layers` is the list of
transformer blocks FSDP2 wraps one by one.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distreg.models.dice import ZERO_INIT_SUFFIXES as DICE_ZERO_INIT
from distreg.models.dice import Dice
from distreg.models.recompute import checkpointed

FFN_ACTIVATIONS = ("swiglu", "dice")


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # Dense feed-forward: "swiglu" w2(silu(w1 x) * w3 x) or "dice" w2(Dice(w1 x)) (FeedForward).
    ffn_activation: str = "swiglu"
    # Mixture of experts (distreg.models.moe): blocks in `moe_layers` get an MoE feed-forward.
    moe_num_experts: int = 0
    moe_top_k: int = 2
    moe_capacity_factor: float = 1.25
    moe_layers: tuple[int, ...] = ()
    moe_router: str = "topk"
    moe_aux_loss_coef: float = 0.0
    moe_z_loss_coef: float = 0.0
    moe_group_size: int = 0
    moe_ffn_dim: int | None = None
    moe_route_scope: str = "group"

    def num_params(self) -> int:
        head_dim = self.dim // self.n_heads
        attn = self.dim * head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        # SwiGLU: w1, w3, w2; Dice: w1, w2 and one alpha per hidden unit
        ffn = (3 * self.dim if self.ffn_activation == "swiglu" else 2 * self.dim + 1) * self.ffn_dim
        block = attn + ffn + 2 * self.dim
        moe = len(self.moe_layers) * (self.moe_num_experts * (3 * self.dim * (self.moe_ffn_dim or self.ffn_dim)
                                                              + self.dim) - ffn)
        return self.n_layers * block + moe + 2 * self.vocab_size * self.dim + self.dim


PRESETS: dict[str, dict] = {
    # Small enough for CPU tests: ~0.2M parameters.
    "llama-tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=256),
    "llama-small": dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1408, max_seq_len=1024),
    # Llama-2-7B (Touvron et al. 2023): 6.74B parameters.
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=4096),
}


def llama_args(preset: str | None, **overrides) -> LlamaArgs:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; known: {sorted(PRESETS)}")
    values = dict(PRESETS[preset]) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len") if k not in values]
    if missing:
        raise ValueError(f"model: no preset given and missing {', '.join('model.' + m for m in missing)}")
    values.setdefault("n_kv_heads", values["n_heads"])
    layers = values.get("moe_layers", ())
    if values.get("moe_num_experts"):
        layers = tuple(range(values["n_layers"])) if layers == "all" else tuple(sorted(layers))
        if layers and layers[-1] >= values["n_layers"]:
            raise ValueError(f"model.moe_layers: block index {layers[-1]} out of range (model.n_layers="
                             f"{values['n_layers']})")
    else:
        layers = ()
    values["moe_layers"] = layers
    args = LlamaArgs(**values)
    if args.ffn_activation not in FFN_ACTIVATIONS:
        raise ValueError(f"model.ffn_activation: unknown activation {args.ffn_activation!r}; known: {FFN_ACTIVATIONS}")
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads:
        raise ValueError("model.dim must be divisible by model.n_heads, and n_heads by n_kv_heads")
    return args


def init_values(name: str, shape: torch.Size, seed: int, std: float) -> torch.Tensor:
    """The initial value of parameter `name`: ones for vectors (norm weights),
    normal(0, std) for matrices from a generator keyed by (seed, name).

    Keying by name makes a sharded model initialised on the meta device, one parameter
    at a time, bitwise equal to the same model initialised whole in one process.
    Dice's per-feature alpha (and beta) start at zero, as in the DIN repository.
    """
    if name.endswith(DICE_ZERO_INIT):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, std, generator=g)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [batch, seq, heads, head_dim]; rotate interleaved pairs (x0, x1) -> (x0 c - x1 s, x0 s + x1 c)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, a.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (`ffn_activation="swiglu"`), or w2(Dice(w1 x))
    (`"dice"`): DIN puts Dice after a plain linear layer, so the Dice FFN has no gate w3
    (2/3 of SwiGLU's FFN weights at the same ffn_dim, plus one alpha per hidden unit) and
    normalises each hidden unit over the global batch's tokens (`distreg.models.dice`)."""

    def __init__(self, a: LlamaArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.ffn_dim, bias=False)
        if a.ffn_activation == "dice":
            self.dice = Dice(a.ffn_dim)
        else:
            self.w3 = nn.Linear(a.dim, a.ffn_dim, bias=False)
        self.w2 = nn.Linear(a.ffn_dim, a.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "dice"):
            return self.w2(self.dice(self.w1(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a: LlamaArgs, moe: bool = False):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        if moe:
            from distreg.models.moe import MoEFeedForward

            # Tokens an expert drops get 0 here: they pass through the residual below.
            self.feed_forward = MoEFeedForward(
                a.dim, a.moe_ffn_dim or a.ffn_dim, a.moe_num_experts, a.moe_top_k, a.moe_capacity_factor,
                a.moe_group_size, a.moe_router, a.moe_aux_loss_coef, a.moe_z_loss_coef, a.moe_route_scope)
        else:
            self.feed_forward = FeedForward(a)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i in args.moe_layers) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.activation_checkpointing = False
        # RoPE tables are recomputed, never checkpointed, and not parameters.
        cos, sin = rope_tables(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int) -> None:
        """Deterministic init, parameter by parameter (see `init_values`)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(init_values(name, p.shape, seed, self.args.init_std))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute the RoPE tables (after `to_empty` on a model built on meta)."""
        cos, sin = rope_tables(self.args.dim // self.args.n_heads, self.args.max_seq_len, self.args.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        for mod in self.modules():
            if isinstance(mod, Dice):  # running statistics (buffers): fresh, as at construction
                mod.reset_running_stats()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.args.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.args.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.tok_embeddings(tokens)
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpointed(block, x, cos, sin)
            else:
                x = block(x, cos, sin)
        return self.output(self.norm(x))
