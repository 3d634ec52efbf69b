"""The `self_distill_gt` hook and `distreg self-distill` rounds (real Trainer, tiny Llama).

- the hook's loss equals soft-target CE against α·onehot + (1-α)·softmax(teacher) computed by
  hand from the teacher checkpoint's model; α = 1 equals plain cross-entropy;
- rounds: round k's teacher is round k-1's final checkpoint; each round its own run_dir;
- ddp / fsdp2 / ZeRO-3 x2 = the single process (losses, metrics).
"""
from __future__ import annotations

import json

import pytest
import torch

from distreg.config import ConfigError
from distreg.runtime.comm import Comm
from distreg.self_distill import run_rounds
from distreg.testing import run_distributed
from tests.conftest import tiny_config

STEPS = 2


def fit(cfg) -> dict:
    from distreg.runtime.trainer import Trainer

    result = Trainer(cfg, Comm(), track=False).fit()
    return {"checkpoint": result.checkpoint, "losses": result.losses}


@pytest.fixture(scope="module")
def teacher(token_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdgt_teacher")
    return fit(tiny_config(token_data, str(root), **{"train.max_steps": 3, "scaling.num_workers": 1,
                                                     "strategy.name": "ddp"}))["checkpoint"]


def cfg_with(data, run_dir, teacher, world=1, **extra):
    hook = {"name": "self_distill_gt", "alpha": 0.6, "teacher": {"checkpoint": teacher}}
    return tiny_config(data, run_dir, **{"scaling.num_workers": world, "hooks": json.dumps([hook]),
                                         "train.max_steps": STEPS, "checkpoint.every": 0, **extra})


def test_loss_against_hand_targets_and_alpha_one_is_cross_entropy(token_data, tmp_path, teacher):
    from distreg.runtime.trainer import Trainer
    from distreg.runtime.weights import load_into
    from distreg.models import build_model

    cfg = cfg_with(token_data, str(tmp_path / "a"), teacher, **{"strategy.name": "ddp"})
    trainer = Trainer(cfg, Comm(), track=False)
    batch = trainer.data.next_step()[0]
    model = trainer.strategy.module
    hook = trainer.hooks[0]
    t_model = build_model(cfg.model, 0, "cpu", True)
    load_into(t_model, teacher)
    with torch.no_grad():
        z_s, z_t = model(batch["input"]), t_model.eval()(batch["input"])
        q = 0.6 * torch.nn.functional.one_hot(batch["target"], z_s.shape[-1]) + 0.4 * torch.softmax(z_t, -1)
        expect = (-(q * torch.log_softmax(z_s, -1)).sum(-1)).mean(1)
        from distreg.hooks.base import LossTerms

        terms = LossTerms(torch.zeros(len(expect)), torch.ones(len(expect)), batch["index"])
        got = hook.loss(trainer.ctx, z_s, batch, terms).per_sample
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    hook.params.alpha = 1.0
    with torch.no_grad():
        got1 = hook.loss(trainer.ctx, z_s, batch, terms).per_sample
    ce = torch.nn.functional.cross_entropy(z_s.flatten(0, 1), batch["target"].flatten(), reduction="none")
    torch.testing.assert_close(got1, ce.view(batch["target"].shape).mean(1), atol=1e-5, rtol=0)


def test_rounds_chain_checkpoints(token_data, tmp_path):
    cfg = tiny_config(token_data, str(tmp_path), **{"train.max_steps": 2, "scaling.num_workers": 1,
                                                    "strategy.name": "ddp", "checkpoint.every": 0})
    seen = []

    def train(c):
        seen.append(c)
        return fit(c)

    out = run_rounds(cfg, 2, [0.5, 0.25], train)
    assert [r["alpha"] for r in out] == [None, 0.5, 0.25]
    assert [c.run_dir for c in seen] == [f"{tmp_path}/round_{k}" for k in range(3)]
    assert seen[0].hooks == []
    for k in (1, 2):
        (spec,) = seen[k].hooks
        assert spec.name == "self_distill_gt" and spec.model_extra["teacher"]["checkpoint"] == out[k - 1]["checkpoint"]
        assert out[k - 1]["checkpoint"].startswith(f"{tmp_path}/round_{k - 1}/")
    with pytest.raises(ConfigError, match="2 values for 3 rounds"):
        run_rounds(cfg, 3, [0.5, 0.5], train)


# --------------------------------------------------------------------------- real strategies (one spawn)

STRATEGIES = {
    "ddp": {"strategy.name": "ddp"},
    "fsdp2": {"strategy.name": "fsdp2"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
}


def train(cfg) -> dict:
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(cfg, Comm(), track=False)
    losses, metrics = [], []
    for _ in range(STEPS):
        losses.append(float(trainer.train_step()[0]))
        metrics.append(trainer.hooks[0].metrics())
    return {"losses": losses, "metrics": metrics}


def two_rank_worker(data: str, root: str, teacher: str) -> dict:
    return {name: train(cfg_with(data, f"{root}/{name}", teacher, 2, **extra)) for name, extra in STRATEGIES.items()}


def test_rank_invariance_against_single_process(token_data, tmp_path, teacher):
    single = train(cfg_with(token_data, str(tmp_path / "single"), teacher, 1, **STRATEGIES["ddp"]))
    assert single["metrics"][0]["self_distill_gt/teacher_acc"] > 0
    ranks = run_distributed(two_rank_worker, 2, token_data, str(tmp_path), teacher)
    for name in STRATEGIES:
        for got in (r[name] for r in ranks):
            assert got["losses"] == pytest.approx(single["losses"], abs=1e-5), name
            for a, b in zip(got["metrics"], single["metrics"]):
                for key, v in b.items():
                    assert a[key] == pytest.approx(v, rel=1e-5, abs=1e-7), f"{name}: {key}"
