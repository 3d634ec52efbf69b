"""The `fire_together` hook (FTWT mask predictors; core: tests/sparsity/test_fire_together_core.py).

In-process on torchvision's resnet18: the predictors are model submodules; targets and
logits are the core's functions of the sample's own BatchNorm output and the conv input;
the penalty is the reference loss and reaches only the predictors (and the task loss only
the backbone); at eval a hand-set predictor zeroes exactly the filters it predicts off,
with the keep fraction and MACs saved computed by hand; bad layer names are refused.
Trainer runs on synthetic ImageNet (a module fixture, 32 px, 4 classes): a few steps where
the predictors learn (mask loss down, accuracy up) and come back from a checkpoint, and ddp / fsdp2 / ZeRO-3 on 2 gloo
ranks against the single process (losses, predictor weights, metrics).
"""
from __future__ import annotations

import math

import pytest
import torch
import torchvision

from distreg.hooks.base import HookContext, LossTerms
from distreg.hooks.fire_together import FireTogether, norm_name
from distreg.runtime.comm import Comm
from distreg.sparsity.fire_together import heat_scores, mask_bce, mass_targets
from tests.conftest import tiny_imagenet_shards

LAYERS = {"layer1.0.conv1": "relu", "layer1.0.conv2": "identity"}
REQUIRED = dict(mass_threshold=0.9, pool="avg", softmax=True, apply_in_training=False)


def hook(**kw) -> FireTogether:
    return FireTogether(FireTogether.Params(**{"layers": LAYERS, **REQUIRED, **kw}))


def wired(**kw):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    h = hook(**kw)
    ctx = HookContext(comm=Comm(), strategy="ddp", model=model)
    h.prepare_model(model, ctx)
    return model, h, ctx


def capture(model, name, kind="output"):
    got = {}
    mod = model.get_submodule(name)
    if kind == "output":
        mod.register_forward_hook(lambda m, a, o: got.__setitem__("t", o.detach().clone()))
    else:
        mod.register_forward_pre_hook(lambda m, a: got.__setitem__("t", a[0].detach().clone()))
    return got


def test_norm_names_follow_torchvision_resnet():
    assert norm_name("conv1") == "bn1" and norm_name("layer2.0.conv3") == "layer2.0.bn3"
    assert norm_name("layer2.0.downsample.0") == "layer2.0.downsample.1"


def test_targets_logits_penalty_and_decoupling():
    model, h, ctx = wired()
    names = [n for n, _ in model.named_parameters() if n.startswith("fire_together.")]
    assert names == ["fire_together.layer1_0_conv1.fc.weight", "fire_together.layer1_0_conv1.fc.bias",
                     "fire_together.layer1_0_conv2.fc.weight", "fire_together.layer1_0_conv2.fc.bias"]
    bn1, x1 = capture(model, "layer1.0.bn1"), capture(model, "layer1.0.conv1", "input")
    bn2 = capture(model, "layer1.0.bn2")
    model.train()
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    logits, targets, *_ = h._records["layer1.0.conv1"]
    # targets: the core on relu(BN output) of conv1, the plain BN output of conv2
    assert torch.equal(targets, mass_targets(heat_scores(torch.relu(bn1["t"])), 0.9))
    assert torch.equal(h._records["layer1.0.conv2"][1], mass_targets(heat_scores(bn2["t"]), 0.9))
    assert 0 < targets.double().mean() < 1
    # logits: linear map of softmax(avg pool(conv input))
    fc = model.fire_together["layer1_0_conv1"].fc
    torch.testing.assert_close(logits, fc(x1["t"].mean(dim=(2, 3)).softmax(dim=1)))
    recs = [h._records[n] for n in LAYERS]
    terms = LossTerms(torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2]), reduction="none"),
                      torch.full((3,), 1 / 3), torch.arange(3))
    terms = h.loss(ctx, out, {}, terms)
    want = torch.stack([mask_bce(lg, t) for lg, t, *_ in recs]).mean(dim=0).mean()
    torch.testing.assert_close(terms.penalties["fire_together"], want)
    # decoupled: the penalty reaches only the predictors, the task loss only the backbone
    terms.penalties["fire_together"].backward(retain_graph=True)
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.startswith("fire_together."), n
    model.zero_grad(set_to_none=True)
    (terms.weight * terms.per_sample).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is None) == n.startswith("fire_together."), n
    h.after_backward(ctx)
    v = h.metrics()
    assert v["fire_together/mask_loss"] == pytest.approx(float(want.detach()), rel=1e-6)
    assert 0 <= v["fire_together/mask_accuracy"] <= 1
    assert v["fire_together/target_keep_fraction"] == pytest.approx(
        float(sum(r[1].double().mean() for r in recs) / 2), rel=1e-9)


