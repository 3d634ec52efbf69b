"""MFU formula against a hand count (llama2-7b), MoE active parameters, the peak table."""
from __future__ import annotations

import pytest

from distreg.models.llama import llama_args
from distreg.runtime.mfu import active_params, flops_per_token, peak_flops


def test_llama2_7b_flops_per_token_hand_count():
    a = llama_args("llama2-7b")
    assert a.num_params() == 6_738_415_616  # the published 6.74B
    L, d, ffn, V, T = 32, 4096, 11008, 32000, 4096
    # Matmul weights a token meets: per layer q, k, v, o (4 d^2) and SwiGLU w1, w3, w2
    # (3 d ffn); the output projection V d. The embedding is a lookup (no FLOPs); norms
    # are elementwise (8,192 + 4,096 parameters, negligible, excluded).
    n = L * (4 * d * d + 3 * d * ffn) + V * d
    assert n == 6_607_077_376
    assert active_params(a) == n
    # Forward: 2 FLOPs per weight per token, + QK^T and AV: 2 * 2 * T * d per layer.
    forward = 2 * n + L * 4 * T * d
    assert flops_per_token(a, T) == pytest.approx(3 * forward)  # backward = 2 x forward
    assert flops_per_token(a, T) == pytest.approx(6 * 6.607e9 + 12 * 32 * 4096 * 4096, rel=1e-3)  # ~46.1 GFLOP


def test_moe_counts_active_experts_only():
    dense = llama_args("llama-tiny")
    moe = llama_args("llama-tiny", moe_num_experts=8, moe_top_k=2, moe_layers="all")
    d, ffn = dense.dim, dense.ffn_dim
    # Each MoE layer: 2 routed experts (SwiGLU, 3 d ffn each) + the router (d x E) instead of one FFN.
    assert active_params(moe) - active_params(dense) == dense.n_layers * (2 * 3 * d * ffn + d * 8 - 3 * d * ffn)
    assert moe.num_params() > active_params(moe) + 6 * 3 * d * ffn  # the other 6 experts are not counted


def test_peak_table_and_override():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA B200") == 2250e12
    assert peak_flops(None) is None and peak_flops("Tesla T4") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", override_tflops=500) == 500e12
