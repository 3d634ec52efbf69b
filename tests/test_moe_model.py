"""MoE feed-forward with expert parallelism (distreg.models.moe).

Single process: capacity is never exceeded, a token gets at most k distinct experts,
dropped tokens are counted and pass through the residual, the layer equals a per-token
reference, aux / z losses follow their formulas, routers plug in, config errors.
One 2-rank spawn: one optimizer step of the tiny MoE Llama under FSDP2 (experts
sharded over the ranks, tokens exchanged by all-to-all; also with meta init, activation
checkpointing, group-scope Sinkhorn and global-scope Sinkhorn / sparse OT routing) gives
the single-process loss, grad norm, routing statistics and updated full weights (experts
included); and an
FSDP2 MoE run resumed from a checkpoint continues the uninterrupted curve.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distreg.config import ConfigError
from distreg.models.moe import (
    DispatchPlan,
    MoEFeedForward,
    check_moe_setup,
    enforce_capacity,
    moe_metrics,
    topk_router,
)
from distreg.runtime.comm import Comm
from distreg.testing import gather_full_params, run_distributed
from tests.conftest import tiny_config

# 4 experts, top-2, groups of one sequence (data.seq_len = 32 in tiny_config): capacity
# ceil(1.0 * 32 * 2 / 4) = 16 per expert and group, tight enough that tokens are dropped.
MOE = {"model.moe_num_experts": 4, "model.moe_top_k": 2, "model.moe_capacity_factor": 1.0,
       "model.moe_group_size": 32, "model.moe_aux_loss_coef": 0.1, "model.moe_z_loss_coef": 0.01,
       "hooks": "[{name: moe_metrics}, {name: param_norm}]"}
# As tests/test_parity.py: SGD (not Adam) and an active clip, gradient accumulation on both sides.
STEP = {"optim.name": "sgd", "optim.momentum": 0.9, "optim.lr": 0.5, "train.grad_clip": 0.05,
        "train.grad_accum_steps": 2}
TWO_RANK = {
    "fsdp2": {"strategy.name": "fsdp2"},
    "fsdp2_meta_init": {"strategy.name": "fsdp2", "model.init_device": "meta"},
    # recomputed MoE forwards repeat routing and all-to-alls but count statistics once
    "fsdp2_act_ckpt": {"strategy.name": "fsdp2", "strategy.activation_checkpointing": True},
    # Group scope with an OT router: each rank solves its own groups as one batch, so a
    # group's plan must not depend on its batch mates (1 process: all 4 groups per batch).
    "group_sinkhorn": {"strategy.name": "fsdp2", "model.moe_router": "sinkhorn"},
    # Global scope: one OT problem over both ranks' tokens of each micro-step (128 tokens,
    # capacity ceil(1.0 * 128 * 2 / 4) = 64 per expert), only per-expert statistics exchanged.
    "global_sinkhorn": {"strategy.name": "fsdp2", "model.moe_route_scope": "global", "model.moe_group_size": 0,
                        "model.moe_router": "sinkhorn"},
    "global_sparse_ot": {"strategy.name": "fsdp2", "model.moe_route_scope": "global", "model.moe_group_size": 0,
                         "model.moe_router": "sparse_ot", "model.moe_capacity_factor": 0.75},
}
# The single-process reference of each 2-rank run: the same config on one rank.
SINGLE_OF = {name: {k: v for k, v in extra.items() if k.startswith("model.moe")} for name, extra in TWO_RANK.items()}


def _layer(capacity_factor=1.0, group_size=8, top_k=2, experts=4, router="topk", dim=16):
    torch.manual_seed(0)
    m = MoEFeedForward(dim, 24, experts, top_k=top_k, capacity_factor=capacity_factor, group_size=group_size,
                       router=router, aux_loss_coef=0.1, z_loss_coef=0.01)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _reference(m: MoEFeedForward, xf: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    out = torch.zeros_like(xf)
    for t in range(xf.shape[0]):
        for e, g in zip(plan.expert[t].tolist(), plan.gate[t]):
            if e >= 0:
                h = F.silu(F.linear(xf[t], m.w1[e])) * F.linear(xf[t], m.w3[e])
                out[t] += g * F.linear(h, m.w2[e])
    return out


# ------------------------------------------------------------------- single process


@pytest.mark.parametrize("capacity_factor,top_k", [(0.25, 1), (0.5, 2), (1.0, 2), (2.0, 3)])
def test_capacity_and_at_most_k_distinct_experts(capacity_factor, top_k):
    g = torch.Generator().manual_seed(1)
    groups, size, experts = 5, 24, 6
    logits = torch.randn(groups, size, experts, generator=g) * 3
    capacity = math.ceil(capacity_factor * size * top_k / experts)
    plan = topk_router(logits, top_k, capacity)
    assert plan.expert.shape == (groups, size, top_k)
    for n in range(groups):
        used = plan.expert[n][plan.expert[n] >= 0]
        assert torch.bincount(used, minlength=experts).max() <= capacity
        for t in range(size):
            chosen = [e for e in plan.expert[n, t].tolist() if e >= 0]
            assert len(chosen) == len(set(chosen)) <= top_k
    assert (plan.gate[plan.expert < 0] == 0).all()
    # Capacity drops the lowest-priority slots only: first choices win over second ones.
    first = torch.softmax(logits, -1).argmax(-1)
    if top_k > 1 and capacity_factor >= 1:
        assert (plan.expert[..., 0] == first).float().mean() > 0.9


def test_enforce_capacity_priority_is_slot_then_token_order():
    expert = torch.tensor([[[0, 1], [0, 1], [1, 0]]])  # 3 tokens, all want experts 0 and 1
    gate = torch.full((1, 3, 2), 0.5)
    plan = enforce_capacity(expert, gate, capacity=2, num_experts=2)
    # first choices: t0->0, t1->0, t2->1 all fit; second choices: t0->1 fits (expert 1 has 1), rest dropped
    assert plan.expert.tolist() == [[[0, 1], [0, -1], [1, -1]]]
    assert plan.gate.tolist() == [[[0.5, 0.5], [0.5, 0.0], [0.5, 0.0]]]


def test_layer_matches_per_token_reference_and_drops_pass_through():
    m = _layer(capacity_factor=0.5)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    out = m(x)
    xf = x.view(-1, 16)
    plan, capacity = m._route(m.gate(xf))
    torch.testing.assert_close(out.view(-1, 16), _reference(m, xf, plan), atol=1e-5, rtol=1e-5)
    dropped = (plan.expert < 0).all(-1)
    assert capacity == 2 and dropped.sum() > 0
    # A dropped token's MoE output is exactly 0, so the block returns its residual input.
    assert (out.view(-1, 16)[dropped] == 0).all()
    stats = moe_metrics(torch.nn.ModuleDict({"ff": m}))
    assert stats["moe/dropped_tokens_frac"] == pytest.approx(float(dropped.float().mean()))
    assert stats["moe/dropped_frac"] == pytest.approx(float((plan.expert < 0).float().mean()))
    assert sum(stats[f"moe/load/e{e}"] for e in range(4)) == pytest.approx(1.0)
    assert 0 < stats["moe/router_entropy"] <= math.log(4)


def test_dropped_tokens_pass_through_a_block():
    from distreg.models.llama import Block, llama_args

    args = llama_args("llama-tiny", moe_num_experts=4, moe_top_k=1, moe_capacity_factor=0.25,
                      moe_layers="all", moe_group_size=16)
    torch.manual_seed(0)
    block = Block(args, moe=True)
    cos, sin = torch.ones(16, 8), torch.zeros(16, 8)
    x = torch.randn(1, 16, 64)
    after_attn = x + block.attention(block.attention_norm(x), cos, sin)
    out = block(x, cos, sin)
    plan, _ = block.feed_forward._route(block.feed_forward.gate(block.ffn_norm(after_attn).view(16, 64)))
    dropped = (plan.expert < 0).all(-1)
    assert dropped.sum() == 16 - 4  # capacity 1 per expert: 4 tokens routed, 12 dropped
    torch.testing.assert_close(out[0, dropped], after_attn[0, dropped], atol=0, rtol=0)


def test_aux_and_z_loss_formulas():
    m = _layer(capacity_factor=2.0)
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    m(x)
    logits = m.gate(x).float()
    p = torch.softmax(logits, -1)
    f = torch.bincount(p.topk(2, -1).indices.reshape(-1), minlength=4) / (16 * 2)
    aux = 0.1 * 4 * (f * p.mean(0)).sum()
    z = 0.01 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(m.aux_losses["moe_aux"], aux)
    torch.testing.assert_close(m.aux_losses["moe_z"], z)


def test_plugged_in_routers():
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(4))

    def dense_plan_router(logits, top_k, capacity):
        # Returns a dense [groups, G, E] combine matrix: everything to expert 2 with weight 0.5.
        plan = torch.zeros_like(logits)
        plan[..., 2] = 0.5
        return plan

    def tuple_router(logits, top_k, capacity):
        e = torch.full(logits.shape[:-1] + (1,), 3, dtype=torch.long)
        return e, torch.ones(e.shape)

    for router, expert in ((dense_plan_router, 2), (tuple_router, 3)):
        m = _layer(capacity_factor=1.0, router=router)
        out = m(x)
        plan, capacity = m._route(m.gate(x))
        # capacity (4 per group of 8 with k=2, E=4) is enforced on any router's plan
        assert capacity == 4 and ((plan.expert == expert).sum(-1) == 1).sum() == 2 * capacity
        torch.testing.assert_close(out, _reference(m, x, plan), atol=1e-5, rtol=1e-5)


def test_package_routers_plug_in():
    """`model.moe_router` names resolve to distreg.moe.routers (when present): its `topk`
    gives the built-in plan, and the OT routers respect this layer's capacity."""
    from distreg.models.moe import PackageRouter, available_routers, resolve_router

    if not isinstance(resolve_router("topk"), PackageRouter):
        pytest.skip("distreg.moe.routers not importable: the built-in topk is in use")
    assert {"topk", "sinkhorn", "sparse_ot"} <= set(available_routers())
    logits = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(5)) * 2
    for k, capacity in ((1, 4), (2, 6)):
        expert, gate = resolve_router("topk")(logits, k, capacity)
        ref = topk_router(logits, k, capacity)
        assert torch.equal(expert, ref.expert)
        torch.testing.assert_close(gate, ref.gate)
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(6))
    from distreg.models.recompute import _recomputing

    for name in ("sinkhorn", "sparse_ot"):
        m = _layer(capacity_factor=1.0, router=name)
        out = m(x)
        with _recomputing():  # route again from the warm start the forward used (not the updated one)
            plan, capacity = m._route(m.gate(x))
        for grp in plan.expert.view(2, 8, -1):
            assert torch.bincount(grp[grp >= 0], minlength=4).max() <= capacity
        torch.testing.assert_close(out, _reference(m, x, plan), atol=1e-5, rtol=1e-5)


