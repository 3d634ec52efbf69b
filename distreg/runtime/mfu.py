"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

FLOPs per token (training = forward + backward = 3 x forward; PaLM appendix B, as in
torchtitan): 6 * N + 12 * L * d * T, where
- N counts the parameters that take part in a token's matmuls: all but the token
  embedding (a lookup) and, in MoE layers, only the router and the `top_k` experts a
  token is routed to (active parameters);
- 12 * L * d * T is attention's score and value products (QK^T, AV: 2 * 2 * T * d per
  layer forward), T the sequence length; no causal discount (the PaLM convention).
Peak: dense bf16 tensor-core FLOP/s per device from the vendors' datasheets;
`train.peak_tflops` overrides (other devices, other precisions).
"""
from __future__ import annotations

# Dense (no sparsity) bf16 peak per device, FLOP/s. Ordered: the first match wins.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
]


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device (None when unknown: MFU is then not reported)."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def active_params(args) -> int:
    """Parameters in a token's matmuls (see module docstring) of a LlamaArgs."""
    head_dim = args.dim // args.n_heads
    attn = args.dim * head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    dense_ffn = (3 if args.ffn_activation == "swiglu" else 2) * args.dim * args.ffn_dim
    moe_ffn = 3 * args.dim * (args.moe_ffn_dim or args.ffn_dim)
    n_moe = len(args.moe_layers) if args.moe_num_experts else 0
    ffn = (args.n_layers - n_moe) * dense_ffn + n_moe * (args.moe_top_k * moe_ffn + args.dim * args.moe_num_experts)
    return args.n_layers * attn + ffn + args.vocab_size * args.dim  # + output projection, no embedding


def flops_per_token(args, seq_len: int) -> float:
    """Training FLOPs per token of a LlamaArgs at sequence length `seq_len`."""
    return 6.0 * active_params(args) + 12.0 * args.n_layers * args.dim * seq_len


def model_flops_per_token(cfg) -> float | None:
    """From a RunConfig (llama only; None for torchvision models)."""
    if cfg.model.kind != "llama":
        return None
    from distreg.models.llama import llama_args

    m = cfg.model
    args = llama_args(
        m.preset, vocab_size=m.vocab_size, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
        ffn_dim=m.ffn_dim, max_seq_len=m.max_seq_len, ffn_activation=m.ffn_activation,
        **({} if not m.moe_num_experts else dict(
            moe_num_experts=m.moe_num_experts, moe_top_k=m.moe_top_k, moe_layers=m.moe_layers,
            moe_ffn_dim=m.moe_ffn_dim)))
    return flops_per_token(args, cfg.data.seq_len)


def device_name(device) -> str | None:
    import torch

    if getattr(device, "type", None) == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return None


def peak_memory_gb(device) -> float | None:
    """Peak memory allocated on the device since the start (CUDA), GiB."""
    import torch

    if getattr(device, "type", None) == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None
