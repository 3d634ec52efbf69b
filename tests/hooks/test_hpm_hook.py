"""The `hpm` hook on the `mae` model kind (core: tests/regularizers/test_reg_hpm.py).

Trainer runs on synthetic ImageNet whose patch difficulty is predictable (left half smooth
ramps, right half noise; a module fixture, 32 px, patch 8): the single process learns (the
reconstruction loss falls, the predictor ranks masked patches above chance), the masks
follow the EMA teacher's predictions and the schedule, metrics are computed on logging
steps only (no host read or collective added otherwise), and a checkpoint resumes exactly (EMA teacher included); ddp / fsdp2 / ZeRO-3
on 2 gloo ranks equal the single process (losses, predictor weights, metrics).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from distreg.runtime.comm import Comm

STEPS = 20  # the single-process run (the predictor learns; the hard fraction grows over the run)
INV_STEPS = 3  # compared across strategies; hard masks from step 0 (schedule_steps=2)
LEARN_HOOK = {"name": "hpm", "schedule_steps": STEPS, "ema_ramp_steps": 10, "ema_decay_start": 0.5,
              "ema_decay_end": 0.9}
HOOK = {**LEARN_HOOK, "schedule_steps": 2}
# SGD for the strategy comparison: attention is invariant to the key bias, whose gradient is
# round-off noise that Adam would normalise into full-size (strategy-dependent) updates.
INV = {"optim.name": "sgd", "optim.lr": 0.05}
STRATEGIES = {
    "ddp": {"strategy.name": "ddp"},
    "fsdp2": {"strategy.name": "fsdp2"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # 2 cores shared by several processes: one intra-op thread is ~20x faster than two here
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from distreg.data.imagenet_convert import convert_imagenet
    from distreg.data.synth_patches import synth_patch_imagenet

    root = tmp_path_factory.mktemp("hpm_data")
    synth_patch_imagenet(str(root / "src"), num_classes=4, train_per_class=8)
    convert_imagenet(str(root / "src"), str(root / "shards"), shard_size=16, processes=1, log=lambda *_: None)
    return str(root / "shards" / "train")


def run_config(data: str, run_dir: str, world: int, hooks=(HOOK,), **extra):
    from distreg.config import load_config

    sets = {"data.path": data, "run_dir": run_dir, "model.kind": "mae", "data.image_size": 32,
            "data.transform": "val", "train.global_batch_size": 8, "train.grad_accum_steps": 2 // world,
            "train.max_steps": STEPS, "optim.name": "adamw", "optim.lr": 0.01, "optim.warmup_steps": 0,
            "optim.schedule": "constant", "train.log_every": 1000, "checkpoint.every": 0,
            "scaling.num_workers": world, "hooks": json.dumps(list(hooks)), **extra}
    return load_config("configs/imagenet_tiny.yaml", [f"{k}={v}" for k, v in sets.items()])


def predictor(trainer) -> dict[str, torch.Tensor]:
    from distreg.testing import gather_full_params

    return {k: v for k, v in gather_full_params(trainer.ctx.local_shards(), trainer.comm).items()
            if "loss_predictor." in k}


def train(cfg, steps: int) -> dict:
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(cfg, Comm(), track=False)
    h = trainer.hooks[0]
    out = {"losses": [], "metrics": []}
    for _ in range(steps):
        out["losses"].append(trainer.train_step()[0])
        out["metrics"].append(h.metrics())
    out["predictor"] = predictor(trainer)
    if steps == STEPS:
        # a step off the logging schedule: no statistics kept, no all-reduce, values unchanged
        before = h.metrics()
        trainer.step_on_device(metrics_due=False)
        trainer.step_metrics.flush()
        out["quiet_step"] = h._acc is None and h.metrics() == before
        trainer.save()  # resume: the EMA teacher comes back with the hook
        resumed = Trainer(cfg, Comm(), track=False)
        resumed._resume()
        out["resumed_ema"] = all(torch.equal(a, b) for a, b in zip(h.ema, resumed.hooks[0].ema))
        out["resumed_metrics"] = resumed.hooks[0].metrics() == h.metrics()
        out["resumed_loss"], out["next_loss"] = resumed.train_step()[0], trainer.train_step()[0]
    return out


def two_rank_worker(data: str, root: str) -> dict:
    torch.set_num_threads(1)
    return {name: train(run_config(data, f"{root}/{name}", 2, **INV, **extra), INV_STEPS)
            for name, extra in STRATEGIES.items()}


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    from distreg.testing import run_distributed

    root = str(tmp_path_factory.mktemp("hpm_runs"))
    return (train(run_config(shards, f"{root}/learn", 1, hooks=[LEARN_HOOK]), STEPS),
            train(run_config(shards, f"{root}/single", 1, **INV), INV_STEPS),
            run_distributed(two_rank_worker, 2, shards, root))


def test_single_process_learns_and_resumes(runs):
    single, _, _ = runs
    m = single["metrics"]
    assert set(m[0]) == {f"hpm/{k}" for k in ("reconstruction_loss", "ranking_loss", "ranking_accuracy",
                                               "masked_hard_fraction", "ema_decay")}
    rec = [x["hpm/reconstruction_loss"] for x in m]
    acc = [x["hpm/ranking_accuracy"] for x in m]
    assert sum(rec[-3:]) / 3 < 0.8 * sum(rec[:3]) / 3, rec
    assert sum(acc[-8:]) / 8 > 0.6, acc  # 0.5 is chance
    assert sum(acc[-8:]) / 8 > sum(acc[:3]) / 3 + 0.05, acc
    # schedule (reference: int((t + 1) / T * 0.5 * 12) of the 12 masked patches)
    want = [int((t + 1) / STEPS * 0.5 * 12) / 12 for t in range(STEPS)]
    assert [x["hpm/masked_hard_fraction"] for x in m] == want and want[0] == 0 and want[-1] == 0.5
    assert m[0]["hpm/ema_decay"] == 0.5 and m[-1]["hpm/ema_decay"] == pytest.approx(0.9)
    assert single["quiet_step"]
    assert single["resumed_ema"] and single["resumed_metrics"]
    assert single["resumed_loss"] == single["next_loss"]


def test_masks_are_the_teacher_predicted_hardest(shards, tmp_path):
    """prepare_batches: the teacher forward runs with the EMA weights (a copy of the model
    holding them predicts the same), leaves the live weights exactly as they were, and
    every sample's n_hard predicted-hardest patches are masked."""
    from distreg.hooks.hpm import HardPatchesMining
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(run_config(shards, str(tmp_path), 1), Comm(), track=False)
    for _ in range(2):
        trainer.train_step()
    h: HardPatchesMining = trainer.hooks[0]
    model = trainer.strategy.module
    live = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(teacher.parameters(), h.ema):
            p.copy_(e.view_as(p))
    assert any(not torch.equal(p, q) for p, q in zip(teacher.parameters(), model.parameters()))
    batches = trainer._to_device(trainer.data.next_step())
    from distreg.models.mae import add_random_masks

    batches = add_random_masks(batches, trainer.cfg.model.mae, 0, trainer.step)
    preds = h._teacher_predictions(trainer.ctx, batches)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in live.items())
    with torch.no_grad():
        torch.testing.assert_close(preds[0], teacher(batches[0]["input"])["loss_pred"], rtol=0, atol=1e-6)
    masked = h.prepare_batches(trainer.ctx, batches)
    k = 6  # 0.5 of the 12 masked patches
    for b, p in zip(masked, preds):
        hardest = torch.argsort(p, dim=1, stable=True)[:, -k:]
        for vis, hard in zip(b["visible"], hardest):
            assert vis.numel() == 4 and not set(vis.tolist()) & set(hard.tolist())