def test_config_fields_and_errors(token_data, tmp_path):
    cfg = tiny_config(token_data, str(tmp_path), **MOE)
    assert (cfg.model.moe_num_experts, cfg.model.moe_layers, cfg.model.moe_router) == (4, "all", "topk")
    with pytest.raises(ConfigError, match=r"model\.moe_num_experts=4 is not divisible by scaling\.num_workers=3"):
        check_moe_setup(cfg, 3)
    check_moe_setup(cfg, 2)
    with pytest.raises(ConfigError, match="strategy.name=deepspeed"):
        check_moe_setup(tiny_config(token_data, str(tmp_path), **MOE, **{"strategy.name": "deepspeed"}), 2)
    with pytest.raises(ConfigError, match="moe_group_size=48 does not divide"):
        check_moe_setup(tiny_config(token_data, str(tmp_path), **{**MOE, "model.moe_group_size": 48}), 2)
    for key, value, match in [("model.moe_top_k", 5, "exceeds"), ("model.moe_router", "nope", "unknown router"),
                              ("model.moe_layers", "[0, 0]", "distinct"), ("model.moe_capacity_factor", 0, "greater")]:
        with pytest.raises(ConfigError, match=match):
            tiny_config(token_data, str(tmp_path), **{**MOE, key: value})
    with pytest.raises(ConfigError, match="moe_group_size=32 applies to moe_route_scope=group"):
        tiny_config(token_data, str(tmp_path), **{**MOE, "model.moe_route_scope": "global"})
    with pytest.raises(ConfigError, match="moe_route_scope"):
        tiny_config(token_data, str(tmp_path), **{**MOE, "model.moe_route_scope": "world"})
    with pytest.raises(ValueError, match="only routes in group scope"):
        MoEFeedForward(8, 8, 2, top_k=1, router=lambda logits, k, cap: logits, route_scope="global")
    # Dense default: no MoE module anywhere, parameter names as before.
    from distreg.models import build_model

    dense = build_model(tiny_config(token_data, str(tmp_path)).model, 0, "meta")
    moe = build_model(cfg.model, 0, "meta")
    assert not any("gate" in n for n, _ in dense.named_parameters())
    assert moe.layers[1].feed_forward.w1.shape == (4, 176, 64)
    assert sum(p.numel() for p in moe.parameters()) == moe.args.num_params()