def test_eval_masks_zero_the_predicted_off_filters():
    # hand-set predictors: conv1 keeps filters 0..15 of 64, conv2 keeps 0..31 of 64
    model, h, _ = wired()
    for key, k in (("layer1_0_conv1", 16), ("layer1_0_conv2", 32)):
        fc = model.fire_together[key].fc
        with torch.no_grad():
            fc.weight.zero_()
            fc.bias.copy_(torch.where(torch.arange(64) < k, 1.0, -1.0))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    into_conv2 = capture(model, "layer1.0.conv2", "input")
    masked = model(x)
    got = into_conv2["t"]
    assert h.pop_eval() == {"keep_fraction": pytest.approx((16 / 64 + 32 / 64) / 2),
                            "flops_reduction": pytest.approx(1 - (16 + 32) / 128)}  # same geometry
    h.params.apply_at_eval = False
    plain = model(x)
    ref = into_conv2["t"]
    assert (got[:, 16:] == 0).all() and torch.equal(got[:, :16], ref[:, :16]) and (ref[:, 16:] != 0).any()
    assert not torch.equal(masked, plain)
    assert h.pop_eval() == {"keep_fraction": 0.0, "flops_reduction": 0.0}  # nothing recorded unmasked


def test_bad_layers_are_refused_by_name():
    model = torchvision.models.resnet18(num_classes=4)
    ctx = HookContext(comm=Comm(), strategy="ddp", model=model)
    for layers, msg in (({"layer9.conv1": "relu"}, "no module 'layer9.conv1'"),
                        ({"layer1.0.bn1": "relu"}, "is a BatchNorm2d, not a Conv2d"),
                        ({"fc": "relu"}, "is a Linear")):
        with pytest.raises(ValueError, match=msg):
            FireTogether(FireTogether.Params(**{"layers": layers, **REQUIRED})).prepare_model(model, ctx)
    from distreg.config import ConfigError, HookSpec
    from distreg.hooks.registry import build_hooks

    with pytest.raises(ConfigError, match="mass_threshold"):
        build_hooks([HookSpec(name="fire_together", layers=LAYERS, pool="avg", softmax=True, apply_in_training=False)])


# --------------------------------------------------------------------------- trainer runs

STEPS = 4  # the single-process run (predictors learn)
# Steps compared across strategies. The resnet18 backbone on 32 px images, BatchNorm over
# 4-sample batches, is chaotic on its own: without this hook, DDP x2 and the single process
# (same batches) already differ by 1e-3 in the loss of step 3 (round-off amplified; grad
# norms ~200). Two steps: both forwards and both predictor updates are compared.
INV_STEPS = 2
RUN_LAYERS = {"layer1.0.conv1": "relu", "layer1.0.conv2": "identity", "layer2.0.conv1": "relu",
              "layer2.1.conv2": "identity"}
RUN_HOOK = {"name": "fire_together", "layers": RUN_LAYERS, "mass_threshold": 0.9, "pool": "avg",
            "softmax": False, "apply_in_training": False}