def test_hpm_needs_the_mae_model():
    from distreg.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="schedule_steps"):
        load_config(None, ["hooks=[{name: hpm, ema_ramp_steps: 10}]"])
    from distreg.hooks.base import HookContext
    from distreg.hooks.hpm import HardPatchesMining

    h = HardPatchesMining(HardPatchesMining.Params(schedule_steps=2, ema_ramp_steps=2))
    with pytest.raises(ValueError, match="needs model.kind=mae"):
        h.prepare_model(torch.nn.Linear(2, 2), HookContext(comm=Comm(), strategy="ddp", model=None))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_rank_invariance_against_single_process(runs, name):
    _, single, ranks = runs
    assert all(m["hpm/masked_hard_fraction"] == 0.5 for m in single["metrics"][1:])  # teacher masks in use
    for got in (r[name] for r in ranks):
        assert got["losses"] == pytest.approx(single["losses"], abs=1e-5)
        assert len(got["metrics"]) == INV_STEPS
        for a, b in zip(got["metrics"], single["metrics"]):
            assert a.keys() == b.keys()
            for key, v in b.items():
                assert a[key] == pytest.approx(v, rel=1e-5, abs=1e-6), f"{name}: {key}"
        assert got["predictor"].keys() == single["predictor"].keys() and len(single["predictor"]) > 0
        for k, w in single["predictor"].items():
            torch.testing.assert_close(got["predictor"][k], w, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {k}: {m}")


def test_mae_config_is_checked_before_compute():
    from distreg.config import ConfigError, load_config
    from distreg.runs.preflight import check_model

    base = ["model.kind=mae", "data.kind=imagenet", "data.image_size=32"]
    with pytest.raises(ConfigError, match=r"model.mae.image_size=32 but data.image_size=64"):
        load_config(None, base + ["data.image_size=64"])
    with pytest.raises(ConfigError, match="not divisible by model.mae.patch_size"):
        load_config(None, base + ["model.mae.patch_size=5"])
    with pytest.raises(ConfigError, match="trains on data.kind imagenet"):
        check_model(load_config(None, ["model.kind=mae", "data.image_size=32"]))
    info = check_model(load_config(None, base + ["strategy.name=ddp", "hooks=[{name: hpm, schedule_steps: 4, ema_ramp_steps: 4}]"]))
    assert info["params"] > 0 and info["bytes"]["hook:hpm"] == 4 * info["trainable"]  # DDP: whole EMA copy


def test_off_logging_steps_add_no_host_read_or_collective(shards, tmp_path):
    """A step with teacher-chosen masks, off the logging schedule, reads nothing back and
    runs no collective beyond what the plain MAE step does (counted as tests/test_step_syncs.py
    counts them; SGD: CPU AdamW reads its per-parameter step counters, which the predictor adds to)."""
    from distreg.runtime.trainer import Trainer
    from tests.test_step_syncs import counting

    seen = {}
    for name, hooks in (("plain", []), ("hpm", [HOOK])):
        trainer = Trainer(run_config(shards, str(tmp_path / name), 1, hooks=hooks, **INV), Comm(), track=False)
        trainer.train_step()
        trainer.data.next_step = (lambda batches: lambda: batches)(trainer.data.next_step())  # data outside the count
        with counting() as (counts, _):
            trainer.step_on_device(metrics_due=False)
        seen[name] = (counts["collectives"], counts["host_reads"], counts["where"])
        if hooks:
            assert trainer.hooks[0]._hard == 0.5  # the teacher chose the masks
    assert seen["hpm"] == seen["plain"]
