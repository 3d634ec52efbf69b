"""The correspondence between distreg's Llama and Hugging Face's `LlamaForCausalLM`:
config fields, parameter names and the rotary layout of the q / k projections.

Supported HF architecture: `LlamaForCausalLM` (model_type "llama", SiLU gated MLP, no
biases, default RoPE). Not exported: MoE models (distreg's experts, router and capacity
have no HF Llama counterpart; Mixtral's router differs) and the Dice feed-forward.

Rotary layout. distreg rotates *interleaved* pairs of a head's dimensions, (2i, 2i+1)
at frequency i (`apply_rope`); HF rotates *half-split* pairs (i, i + d/2) (`rotate_half`).
The two models agree once the output rows of wq / wk are permuted within each head:
HF row h*d + p*d/2 + i = distreg row h*d + 2i + p (p in {0, 1}); the attention scores
are unchanged because q and k are permuted alike. This is the permutation of HF's own
`convert_llama_weights_to_hf.py` (Meta checkpoints use distreg's interleaved layout).
"""
from __future__ import annotations

import json
import posixpath

import fsspec
import torch

from distreg.models.llama import LlamaArgs

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFFormatError(ValueError):
    """An HF directory, file or tensor that does not fit; the message names it."""


# distreg name suffix -> HF name suffix, per block
_BLOCK_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def check_exportable(args: LlamaArgs) -> None:
    if args.moe_num_experts:
        raise HFFormatError(f"HF export: MoE models (model.moe_num_experts={args.moe_num_experts}) have no matching "
                            f"HF architecture here; supported: {', '.join(SUPPORTED_ARCHITECTURES)} (dense)")
    if args.ffn_activation != "swiglu":
        raise HFFormatError(f"HF export: model.ffn_activation={args.ffn_activation!r} has no HF Llama counterpart "
                            "(HF Llama's MLP is SwiGLU)")


def hf_name(name: str) -> str:
    """HF's name of distreg parameter `name`."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        if rest in _BLOCK_NAMES:
            return f"model.layers.{index}.{_BLOCK_NAMES[rest]}"
    raise HFFormatError(f"HF export: parameter {name} has no HF Llama counterpart")


def rotary_heads(name: str, args: LlamaArgs) -> int | None:
    """Number of heads whose rows need the rotary permutation (wq, wk), else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf_layout(w: torch.Tensor, heads: int | None) -> torch.Tensor:
    """distreg's interleaved rotary rows -> HF's half-split ones (identity for heads=None)."""
    if heads is None:
        return w
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_layout(w: torch.Tensor, heads: int | None) -> torch.Tensor:
    """HF's half-split rotary rows -> distreg's interleaved ones (inverse of `to_hf_layout`)."""
    if heads is None:
        return w
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config_dict(args: LlamaArgs, dtype: str, eos_id: int | None = None, bos_id: int | None = None) -> dict:
    """config.json of the exported model (LlamaConfig fields); no transformers needed."""
    try:
        import transformers

        version = transformers.__version__
    except ImportError:
        version = None
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.dim // args.n_heads, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
        # both spellings: transformers >= 5 reads rope_parameters, 4.x (vLLM, lm-eval pins) rope_theta
        "rope_theta": args.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "tie_word_embeddings": False,  # distreg trains separate input and output embeddings
        "attention_bias": False, "mlp_bias": False, "initializer_range": args.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": dtype, "torch_dtype": dtype,
        "transformers_version": version,
    }


def read_hf_config(directory: str) -> dict:
    """config.json of an HF directory, checked to be a supported (dense Llama) model."""
    path = posixpath.join(directory, CONFIG_FILE)
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.exists(local):
        raise HFFormatError(f"{path}: not found; {directory} is not a Hugging Face model directory")
    try:
        with fs.open(local, "r") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path}: not valid JSON: {e}") from None
    arch = cfg.get("architectures") or []
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
               if k not in cfg]
    if cfg.get("model_type") == "llama" and missing:
        raise HFFormatError(f"{path}: missing {', '.join(missing)}; not a complete LlamaConfig")
    if cfg.get("model_type") != "llama" or (arch and arch[0] not in SUPPORTED_ARCHITECTURES):
        raise HFFormatError(f"{path}: model_type={cfg.get('model_type')!r}, architectures={arch}: not an HF Llama "
                            f"model; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFFormatError(f"{path}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                            "(distreg's Llama uses plain RoPE)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise HFFormatError(f"{path}: {key}=true is not supported (distreg's Llama has no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"{path}: hidden_act={cfg['hidden_act']!r} is not supported (SwiGLU uses silu)")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise HFFormatError(f"{path}: head_dim={head_dim} * num_attention_heads != hidden_size={cfg['hidden_size']}")
    return cfg


def rope_theta_of(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


# model.<key> -> (config.json field, how to read it)
MODEL_FIELDS = {
    "vocab_size": ("vocab_size", lambda c: c["vocab_size"]),
    "dim": ("hidden_size", lambda c: c["hidden_size"]),
    "n_layers": ("num_hidden_layers", lambda c: c["num_hidden_layers"]),
    "n_heads": ("num_attention_heads", lambda c: c["num_attention_heads"]),
    "n_kv_heads": ("num_key_value_heads", lambda c: c.get("num_key_value_heads") or c["num_attention_heads"]),
    "ffn_dim": ("intermediate_size", lambda c: c["intermediate_size"]),
    "norm_eps": ("rms_norm_eps", lambda c: float(c.get("rms_norm_eps", 1e-6))),
    "rope_theta": ("rope_theta", rope_theta_of),
}
