"""`distillation` hook (MEAL V2 ensemble KD, optional discriminator and soft-hard calibration):
teachers from real checkpoints of tiny-Llama Trainer runs, the loss checked against the
formula on independently loaded teachers, thread-rank invariance of the metrics, YAML
validation, and one 2-rank spawn (ddp, fsdp2, ZeRO-3) against the single-process run."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from distreg.config import ConfigError, load_config
from distreg.hooks.base import HookContext, LossTerms
from distreg.hooks.registry import build_hooks
from distreg.hooks.regularizers.distillation import DISCRIMINATOR
from distreg.models import build_model
from distreg.regularizers.distill import MealDiscriminator, discriminator_loss, ensemble_logits, smoothed_onehot
from distreg.runtime.comm import Comm
from distreg.runtime.loss import IGNORE_INDEX, per_sample_loss, reduction_weights
from distreg.runtime.weights import load_model_weights
from distreg.testing import gather_full_params, run_distributed
from tests.conftest import tiny_config
from tests.threadcomm import run_threads

SINGLE = {"scaling.num_workers": 1, "strategy.name": "ddp"}


@pytest.fixture(scope="module")
def ckpt(token_data, tmp_path_factory) -> dict[str, str]:
    """Teacher A (the student's architecture) trained 8 steps, checkpointed at 4 and 8;
    teacher B (one block) trained 2 steps, with its run YAML."""
    from distreg.runtime.trainer import Trainer

    root = tmp_path_factory.mktemp("distill_teachers")
    a = tiny_config(token_data, str(root / "a"), **SINGLE, **{"train.max_steps": 8, "checkpoint.every": 4,
                                                               "optim.lr": 0.01})
    Trainer(a, Comm(), track=False).fit()
    b = tiny_config(token_data, str(root / "b"), **SINGLE, **{"train.max_steps": 2, "model.n_layers": 1})
    Trainer(b, Comm(), track=False).fit()
    (root / "b.yaml").write_text(b.to_yaml())
    return {"a": a.checkpoint_dir, "a4": f"{a.checkpoint_dir}/step_00000004", "b": b.checkpoint_dir,
            "b_yaml": str(root / "b.yaml")}


def hook_for(data, ckpt, **params):
    teachers = params.pop("teachers", [{"checkpoint": ckpt["a"]}, {"checkpoint": ckpt["b"], "config": ckpt["b_yaml"]},
                                       {"checkpoint": ckpt["b"], "set": ["n_layers=1"]}])
    cfg = tiny_config(data, "unused", **SINGLE, hooks=json.dumps([{"name": "distillation", "teachers": teachers,
                                                                    **params}]))
    return build_hooks(cfg.hooks)[0], cfg


def reference_teachers(cfg, ckpt) -> list[torch.nn.Module]:
    """The three default teachers, built and loaded independently of the hook."""
    out = []
    for path, layers in ((ckpt["a"], 2), (ckpt["b"], 1), (ckpt["b"], 1)):
        m = build_model(cfg.model.model_copy(update={"n_layers": layers}), 0, "cpu", True)
        m.load_state_dict(load_model_weights(path))
        out.append(m.eval())
    return out


def batch_with_ignored(data, n=4):
    from distreg.data.tokens import TokenDataset

    batch = TokenDataset(data, 32).batch(torch.arange(n))
    batch["target"] = batch["target"].clone()  # a view of the same windows as the input
    batch["target"][1, 20:] = IGNORE_INDEX  # sample 1: 20 valid tokens
    batch["target"][2, :] = IGNORE_INDEX  # sample 2: none (reduction weight 0)
    return batch


def student_and_terms(cfg, batch):
    student = build_model(cfg.model, 0, "cpu", True)
    out = student(batch["input"])
    denom = float((batch["target"] != IGNORE_INDEX).sum())
    terms = LossTerms(per_sample_loss(out, batch["target"]), reduction_weights(batch["target"], "token", denom),
                      batch["index"])
    return student, out, terms


def test_teachers_are_frozen_outside_the_student_and_leave_the_rng(token_data, ckpt):
    hook, cfg = hook_for(token_data, ckpt)
    student = build_model(cfg.model, 0, "cpu", True)
    keys = set(student.state_dict())
    rng = torch.get_rng_state()
    hook.prepare_model(student, HookContext(comm=Comm(), strategy="ddp", model=student))
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(student.state_dict()) == keys and not any(m is t for m in student.modules() for t in hook.teachers)
    assert [len(t.layers) for t in hook.teachers] == [2, 1, 1]
    for t, path in zip(hook.teachers, (ckpt["a"], ckpt["b"], ckpt["b"])):
        assert not t.training and not any(p.requires_grad for p in t.parameters())
        for name, w in load_model_weights(path).items():
            assert torch.equal(t.state_dict()[name], w), name


def test_loss_is_the_ensemble_soft_cross_entropy(token_data, ckpt):
    hook, cfg = hook_for(token_data, ckpt)
    batch = batch_with_ignored(token_data)
    student, out, terms = student_and_terms(cfg, batch)
    ctx = HookContext(comm=Comm(), strategy="ddp", model=student)
    hook.prepare_model(student, ctx)
    new = hook.loss(ctx, out, batch, terms)
    assert new.weight is terms.weight and new.per_sample.requires_grad
    # the formula on independently loaded teachers: p_T = mean softmax, per token -sum p_T log p_S,
    # per sample the mean over its valid tokens
    with torch.no_grad():
        logits_t = [t(batch["input"]) for t in reference_teachers(cfg, ckpt)]
    p_t = sum(F.softmax(z, -1) for z in logits_t) / 3
    tok = -(p_t * F.log_softmax(out, -1)).sum(-1)
    valid = batch["target"] != IGNORE_INDEX
    expect = torch.stack([tok[i][valid[i]].mean() if valid[i].any() else tok.new_zeros(()) for i in range(4)])
    torch.testing.assert_close(new.per_sample, expect, rtol=1e-5, atol=1e-6)
    hook.after_backward(ctx)
    m = hook.metrics()
    w = terms.weight
    labels = torch.where(valid, batch["target"], 0)
    entropy_t = -(p_t * p_t.log()).sum(-1)

    def mean(x):  # the token mean over the batch's valid tokens
        return float(x[valid].detach().double().mean())

    assert m["distillation/kd_loss"] == pytest.approx(float((w * expect).sum().detach()), rel=1e-5)
    assert m["distillation/kd_loss"] == pytest.approx(mean(tok), rel=1e-5)
    assert m["distillation/kl"] == pytest.approx(mean(tok - entropy_t), rel=1e-4, abs=1e-6)
    assert m["distillation/teacher_entropy"] == pytest.approx(mean(entropy_t), rel=1e-5)
    assert m["distillation/teacher_acc"] == pytest.approx(mean((p_t.argmax(-1) == labels).float()), rel=1e-6)
    assert m["distillation/agreement"] == pytest.approx(mean((out.argmax(-1) == p_t.argmax(-1)).float()), rel=1e-6)
    # no state beyond the last metric values, which a resumed run logs until the next step
    assert hook.state_dict() == {"values": {k.removeprefix("distillation/"): v for k, v in m.items()}}
    fresh, _ = hook_for(token_data, ckpt)
    fresh.load_state_dict(hook.state_dict())
    assert fresh.metrics() == m


def test_metrics_and_loss_are_rank_invariant_on_thread_ranks(token_data, ckpt):
    """The batch split 3 / 1 over two thread ranks: the same per-sample losses, the same
    weighted loss sum and the same (all-reduced) metrics as one rank with all 4 samples."""
    hook, cfg = hook_for(token_data, ckpt, calibrate={"below": 0.004, "epsilon": 0.1})
    batch = batch_with_ignored(token_data)
    student, out, terms = student_and_terms(cfg, batch)
    ctx = HookContext(comm=Comm(), strategy="ddp", model=student)
    hook.prepare_model(student, ctx)
    single = hook.loss(ctx, out.detach(), batch, terms)
    hook.after_backward(ctx)

    def rank(comm, rows):
        h, _ = hook_for(token_data, ckpt, calibrate={"below": 0.004, "epsilon": 0.1})
        h.teachers = hook.teachers
        part = {k: v[rows] for k, v in batch.items()}
        rctx = HookContext(comm=comm, strategy="ddp", model=student)
        local = LossTerms(terms.per_sample[rows], terms.weight[rows], part["index"])
        got = h.loss(rctx, out.detach()[rows], part, local)
        h.after_backward(rctx)
        return got.per_sample, float((got.weight * got.per_sample).sum()), h.metrics()

    parts = run_threads(lambda comm: rank(comm, slice(0, 3) if comm.rank == 0 else slice(3, 4)), 2)
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), single.per_sample, rtol=0, atol=0)
    assert sum(p[1] for p in parts) == pytest.approx(float((single.weight * single.per_sample).sum()), rel=1e-6)
    assert 0 < hook.metrics()["distillation/calibrated"] < 1
    for _, _, m in parts:
        assert m == pytest.approx(hook.metrics(), rel=1e-6)


def test_calibrate_swaps_unconfident_rows_for_the_smoothed_label(token_data, ckpt):
    teachers = [{"checkpoint": ckpt["a"]}]
    plain, cfg = hook_for(token_data, ckpt, teachers=teachers)
    batch = batch_with_ignored(token_data)
    student, out, terms = student_and_terms(cfg, batch)
    ctx = HookContext(comm=Comm(), strategy="ddp", model=student)
    plain.prepare_model(student, ctx)
    with torch.no_grad():
        p_t = F.softmax(plain.teachers[0](batch["input"]), -1)
    valid = batch["target"] != IGNORE_INDEX
    labels = torch.where(valid, batch["target"], 0)
    p_label = p_t.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    tau = float(p_label[valid].median())  # about half the valid tokens fall below
    hook, _ = hook_for(token_data, ckpt, teachers=teachers, calibrate={"below": tau, "epsilon": 0.2})
    hook.teachers = plain.teachers
    got = hook.loss(ctx, out, batch, LossTerms(terms.per_sample, terms.weight, terms.index))
    hook.after_backward(ctx)
    swap = (p_label < tau) & valid
    target = torch.where(swap.unsqueeze(-1), smoothed_onehot(labels, 256, 0.2), p_t)
    tok = -(target * F.log_softmax(out, -1)).sum(-1)
    expect = torch.stack([tok[i][valid[i]].mean() if valid[i].any() else tok.new_zeros(()) for i in range(4)])
    torch.testing.assert_close(got.per_sample, expect, rtol=1e-5, atol=1e-6)
    assert hook.metrics()["distillation/calibrated"] == pytest.approx(float(swap[valid].double().mean()), rel=1e-6)
    assert 0.3 < hook.metrics()["distillation/calibrated"] < 0.7


def test_discriminator_joins_the_student_and_adds_the_meal_term(token_data, ckpt):
    hook, cfg = hook_for(token_data, ckpt, teachers=[{"checkpoint": ckpt["a"]}, {"checkpoint": ckpt["a4"]}],
                         discriminator=True)
    batch = batch_with_ignored(token_data)
    student = build_model(cfg.model, 0, "cpu", True)
    ctx = HookContext(comm=Comm(), strategy="ddp", model=student)
    hook.prepare_model(student, ctx)
    d = getattr(student, DISCRIMINATOR)
    assert [tuple(p.shape) for p in d.parameters()] == [(32, 256), (32,), (4, 32), (4,), (2, 4), (2,)]
    assert all(p.requires_grad for p in d.parameters())
    out = student(batch["input"])
    _, _, terms = student_and_terms(cfg, batch)
    got = hook.loss(ctx, out, batch, LossTerms(terms.per_sample, terms.weight, terms.index))
    with torch.no_grad():
        logits_t = [t(batch["input"]) for t in hook.teachers]
    p_t = sum(F.softmax(z, -1) for z in logits_t) / 2
    rows = -(p_t * F.log_softmax(out, -1)).sum(-1) + discriminator_loss(d(out), d(ensemble_logits(logits_t)))
    valid = batch["target"] != IGNORE_INDEX
    expect = torch.stack([rows[i][valid[i]].mean() if valid[i].any() else rows.new_zeros(()) for i in range(4)])
    torch.testing.assert_close(got.per_sample, expect, rtol=1e-5, atol=1e-6)
    (got.weight * got.per_sample).sum().backward()
    assert d.fc3.weight.grad is not None and student.output.weight.grad is not None
    hook.after_backward(ctx)
    assert 0 < hook.metrics()["distillation/d_loss"] < 2
    meta = build_model(cfg.model, 0, "meta", False)
    with pytest.raises(ValueError, match="init_device=cpu"):
        hook.prepare_model(meta, HookContext(comm=Comm(), strategy="fsdp2", model=meta))


def test_yaml_validation_and_loading_errors_name_the_teacher(token_data, ckpt, tmp_path):
    path = tmp_path / "cfg.yaml"

    def error(hooks):
        path.write_text(yaml.safe_dump({"hooks": hooks}))
        with pytest.raises(ConfigError) as e:
            load_config(path)
        return str(e.value)

    assert "hooks.0.teachers.0.checkpoint" in error([{"name": "distillation", "teachers": [{"config": None}]}])
    assert "hooks.0.teachers" in error([{"name": "distillation", "teachers": []}])
    assert "hooks.0.teachers" in error([{"name": "distillation"}])
    msg = error([{"name": "distillation", "teachers": [{"checkpoint": "x", "set": ["dimm=3"]}]}])
    assert "hooks.0.teachers.0.set" in msg and "'dimm' is not a model config key" in msg
    assert "expected key=value" in error([{"name": "distillation", "teachers": [{"checkpoint": "x", "set": ["dim"]}]}])
    assert "hooks.0.teachers.0.path: unknown parameter" in error(
        [{"name": "distillation", "teachers": [{"checkpoint": "x", "path": "y"}]}])
    assert "hooks.0.calibrate.epsilon" in error(
        [{"name": "distillation", "teachers": [{"checkpoint": "x"}], "calibrate": {"below": 0.1}}])
    msg = error([{"name": "distillation", "teachers": [{"checkpoint": "x"}]}, {"name": "ps_kd", "num_epochs": 3}])
    assert "'distillation'" in msg and "'ps_kd'" in msg and "replace the loss" in msg
    ok = load_config(None, ["hooks=" + json.dumps([{"name": "distillation", "teachers": [
        {"checkpoint": "x", "config": "t.yaml", "set": ["model.dim=32", "n_layers=1"]}]}])])
    assert build_hooks(ok.hooks)[0].params.teachers[0].overrides == ["model.dim=32", "n_layers=1"]

    def load_error(teachers):
        hook, cfg = hook_for(token_data, ckpt, teachers=teachers)
        student = build_model(cfg.model, 0, "cpu", True)
        with pytest.raises(ValueError) as e:
            hook.prepare_model(student, HookContext(comm=Comm(), strategy="ddp", model=student))
        return str(e.value)

    missing = str(tmp_path / "nowhere")
    msg = load_error([{"checkpoint": ckpt["a"]}, {"checkpoint": missing}])
    assert f"teachers.1.checkpoint {missing}" in msg and "no complete checkpoint" in msg
    # a one-block teacher model for a two-block checkpoint: "unexpected layers.1..."
    assert "teachers.0.checkpoint" in load_error([{"checkpoint": ckpt["a"], "set": ["n_layers=1"]}])
    assert f"teachers.0.config {missing}" in load_error([{"checkpoint": ckpt["b"], "config": missing}])
    assert "teachers.0: invalid teacher model config" in load_error([{"checkpoint": ckpt["a"], "set": ["n_heads=5"]}])


# --------------------------------------------------------------------------- real strategies (one spawn)

PARITY_STEPS = 3
TREND_STEPS = 8
CONFIGS = {
    # two architectures (B from its own YAML), soft-hard calibration on
    "kd": lambda c: {"teachers": [{"checkpoint": c["a"]}, {"checkpoint": c["b"], "config": c["b_yaml"]}],
                     "calibrate": {"below": 0.004, "epsilon": 0.1}},
    # MEAL V2 with its discriminator (a sharded, optimised student submodule)
    "meal": lambda c: {"teachers": [{"checkpoint": c["a"]}, {"checkpoint": c["a4"]}], "discriminator": True},
    # plain MEAL V2 KD (single process only: the trend of the KD loss)
    "plain": lambda c: {"teachers": [{"checkpoint": c["a"]}, {"checkpoint": c["a4"]}]},
}
SPAWNED = ("kd", "meal")
STRATEGIES = {
    "ddp": {"strategy.name": "ddp"},
    "fsdp2": {"strategy.name": "fsdp2"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
}
COMMON = {"optim.name": "sgd", "optim.momentum": 0.9, "optim.lr": 0.2, "train.grad_clip": 1.0}


def config(data, run_dir, world, name, ckpt, **extra):
    hooks = [{"name": "distillation", **CONFIGS[name](ckpt)}]
    return tiny_config(data, run_dir, **COMMON, **{"scaling.num_workers": world, "hooks": json.dumps(hooks), **extra})


def train(cfg, steps: int, save: bool = False) -> dict:
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(cfg, Comm(), track=False)
    out = {"losses": [], "metrics": []}
    for t in range(steps):
        out["losses"].append(trainer.train_step()[0])
        out["metrics"].append(trainer.hooks[0].metrics())
        if t + 1 == PARITY_STEPS:
            out["params"] = gather_full_params(trainer.ctx.local_shards(), trainer.comm)
    if save:
        out["saved_keys"] = sorted(load_model_weights(trainer.save()))
        out["student_keys"] = sorted(trainer.strategy.module.state_dict())
    return out


def two_rank_worker(data: str, root: str, ckpt: dict) -> dict:
    return {(c, s): train(config(data, f"{root}/{c}_{s}", 2, c, ckpt, **STRATEGIES[s], **{"train.grad_accum_steps": 2}),
                          PARITY_STEPS)
            for c in SPAWNED for s in STRATEGIES}


@pytest.fixture(scope="module")
def runs(token_data, ckpt, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("distill_runs"))
    single = {c: train(config(token_data, f"{root}/{c}_single", 1, c, ckpt, **STRATEGIES["ddp"]), TREND_STEPS,
                       save=True)
              for c in CONFIGS}
    return single, run_distributed(two_rank_worker, 2, token_data, root, ckpt)


@pytest.mark.parametrize("name,strategy", [(c, s) for c in SPAWNED for s in STRATEGIES])
def test_rank_invariance_against_single_process(runs, name, strategy):
    single, ranks = runs
    ref = single[name]
    for got in (r[(name, strategy)] for r in ranks):
        assert got["losses"] == pytest.approx(ref["losses"][:PARITY_STEPS], abs=1e-5)
        assert got["params"].keys() == ref["params"].keys()
        for key, w in ref["params"].items():
            torch.testing.assert_close(got["params"][key], w, atol=1e-5, rtol=0, msg=f"{name}/{strategy}: {key}")
        for m_got, m_ref in zip(got["metrics"], ref["metrics"]):
            assert m_got == pytest.approx(m_ref, rel=1e-5, abs=1e-6)


def test_kd_loss_falls_when_training_on_a_fixed_batch(token_data, ckpt):
    """Full-batch Adam on one batch: the KD loss (and its KL part) falls at every step."""
    hook, cfg = hook_for(token_data, ckpt, teachers=[{"checkpoint": ckpt["a"]}, {"checkpoint": ckpt["a4"]}])
    batch = batch_with_ignored(token_data)
    student = build_model(cfg.model, 0, "cpu", True)
    ctx = HookContext(comm=Comm(), strategy="ddp", model=student)
    hook.prepare_model(student, ctx)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    kd, kl = [], []
    for _ in range(12):
        out = student(batch["input"])
        denom = float((batch["target"] != IGNORE_INDEX).sum())
        weights = reduction_weights(batch["target"], "token", denom)
        terms = hook.loss(ctx, out, batch, LossTerms(per_sample_loss(out, batch["target"]), weights, batch["index"]))
        opt.zero_grad()
        (terms.weight * terms.per_sample).sum().backward()
        opt.step()
        hook.after_backward(ctx)
        kd.append(hook.metrics()["distillation/kd_loss"])
        kl.append(hook.metrics()["distillation/kl"])
    assert all(b < a for a, b in zip(kd, kd[1:])), kd
    assert kl[-1] < 0.5 * kl[0], kl


def test_trainer_runs_move_the_student_towards_the_ensemble(runs):
    single, _ = runs
    for name, run in single.items():
        assert all(math.isfinite(x) for x in run["losses"]), name
    plain = single["plain"]["metrics"]  # other batches each step: a noisy but clear trend
    assert plain[-1]["distillation/kl"] < 0.8 * plain[0]["distillation/kl"]
    assert plain[-1]["distillation/agreement"] > plain[0]["distillation/agreement"]
    assert 0 < single["kd"]["metrics"][1]["distillation/calibrated"] < 1
    meal = single["meal"]
    assert meal["losses"][0] == pytest.approx(meal["metrics"][0]["distillation/kd_loss"]
                                              + meal["metrics"][0]["distillation/d_loss"], rel=1e-6)
    d_loss = [m["distillation/d_loss"] for m in meal["metrics"]]
    assert d_loss[-1] < d_loss[0] < math.log(2) + 1e-6, d_loss  # D learns to tell student from teachers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # discriminator_seed
        init = MealDiscriminator(256)
    # after the parity steps D has moved well beyond the parity tolerance (so the 2-rank
    # comparison would catch a D that a strategy does not train)
    for name, w in init.named_parameters():
        assert (meal["params"][f"{DISCRIMINATOR}.{name}"] - w).abs().max() > 1e-3, name


def test_checkpoints_hold_the_student_only(runs):
    single, _ = runs
    kd, meal = single["plain"], single["meal"]
    assert kd["saved_keys"] == kd["student_keys"] and not any(DISCRIMINATOR in k for k in kd["saved_keys"])
    assert meal["saved_keys"] == meal["student_keys"]
    assert sorted(k for k in meal["saved_keys"] if k.startswith(DISCRIMINATOR)) == [
        f"{DISCRIMINATOR}.fc{i}.{p}" for i in (1, 2, 3) for p in ("bias", "weight")]