# ------------------------------------------------------------------- one 2-rank spawn


def one_step(cfg) -> dict:
    from distreg.hooks.param_norm import ParamNorm
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(cfg, Comm(), track=False)
    for hook in trainer.hooks:
        hook.on_train_start(trainer.ctx)
    loss, grad_norm, _ = trainer.train_step()
    metrics = {k: v for h in trainer.hooks for k, v in h.metrics().items()}
    return {"loss": loss, "grad_norm": grad_norm, "metrics": metrics, "norm": ParamNorm.compute(trainer.ctx),
            "params": gather_full_params(trainer.ctx.local_shards(), trainer.comm)}


def two_rank(data: str, root: str) -> dict:
    from distreg.runtime.trainer import train_worker

    out = {name: one_step(tiny_config(data, f"{root}/{name}", **{**MOE, **STEP, **extra, "scaling.num_workers": 2}))
           for name, extra in TWO_RANK.items()}
    common = {**MOE, "scaling.num_workers": 2, "train.grad_accum_steps": 2, "train.max_steps": 6,
              "optim.lr": 0.01, "optim.warmup_steps": 2, "checkpoint.every": 3, "strategy.name": "fsdp2"}
    straight = tiny_config(data, f"{root}/resume/straight", **common).model_dump(mode="json")
    split = tiny_config(data, f"{root}/resume/split", **common).model_dump(mode="json")
    a = train_worker(straight, track=False)
    b1 = train_worker(split, track=False, stop_at=3)
    b2 = train_worker(split, resume=True, track=False)
    out["resume"] = (a.losses, b1.losses, b2.losses)
    return out


