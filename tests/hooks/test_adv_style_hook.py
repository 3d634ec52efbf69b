"""The `adv_style` hook (AdvStyle; core: tests/regularizers/test_reg_adv_style.py) and the
Trainer's inner-maximisation step (hooks/base.py, `adversarial`).

In-process: one inner step on a small CNN equals the reference mechanism (the scales as
parameters behind a gradient-reversal layer of coefficient adv_weight, stepped by SGD),
forms no parameter gradient, and the real pass uses the updated scales; bad layer names
and layers without spatial extent are refused. Trainer runs on synthetic ImageNet (16 px,
resnet18): a few steps where the scales grow under ascent and come back exactly from a
checkpoint, and ddp / fsdp2 / ZeRO-3 on 2 gloo ranks against the single process (losses,
scales, metrics).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distreg.hooks.adv_style import AdvStyle
from distreg.hooks.base import HookContext
from distreg.regularizers.adv_style import keyed_normal, perturb
from distreg.runtime.comm import Comm
from tests.conftest import tiny_imagenet_shards


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(torch.relu(h).mean(dim=(2, 3)))


def make(**kw):
    torch.manual_seed(0)
    model = TinyCNN()
    h = AdvStyle(AdvStyle.Params(**{"layers": ["conv1"], "p_adv": 1.0, "adv_weight": 10.0, "ascent_lr": 0.05,
                                    "ascent_steps": 1, "seed": 3, **kw}))
    ctx = HookContext(comm=Comm(), strategy="ddp", model=model, lr_fn=lambda: 0.5)
    h.prepare_model(model, ctx)
    model.train()
    return model, h, ctx


class _GRL(torch.autograd.Function):  # the reference's GradientReverseFunction
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return -g * ctx.coeff, None


def test_inner_step_equals_the_reference_mechanism():
    model, h, ctx = make()
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    batches = [{"input": x[:4], "target": y[:4], "index": torch.arange(4)},
               {"input": x[4:], "target": y[4:], "index": torch.arange(4, 6)}]

    def loss_fn(b):
        return nn.functional.cross_entropy(model(b["input"]), b["target"], reduction="sum") / 6

    ctx.metrics_due = True
    h.inner_step(ctx, batches, loss_fn)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient formed
    # reference: init from the batch's statistics, then GRL(adv_weight) + SGD(lr) ascent, same noise
    feats = model.conv1(x).detach()
    mu = feats.mean(dim=(2, 3))
    sig = (feats.var(dim=(2, 3)) + 1e-6).sqrt()
    init = torch.stack([(mu.var(0) + 1e-6).sqrt(), (sig.var(0) + 1e-6).sqrt()])
    s = nn.Parameter(init.clone())
    noise = keyed_normal(3, "adv_style/conv1/0/0", torch.arange(6), 8)
    plain = model.conv1.forward
    scaled = _GRL.apply(s, 10.0)
    out = model.fc(torch.relu(model.conv2(torch.relu(
        perturb(plain(x), scaled[0], scaled[1], noise[:, :4], noise[:, 4:])))).mean(dim=(2, 3)))
    nn.functional.cross_entropy(out, y).backward()
    torch.optim.SGD([s], lr=0.05, momentum=0.0).step()
    torch.testing.assert_close(h.scales["conv1"], s.detach(), atol=1e-6, rtol=1e-5)
    assert not torch.equal(h.scales["conv1"], init)
    # the real pass uses the updated scales and the pass id after the inner ones
    model.zero_grad(set_to_none=True)
    h.before_forward(ctx, batches[0])
    got = model.conv1(x[:4])
    n = keyed_normal(3, "adv_style/conv1/0/1", torch.arange(4), 8)
    torch.testing.assert_close(got, perturb(plain(x[:4]), *h.scales["conv1"], n[:, :4], n[:, 4:]))
    h.after_backward(ctx)
    torch.testing.assert_close(model.conv1(x[:4]), plain(x[:4]))  # left clean after the step
    m = h.metrics()
    assert m["adv_style/mean_scale_norm"] == pytest.approx(float(h.scales["conv1"][0].norm()), rel=1e-6)
    assert m["adv_style/clean_loss"] > 0 and math.isfinite(m["adv_style/ascent_grad_norm"])
    model.eval()  # eval forwards are never perturbed
    h.before_forward(ctx, batches[0])
    torch.testing.assert_close(model.conv1(x[:4]), plain(x[:4]))
    # a step off the metrics steps: no host read; one collective per ascent step (the scales' gradient)
    from tests.test_step_syncs import counting

    model.train()
    ctx.step, ctx.metrics_due = 1, False
    with counting() as (counts, _):
        h.inner_step(ctx, batches, loss_fn)
        for b in batches:
            h.before_forward(ctx, b)
            loss_fn(b).backward()
        h.after_backward(ctx)
    assert (counts["collectives"], counts["host_reads"]) == (1, 0), counts["where"]


def test_bad_layers_are_refused():
    model = TinyCNN()
    ctx = HookContext(comm=Comm(), strategy="ddp", model=model)
    with pytest.raises(ValueError, match="no module 'layer9'"):
        AdvStyle(AdvStyle.Params(layers=["layer9"], p_adv=0.5)).prepare_model(model, ctx)
    from distreg.config import ConfigError, HookSpec
    from distreg.hooks.registry import build_hooks

    with pytest.raises(ConfigError, match="p_adv"):
        build_hooks([HookSpec(name="adv_style", layers=["conv1"])])
    model, h, ctx = make(layers=["fc"])
    with pytest.raises(ValueError, match="feature map"):
        h.inner_step(ctx, [{"input": torch.randn(2, 3, 8, 8), "target": torch.tensor([0, 1]),
                            "index": torch.arange(2)}], lambda b: model(b["input"]).sum())


# --------------------------------------------------------------------------- trainer runs

STEPS = 3  # the single-process growth run (the reference's adv_weight 10)
INV_STEPS = 2  # resnet18 + BatchNorm on tiny batches is chaotic past ~2 steps (see test_fire_together_hook)
# Two sources of round-off amplification, neither the hook's: (1) the scales' gradients
# nearly cancel: every perturbed map feeds a conv + BatchNorm, and BatchNorm makes the
# batch sum of the gradient w.r.t. a per-channel shift exactly zero (conv1's output, feeding
# bn1 directly, is the extreme: only round-off is left), so their float32 round-off
# (1e-5 relative between 1 and 2 ranks: summation order) is multiplied by lr * adv_weight;
# (2) the backbone itself: at optim.lr 0.02 on these 16 px batches, *without* the hook,
# DDP x2 and the single process already differ by 1.5e-5 in the loss of step 2 (measured),
# and the perturbed forwards amplify more (4e-4 with the hook at that lr). Small steps for
# both (model lr 1e-4, ascent lr * adv_weight 5e-4) keep the compared values within 1e-5;
# the growth run below uses the reference's adv_weight 10 at the run's lr 0.02.
INV_LR = 1e-4
RUN_HOOK = {"name": "adv_style", "layers": ["maxpool", "layer1", "layer2"], "p_adv": 0.7, "ascent_steps": 2,
            "adv_weight": 1.0, "ascent_lr": 5e-4}
STRATEGIES = {
    "ddp": {"strategy.name": "ddp"},
    "fsdp2": {"strategy.name": "fsdp2"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return tiny_imagenet_shards(tmp_path_factory.mktemp("advstyle_data"), min_size=16, max_size=24)


def run_config(data: str, run_dir: str, world: int, hook: dict = RUN_HOOK, lr: float = INV_LR, **extra):
    import json

    from distreg.config import load_config

    # single process: two micro-batches of 4 = the two ranks' halves (BatchNorm is per rank)
    sets = {"data.path": data, "run_dir": run_dir, "model.kind": "torchvision", "model.arch": "resnet18",
            "model.num_classes": 4, "data.image_size": 16, "train.global_batch_size": 8,
            "train.grad_accum_steps": 2 // world, "train.max_steps": STEPS, "optim.warmup_steps": 0,
            "optim.schedule": "constant", "optim.lr": lr, "optim.momentum": 0.0, "train.log_every": 1000,
            "checkpoint.every": 0, "scaling.num_workers": world, "hooks": json.dumps([hook]), **extra}
    return load_config("configs/imagenet_tiny.yaml", [f"{k}={v}" for k, v in sets.items()])


def train(cfg, steps: int) -> dict:
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(cfg, Comm(), track=False)
    h = trainer.hooks[0]
    out = {"losses": [], "metrics": [], "scales": []}
    for _ in range(steps):
        out["losses"].append(trainer.train_step()[0])
        out["metrics"].append(h.metrics())
        out["scales"].append({k: v.clone() for k, v in h.scales.items()})
    if steps == STEPS:  # resume: the scales come back exactly, the next step is the same
        trainer.save()
        resumed = Trainer(cfg, Comm(), track=False)
        resumed._resume()
        out["resumed_equal"] = (resumed.hooks[0].scales.keys() == h.scales.keys()
                                and all(torch.equal(resumed.hooks[0].scales[k], v) for k, v in h.scales.items()))
        out["resumed_loss"], out["next_loss"] = resumed.train_step()[0], trainer.train_step()[0]
        out["resumed_scales_equal"] = all(torch.equal(resumed.hooks[0].scales[k], v) for k, v in h.scales.items())
    return out


def two_rank_worker(data: str, root: str) -> dict:
    return {name: train(run_config(data, f"{root}/{name}", 2, **extra), INV_STEPS)
            for name, extra in STRATEGIES.items()}


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    from distreg.testing import run_distributed

    root = str(tmp_path_factory.mktemp("advstyle_runs"))
    return train(run_config(shards, f"{root}/single", 1), INV_STEPS), run_distributed(two_rank_worker, 2, shards, root)


@pytest.fixture(scope="module")
def growth(shards, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("advstyle_growth"))
    return train(run_config(shards, f"{root}/single", 1, {**RUN_HOOK, "adv_weight": 10.0, "ascent_lr": None}, 0.02), STEPS)


def test_single_process_scales_grow_under_ascent(growth):
    single = growth
    keys = {f"adv_style/{k}" for k in ("clean_loss", "perturbed_loss", "loss_gap", "ascent_loss",
                                       "mean_scale_norm", "std_scale_norm", "ascent_grad_norm")}
    assert all(set(m) == keys for m in single["metrics"])
    norms = [m["adv_style/mean_scale_norm"] + m["adv_style/std_scale_norm"] for m in single["metrics"]]
    assert all(b > a for a, b in zip(norms, norms[1:])), norms  # ascent: the style perturbation grows
    assert [s["layer1"].shape for s in single["scales"]] == [(2, 64)] * STEPS
    for m in single["metrics"]:
        assert m["adv_style/loss_gap"] == pytest.approx(m["adv_style/perturbed_loss"] - m["adv_style/clean_loss"])
    assert single["metrics"][-1]["adv_style/perturbed_loss"] == pytest.approx(single["losses"][-1], rel=1e-6)
    assert all(math.isfinite(v) for v in single["losses"])
    assert single["resumed_equal"] and single["resumed_loss"] == single["next_loss"] and single["resumed_scales_equal"]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_rank_invariance_against_single_process(runs, name):
    """Step 1 (initial scales, two ascent updates, the perturbed real pass, its metrics
    but the ascent gradient norm) and the scales and clean loss of step 2 within 1e-5. The perturbed losses of step 2 only within 1e-3:
    their round-off differences are amplified (measured here: 7e-5 on the loss, 4e-4
    relative on the ascent gradient norm) by the perturbed forwards on top of the
    backbone's own (see RUN_HOOK); a noise draw keyed wrongly, a different branch draw or
    a scale update from one rank's gradient changes them by 1e-2 or more."""
    single, ranks = runs
    for got in (r[name] for r in ranks):
        assert got["losses"][0] == pytest.approx(single["losses"][0], abs=1e-5)
        assert got["losses"][1] == pytest.approx(single["losses"][1], abs=1e-3)
        for t in range(INV_STEPS):
            for k, w in single["scales"][t].items():
                torch.testing.assert_close(got["scales"][t][k], w, atol=1e-5, rtol=0,
                                           msg=lambda m: f"{name}: step {t} {k}: {m}")
            for key, v in single["metrics"][t].items():
                # the ascent gradient is a near-cancelling sum (RUN_HOOK): its norm carries
                # 1e-5 .. 1e-4 relative round-off; the scales it moves are compared at 1e-5
                tol = 1e-5 if (t == 0 or key.endswith("clean_loss")) and not key.endswith("grad_norm") else 1e-3
                assert got["metrics"][t][key] == pytest.approx(v, rel=tol, abs=tol), f"{name}: step {t} {key}"
