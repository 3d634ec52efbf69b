"""Dice as a model option (`model.ffn_activation: dice`; spec regularizers.md section 10).

In-process: the module against the spec vectors and the functional cores (paper form and
`reference_compat`), running statistics and eval mode, activation checkpointing (one
running-average update per micro-batch), global-batch moments on 1, 2 and 3 thread ranks
(uneven, empty) equal to one process, the Dice FFN's parameter count, a tiny Llama with
Dice trains, meta / slice-by-slice init equals the whole-model CPU init, config checks.
Multi-process (one 2-rank spawn): the tiny Dice Llama under ddp, fsdp2 and ZeRO-3 (both
sharded ones initialised on meta / under zero.Init) against the single-process run:
same losses, weights and running statistics after 3 steps.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from distreg.models.recompute import checkpointed

from distreg.hooks.base import ParamShard
from distreg.models import build_model, materialize
from distreg.models.dice import Dice, set_dice_comm
from distreg.models.llama import Llama, init_values, llama_args
from distreg.regularizers.embedding import dice, dice_reference
from distreg.runtime.comm import Comm
from distreg.testing import gather_full_params, run_distributed
from tests.conftest import tiny_config
from tests.threadcomm import run_threads

TOL = dict(rtol=1e-5, atol=1e-6)


def test_module_spec_vectors_paper_and_reference_forms():
    # spec 10: s = [-1, 0, 1, 2], alpha = 0.25 -> [-0.405430, 0, 0.707482, 1.689139] (batch
    # mean 0.5, population variance 1.25); repo form with beta = 1: [-0.451780, 0, 0.798220, 1.821038]
    s = torch.tensor([[-1.0], [0.0], [1.0], [2.0]])
    m = Dice(1)
    with torch.no_grad():
        m.alpha.fill_(0.25)
    np.testing.assert_allclose(m(s).flatten().detach(), [-0.405430, 0, 0.707482, 1.689139], **TOL)
    ref = Dice(1, reference_compat=True)
    with torch.no_grad():
        ref.alpha.fill_(0.25)
        ref.beta.fill_(1.0)
    np.testing.assert_allclose(ref(s).flatten().detach(), [-0.451780, 0, 0.798220, 1.821038], **TOL)
    np.testing.assert_allclose(ref(s).detach(), dice_reference(s, ref.alpha, ref.beta).detach(), rtol=1e-6)
    ref.eval()  # the repo form has no batch statistics: eval changes nothing
    np.testing.assert_allclose(ref(s).flatten().detach(), [-0.451780, 0, 0.798220, 1.821038], **TOL)


def test_module_equals_core_on_sequences_and_running_stats_serve_eval():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 4, generator=g) * 2 + 1  # [batch, seq, features]: every token is a sample
    m = Dice(4, momentum=0.25)
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    flat = s.reshape(-1, 4)
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    out = m(s)
    np.testing.assert_allclose(out.detach(), dice(s, m.alpha, mean, var).detach(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.running_mean, 0.25 * mean, rtol=1e-5)
    np.testing.assert_allclose(m.running_var, 0.75 + 0.25 * var, rtol=1e-5)
    m.eval()
    np.testing.assert_allclose(m(s).detach(), dice(s, m.alpha, 0.25 * mean, 0.75 + 0.25 * var).detach(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected 4 features"):
        m(torch.zeros(2, 3))


def test_activation_checkpointing_updates_running_stats_once():
    s = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    plain, ckpt = Dice(3), Dice(3)
    plain(s.clone().requires_grad_()).sum().backward()
    x = s.clone().requires_grad_()
    checkpointed(ckpt, x).sum().backward()  # the backward re-runs the forward (as the Llama blocks)
    torch.testing.assert_close(ckpt.running_mean, plain.running_mean)
    torch.testing.assert_close(ckpt.running_var, plain.running_var)
    assert plain.running_mean.abs().sum() > 0


def _dice_rank(comm, cuts, s, wts):
    lo, hi = cuts[comm.rank], cuts[comm.rank + 1]
    m = Dice(4)
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.1, 0.2, -0.3, 0.5]))
    assert set_dice_comm(torch.nn.Sequential(m), comm) == 1
    x = s[lo:hi].clone().requires_grad_()
    out = m(x)
    (out * wts[lo:hi]).sum().backward()
    return out.detach(), x.grad, m.alpha.grad, m.running_mean.clone(), m.running_var.clone()


@pytest.mark.parametrize("cuts", [[0, 3, 9], [0, 4, 4, 9]])
def test_global_batch_moments_on_thread_ranks_equal_one_process(cuts):
    g = torch.Generator().manual_seed(2)
    s, wts = torch.randn(9, 4, generator=g, dtype=torch.float64).float(), torch.randn(9, 4, generator=g)
    single = run_threads(_dice_rank, 1, [0, 9], s, wts)[0]
    res = run_threads(_dice_rank, len(cuts) - 1, cuts, s, wts)
    torch.testing.assert_close(torch.cat([r[0] for r in res]), single[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[1] for r in res]), single[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(r[2] for r in res), single[2], rtol=1e-5, atol=1e-6)  # partial alpha grads
    for r in res:  # identical running statistics on every rank
        torch.testing.assert_close(r[3], single[3], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r[4], single[4], rtol=1e-5, atol=1e-7)
    # and they are the global batch's moments, not a rank's
    np.testing.assert_allclose(single[3], 0.1 * s.mean(0), rtol=1e-5)


# --------------------------------------------------------------------------- the Llama option


def dice_llama(seed: int = 0) -> Llama:
    model = Llama(llama_args("llama-tiny", ffn_activation="dice"))
    model.init_weights(seed)
    return model


def test_dice_ffn_structure_and_parameter_count():
    model = dice_llama()
    ffn = model.layers[0].feed_forward
    assert isinstance(ffn.dice, Dice) and not hasattr(ffn, "w3")
    a = model.args
    assert a.num_params() == sum(p.numel() for p in model.parameters())
    assert a.num_params() == llama_args("llama-tiny").num_params() - a.n_layers * (a.dim - 1) * a.ffn_dim
    assert ffn.dice.alpha.abs().sum() == 0  # alpha starts at 0 (DIN repository)
    # w2(Dice(w1 x)) exactly
    x = torch.randn(2, 3, a.dim)
    with torch.no_grad():
        h = ffn.w1(x).reshape(-1, a.ffn_dim)
        want = ffn.w2(dice(h, ffn.dice.alpha, h.mean(0), h.var(0, unbiased=False)).reshape(2, 3, -1))
        torch.testing.assert_close(ffn(x), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="model.ffn_activation"):
        llama_args("llama-tiny", ffn_activation="gelu")


def test_tiny_dice_llama_trains():
    torch.manual_seed(0)
    model = dice_llama()
    tokens = torch.randint(0, 256, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    alpha = model.layers[0].feed_forward.dice.alpha
    assert alpha.abs().sum() > 0  # alpha learns
    assert model.layers[0].feed_forward.dice.running_var.ne(1).any()


def _slice_shards(model: torch.nn.Module, world: int, mode: str) -> list[ParamShard]:
    """Every rank's slice of every parameter (rows like FSDP2, or flat cuts like ZeRO-3)."""
    out = []
    for name, p in model.named_parameters():
        flat, n = p.data.view(-1), p.numel()
        if mode == "rows":
            per_row = n // p.shape[0]
            rows = -(-p.shape[0] // world)
            cuts = [min(r * rows, p.shape[0]) * per_row for r in range(world)] + [n]
        else:
            cuts = [min(r * -(-n // world), n) for r in range(world)] + [n]
        for a, b in zip(cuts[:-1], cuts[1:]):
            view = flat[a:b]
            out.append(ParamShard(name, p.shape, a, b - a, False, _read=lambda v=view: v,
                                  _write=lambda x, v=view: v.copy_(x), _grad=lambda: None))
    return out


@pytest.mark.parametrize("mode", ["rows", "flat"])
def test_meta_init_slice_by_slice_equals_cpu_init(mode):
    ref = dice_llama(seed=3)
    with torch.device("meta"):
        lazy = Llama(llama_args("llama-tiny", ffn_activation="dice"))
    lazy.to_empty(device="cpu")
    lazy.reset_buffers()
    materialize(_slice_shards(lazy, 3, mode), 3, lazy.args.init_std)
    want = ref.state_dict()
    got = lazy.state_dict()
    assert got.keys() == want.keys() and any("dice.alpha" in k for k in got)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert torch.equal(init_values("layers.1.feed_forward.dice.alpha", torch.Size([5]), 3, 0.02), torch.zeros(5))


def test_config_field():
    from distreg.config import ConfigError, ModelConfig, load_config

    with pytest.raises((ConfigError, ValueError), match="ffn_activation"):
        load_config(None, ["model.ffn_activation=gelu"])
    model = build_model(ModelConfig(ffn_activation="dice"), seed=0)
    assert isinstance(model.layers[0].feed_forward.dice, Dice)
    assert not any(isinstance(m, Dice) for m in build_model(ModelConfig(), seed=0).modules())


# --------------------------------------------------------------------------- real strategies (one spawn)

STEPS = 3
STRATEGIES = {
    "ddp": {"strategy.name": "ddp"},
    "fsdp2": {"strategy.name": "fsdp2", "model.init_device": "meta"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3, "model.init_device": "meta"},
}
# Dice normalises over the global micro-batch: the same grad_accum_steps on 1 and 2 ranks.
# SGD, not Adam: Adam's first update g / (|g| + eps) turns round-off into visible weight
# differences (see tests/test_parity.py).
COMMON = {"model.ffn_activation": "dice", "optim.name": "sgd", "optim.momentum": 0.9, "optim.lr": 0.2,
          "train.grad_clip": 1.0, "train.grad_accum_steps": 2}


def train(cfg) -> dict:
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(cfg, Comm(), track=False)
    losses = [trainer.train_step()[0] for _ in range(STEPS)]
    stats = {n: b.detach().float().clone() for n, b in trainer.strategy.module.named_buffers() if "dice" in n}
    return {"losses": losses, "params": gather_full_params(trainer.ctx.local_shards(), trainer.comm), "stats": stats}


def two_rank_worker(data: str, root: str) -> dict:
    # The ZeRO-3 run is this process's first DeepSpeed call: its zero.Init must see the
    # 2-rank world (DeepSpeedStrategy.create_model attaches deepspeed.comm first).
    return {s: train(tiny_config(data, f"{root}/{s}", **COMMON, **{"scaling.num_workers": 2}, **over))
            for s, over in STRATEGIES.items()}


@pytest.fixture(scope="module")
def runs(token_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dice_model"))
    single = train(tiny_config(token_data, f"{root}/single", **COMMON, **{"scaling.num_workers": 1},
                               **STRATEGIES["ddp"]))
    return single, run_distributed(two_rank_worker, 2, token_data, root)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_rank_invariance_against_single_process(runs, strategy):
    single, ranks = runs
    assert all(math.isfinite(v) for v in single["losses"]) and single["losses"][-1] < single["losses"][0]
    assert len(single["stats"]) == 4  # running mean and var of both blocks
    for got in (r[strategy] for r in ranks):
        assert got["losses"] == pytest.approx(single["losses"], abs=1e-5)
        for key, w in single["params"].items():
            torch.testing.assert_close(got["params"][key], w, atol=1e-5, rtol=0, msg=f"{strategy}: {key}")
        for key, v in single["stats"].items():
            torch.testing.assert_close(got["stats"][key], v, atol=1e-5, rtol=1e-5, msg=f"{strategy}: {key}")
