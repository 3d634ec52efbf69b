"""The `quant_noise` hook (QuantNAS quantization noise).

In-process: the wrapped Linear / Conv forwards compute with w + Δ·(U - 1/2) drawn from the
keyed generator (by hand against the core), the weight gradient is straight-through, eval
mode and excluded layers run clean, the noise changes with the step.
Multi-process (one 2-rank spawn): ddp, fsdp2 and ZeRO-3 x2 against the single process:
same losses and the same noisy / clean / quantized-loss reports.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distreg.hooks.base import HookContext
from distreg.hooks.quant_noise import QuantNoise
from distreg.regularizers.quant_noise import quant_step
from distreg.runtime.comm import Comm
from distreg.sparsity.masks import index_uniform_at
from distreg.testing import run_distributed
from tests.conftest import tiny_config


def hook(**kw) -> QuantNoise:
    return QuantNoise(QuantNoise.Params(**{"bits": 4, "seed": 11, **kw}))


def test_linear_forward_uses_the_keyed_noise_and_a_straight_through_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    h = hook(exclude=["1"])
    h.prepare_model(model, HookContext(comm=Comm(), strategy="ddp", model=model))
    assert h.layers == ["0"]
    x = torch.randn(4, 5)
    w = model[0].weight
    delta = (w.max() - w.min()).item() / 15
    u = index_uniform_at(11, "quant_noise/0/0", torch.arange(w.numel())).view(w.shape)
    noisy = w.detach().double() + delta * (u - 0.5)
    out = model(x)
    expect = F.linear(F.linear(x.double(), noisy, model[0].bias.double()), model[1].weight.double(),
                      model[1].bias.double())
    torch.testing.assert_close(out.double(), expect, atol=1e-6, rtol=0)
    out.sum().backward()
    # straight-through: d/dw of sum(W2 (W x + b)) = (W2ᵀ 1) xᵀ, whatever noise W carries
    torch.testing.assert_close(w.grad, torch.outer(model[1].weight.sum(0), x.sum(0)).detach())
    model.eval()
    clean = model[1](model[0].__class__.forward(model[0], x))
    torch.testing.assert_close(model(x), clean)


def test_noise_follows_the_step_and_conv_layers_are_wrapped():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    model = nn.Sequential(conv)
    h = hook(bits=8, noise="gaussian", granularity="channel")
    h.prepare_model(model, HookContext(comm=Comm(), strategy="ddp", model=model))
    x = torch.randn(1, 2, 5, 5)
    clean = F.conv2d(x, conv.weight, conv.bias)
    first = model(x)
    assert first.shape == clean.shape and not torch.allclose(first, clean)
    h.step = 1
    assert not torch.equal(model(x), first)
    h.step = 0
    torch.testing.assert_close(model(x), first)  # keyed: the same step draws the same noise
    # per-channel steps: the perturbation of each output channel scales with its own range
    assert quant_step(conv.weight, 8, per_channel=True).shape == (3, 1, 1, 1)


def test_no_matching_layer_is_an_error():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no Linear"):
        hook(include=["nothing*"]).prepare_model(model, HookContext(comm=Comm(), strategy="ddp", model=model))


def test_report_forwards_leave_batchnorm_statistics_alone():
    # The three report forwards (noisy, clean, quantized) run in training mode; without
    # restoring, BatchNorm's running mean would move three times per report.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    h = hook(report_every=1)
    ctx = HookContext(comm=Comm(), strategy="ddp", model=model)
    h.prepare_model(model, ctx)
    before = [b.clone() for b in model.buffers()]
    h.probe = {"input": torch.randn(6, 3, 6, 6) + 2.0, "target": torch.randint(0, 5, (6,))}
    h._report(ctx)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert h.values["quant_noise/clean_loss"] > 0
    model(torch.randn(6, 3, 6, 6) + 2.0)  # a training forward still updates them
    assert not torch.equal(before[0], model[1].running_mean)


# --------------------------------------------------------------------------- real strategies (one spawn)

STEPS = 3
SPAWN_HOOK = {"name": "quant_noise", "bits": 4, "seed": 2, "report_every": 1}
STRATEGIES = {
    "ddp": {"strategy.name": "ddp"},
    "fsdp2": {"strategy.name": "fsdp2"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
}


def train(cfg) -> dict:
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(cfg, Comm(), track=False)
    for h in trainer.hooks:
        h.on_train_start(trainer.ctx)
    losses, metrics = [], []
    for _ in range(STEPS):
        losses.append(float(trainer.train_step()[0]))
        metrics.append(trainer.hooks[0].metrics())
    return {"losses": losses, "metrics": metrics}


def config(data, run_dir, world, **extra):
    return tiny_config(data, run_dir, **{"scaling.num_workers": world, "hooks": json.dumps([SPAWN_HOOK]),
                                         "checkpoint.every": 0, **extra})


def two_rank_worker(data: str, root: str) -> dict:
    return {name: train(config(data, f"{root}/{name}", 2, **extra)) for name, extra in STRATEGIES.items()}


@pytest.fixture(scope="module")
def runs(token_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("quant_noise"))
    single = train(config(token_data, f"{root}/single", 1, **STRATEGIES["ddp"]))
    return single, run_distributed(two_rank_worker, 2, token_data, root)


def test_single_process_reports_the_noise_and_quantization_gap(runs):
    single, _ = runs
    for m in single["metrics"]:
        assert m["quant_noise/noisy_loss"] != m["quant_noise/clean_loss"]
        assert m["quant_noise/quantized_loss"] != m["quant_noise/clean_loss"]
        assert m["quant_noise/quantization_gap"] == pytest.approx(
            m["quant_noise/quantized_loss"] - m["quant_noise/clean_loss"])
        assert 0 < m["quant_noise/step_size"] < 0.1  # (max - min) / 15 of N(0, 0.02) weights
    assert single["losses"][-1] < single["losses"][0]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_rank_invariance_against_single_process(runs, name):
    single, ranks = runs
    for got in (r[name] for r in ranks):
        assert got["losses"] == pytest.approx(single["losses"], abs=1e-5)
        for a, b in zip(got["metrics"], single["metrics"]):
            assert a.keys() == b.keys()
            for key, v in b.items():
                assert a[key] == pytest.approx(v, rel=1e-5, abs=1e-7), f"{name}: {key}"