STRATEGIES = {
    "ddp": {"strategy.name": "ddp"},
    "fsdp2": {"strategy.name": "fsdp2"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return tiny_imagenet_shards(tmp_path_factory.mktemp("ftwt_data"), min_size=24, max_size=40)


def run_config(data: str, run_dir: str, world: int, **extra):
    import json

    from distreg.config import load_config

    # single process: two micro-batches of 4 = the two ranks' halves, so BatchNorm sees
    # the same batches (its batch statistics are per rank under every strategy)
    sets = {"data.path": data, "run_dir": run_dir, "model.kind": "torchvision", "model.arch": "resnet18",
            "model.num_classes": 4, "data.image_size": 32, "train.global_batch_size": 8,
            "train.grad_accum_steps": 2 // world, "train.max_steps": STEPS, "optim.warmup_steps": 0,
            "optim.schedule": "constant", "optim.lr": 0.02, "optim.momentum": 0.0, "train.log_every": 1000, "checkpoint.every": 0,
            "scaling.num_workers": world, "hooks": json.dumps([RUN_HOOK]), **extra}
    return load_config("configs/imagenet_tiny.yaml", [f"{k}={v}" for k, v in sets.items()])


def train(cfg, steps: int) -> dict:
    from distreg.runtime.trainer import Trainer
    from distreg.testing import gather_full_params

    trainer = Trainer(cfg, Comm(), track=False)
    h = trainer.hooks[0]
    out = {"losses": [], "metrics": []}
    for t in range(steps):
        out["losses"].append(trainer.train_step()[0])
        out["metrics"].append(h.metrics())
        if t + 1 == INV_STEPS:
            full = gather_full_params(trainer.ctx.local_shards(), trainer.comm)
            out["predictors"] = {k: v for k, v in full.items() if "fire_together." in k}
    if steps == STEPS:  # resume: the predictors come back with the model, the metrics with the hook
        trainer.save()
        resumed = Trainer(cfg, Comm(), track=False)
        resumed._resume()
        now = lambda t: {k: v for k, v in gather_full_params(t.ctx.local_shards(), t.comm).items()  # noqa: E731
                         if "fire_together." in k}
        out["resumed_equal"] = (all(torch.equal(v, now(resumed)[k]) for k, v in now(trainer).items())
                                and resumed.hooks[0].metrics() == h.metrics() and len(now(trainer)) > 0)
        out["resumed_loss"], out["next_loss"] = resumed.train_step()[0], trainer.train_step()[0]
    return out


def two_rank_worker(data: str, root: str) -> dict:
    return {name: train(run_config(data, f"{root}/{name}", 2, **extra), INV_STEPS)
            for name, extra in STRATEGIES.items()}


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    from distreg.testing import run_distributed

    root = str(tmp_path_factory.mktemp("ftwt_runs"))
    return train(run_config(shards, f"{root}/single", 1), STEPS), run_distributed(two_rank_worker, 2, shards, root)


def test_single_process_predictors_learn(runs):
    single, _ = runs
    m = [x for x in single["metrics"]]
    assert set(m[0]) == {f"fire_together/{k}" for k in ("mask_accuracy", "mask_loss", "keep_fraction",
                                                          "target_keep_fraction", "flops_reduction")}
    assert len(single["predictors"]) == 2 * len(RUN_LAYERS)
    assert m[-1]["fire_together/mask_loss"] < m[0]["fire_together/mask_loss"]
    assert m[-1]["fire_together/mask_accuracy"] > m[0]["fire_together/mask_accuracy"]
    for x in m:
        assert 0 < x["fire_together/target_keep_fraction"] < 1
        assert x["fire_together/flops_reduction"] == pytest.approx(1 - x["fire_together/keep_fraction"], abs=0.5)
    assert all(math.isfinite(v) for v in single["losses"])
    assert single["resumed_equal"] and single["resumed_loss"] == single["next_loss"]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_rank_invariance_against_single_process(runs, name):
    single, ranks = runs
    for got in (r[name] for r in ranks):
        assert got["losses"] == pytest.approx(single["losses"][:INV_STEPS], abs=1e-5)
        for k, w in single["predictors"].items():
            torch.testing.assert_close(got["predictors"][k], w, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {k}: {m}")
        assert len(got["metrics"]) == INV_STEPS
        for a, b in zip(got["metrics"], single["metrics"]):
            assert a.keys() == b.keys()
            for key, v in b.items():
                assert a[key] == pytest.approx(v, rel=1e-5, abs=1e-6), f"{name}: {key}"
