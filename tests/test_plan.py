"""`distreg plan`: the 7B model on the meta device and per-rank memory by hand formula."""
from __future__ import annotations

import subprocess
import sys

import pytest

from distreg.config import load_config
from distreg.plan import plan

N_7B = 6_738_415_616  # Llama-2-7B parameter count
BLOCK_7B = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # attention + SwiGLU + 2 norms
ROOT_7B = 2 * 32000 * 4096 + 4096  # embedding + output + final norm: FSDP2's root unit


@pytest.mark.parametrize("strategy,stage,expect", [
    # (params, grads, optimizer) bytes per rank at world 32; every 7B dim divides by 32.
    ("fsdp2", 3, (4 * N_7B // 32, 4 * N_7B // 32, 8 * N_7B // 32)),
    ("deepspeed", 2, (4 * N_7B, None, None)),  # params whole; grads/optimizer sharded (flat, padded)
    ("ddp", 3, (4 * N_7B, 4 * N_7B, 8 * N_7B)),
])
def test_7b_per_rank_memory(strategy, stage, expect):
    cfg = load_config(None, ["model.preset=llama2-7b", f"strategy.name={strategy}", f"strategy.zero_stage={stage}",
                             "strategy.mixed_precision.param_dtype=bf16", "scaling.num_workers=32",
                             "train.global_batch_size=64"])
    info = plan(cfg)
    assert info["params"] == N_7B
    got = info["bytes"]
    for key, value in zip(("params", "grads", "optimizer"), expect):
        if value is not None:
            assert got[key] == value, key
    if strategy == "deepspeed":
        assert 8 * N_7B // 32 <= got["optimizer"] <= 8 * (N_7B // 32 + 292)  # <= one element of padding per tensor
    # bf16 parameters, fp32 reduction. FSDP2: the root stays gathered through backward, plus
    # the computing and the prefetched block; one block's bf16 gradients + their fp32 copy.
    # DeepSpeed ZeRO-2: nothing gathered; its default 5e8-element bf16 reduce bucket.
    assert got["gathered"] == {"fsdp2": 2 * (ROOT_7B + 2 * BLOCK_7B)}.get(strategy, 0)
    assert got["grad buffers"] == {"fsdp2": (2 + 4) * BLOCK_7B, "deepspeed": 2 * 500_000_000}.get(strategy, 0)


def test_zero3_gathered_is_persistent_params_plus_block_and_prefetch_bucket():
    cfg = load_config(None, ["model.preset=llama2-7b", "strategy.name=deepspeed", "strategy.zero_stage=3",
                             "strategy.mixed_precision.param_dtype=bf16", "scaling.num_workers=32",
                             "train.global_batch_size=64"])
    got = plan(cfg)["bytes"]
    norms = (2 * 32 + 1) * 4096  # every RMSNorm weight is under the 1e5-element persistence threshold
    assert got["gathered"] == 2 * (norms + BLOCK_7B - 2 * 4096 + 50_000_000)
    assert got["grad buffers"] == 2 * 2 * 500_000_000  # overlap_comm: two bf16 reduce buckets


def test_dry_run_prints_plan_without_training():
    proc = subprocess.run([sys.executable, "-m", "distreg.cli", "train", "configs/quickstart.yaml", "--dry-run",
                           "--set", "model.preset=llama2-7b", "--set", "scaling.num_workers=8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "6.738B parameters" in proc.stdout and "fsdp2 over 8 ranks" in proc.stdout


def test_moe_experts_are_split_by_expert_and_never_gathered():
    # llama-tiny, 4 experts in every block, 4 ranks: each rank holds one expert per layer.
    cfg = load_config(None, ["model.moe_num_experts=4", "model.moe_group_size=32", "scaling.num_workers=4",
                             "strategy.name=fsdp2", "train.global_batch_size=16"])
    info = plan(cfg)
    dim, ffn, E, layers = 64, 176, 4, 2
    expert_numel = 3 * dim * ffn  # w1, w3, w2 of one expert
    block_non_expert = sum(p.numel() for n, p in _tiny_moe_block(cfg).named_parameters() if n.split(".")[-1] not in
                           ("w1", "w2", "w3"))
    root = 2 * 256 * dim + dim  # embedding + output + final norm
    # fp32: the root and two blocks, each attention + norms + router only
    assert info["bytes"]["gathered"] == 4 * (root + 2 * block_non_expert)
    assert block_non_expert < expert_numel * E  # the experts would have dominated
    per_rank_experts = layers * expert_numel  # one expert of each layer
    assert info["bytes"]["params"] >= 4 * per_rank_experts
    assert info["bytes"]["params"] < 4 * E * per_rank_experts  # not every expert on every rank


def _tiny_moe_block(cfg):
    from distreg.models import build_model

    return build_model(cfg.model, 0, "meta").layers[0]