@pytest.fixture(scope="module")
def results(token_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moe"))
    singles = {}
    for name, extra in SINGLE_OF.items():
        key = tuple(sorted(extra.items()))
        if key not in singles:
            singles[key] = one_step(tiny_config(token_data, f"{root}/single{len(singles)}", **{
                    **MOE, **STEP, **extra, "scaling.num_workers": 1, "strategy.name": "ddp"}))
    single = {name: singles[tuple(sorted(extra.items()))] for name, extra in SINGLE_OF.items()}
    return single, run_distributed(two_rank, 2, token_data, root)


@pytest.mark.parametrize("name", list(TWO_RANK))
def test_rank_invariant_step(results, name):
    single, ranks = results
    single = single[name]
    assert single["metrics"]["moe/dropped_frac"] > 0  # capacity is active: the routing matters
    if "sinkhorn" in name or "sparse_ot" in name:  # an OT solve ran
        assert single["metrics"]["moe/solver_iterations"] > 1
    for rank_result in ranks:
        got = rank_result[name]
        assert got["loss"] == pytest.approx(single["loss"], abs=1e-5)
        assert got["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)  # experts' 1/W included
        assert got["norm"] == pytest.approx(single["norm"], rel=1e-6)
        # Same routing decisions (global statistics, all-reduced in the forward).
        for key, ref in single["metrics"].items():
            if key.startswith("moe/solver_") and name.startswith("group"):
                continue  # per-rank batch statistics (max over the rank's groups), not a plan property
            if key.startswith("moe/"):
                assert got["metrics"][key] == pytest.approx(ref, rel=1e-5, abs=1e-7), key
        assert got["params"].keys() == single["params"].keys()
        assert any(".w1" in k for k in got["params"])
        for key, ref in single["params"].items():
            torch.testing.assert_close(got["params"][key], ref, atol=1e-5, rtol=0, msg=f"{name}: {key}")


def test_resume_continues_the_same_curve(results):
    straight, first, second = results[1][0]["resume"]
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
    for step in range(1, 7):
        got = first[step] if step <= 3 else second[step]
        assert got == pytest.approx(straight[step], abs=1e-6), f"step {step}"


def test_grouped_expert_gemm_equals_the_per_expert_loop():
    # torch._grouped_mm (one call for every local expert) against F.linear per expert,
    # values and gradients, with an expert that receives no rows; an unaligned width
    # (60 bf16 bytes is not a multiple of 16) takes the loop.
    import torch.nn.functional as F

    from distreg.models.moe import _grouped_mm_ok, expert_swiglu

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 7, 4])
    rows = torch.randn(16, 32, generator=g, requires_grad=True)
    w1, w3 = (torch.randn(4, 48, 32, generator=g, requires_grad=True) for _ in range(2))
    w2 = torch.randn(4, 32, 48, generator=g, requires_grad=True)
    assert _grouped_mm_ok(rows, w1, w3, w2)
    up = torch.randn(16, 32, generator=g)
    got = expert_swiglu(rows, counts, w1, w3, w2)
    grads = torch.autograd.grad(got, (rows, w1, w3, w2), up)
    parts = torch.split(rows, counts.tolist())
    want = torch.cat([F.linear(F.silu(F.linear(p, w1[e])) * F.linear(p, w3[e]), w2[e]) for e, p in enumerate(parts)])
    want_grads = torch.autograd.grad(want, (rows, w1, w3, w2), up)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert grads[1][1].abs().sum() == 0  # the empty expert gets no gradient
    assert not _grouped_mm_ok(rows.bfloat16(), torch.zeros(4, 30, 32, dtype=torch.bfloat16))
