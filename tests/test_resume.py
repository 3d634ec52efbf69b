"""Exact resume: 20 steps straight vs 10 steps, stop, resume, 10 more - the losses of
steps 11-20 match, under fsdp2 and DeepSpeed ZeRO-3 (AdamW, warmup + cosine schedule,
gradient accumulation), and a crash mid-checkpoint leaves the previous one usable."""
from __future__ import annotations

import os

import pytest

from distreg.runtime import checkpoint as ckpt
from distreg.testing import run_distributed
from tests.conftest import tiny_config

CASES = {
    "fsdp2": {"strategy.name": "fsdp2"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
}


def straight_and_resumed(data: str, root: str) -> dict:
    from distreg.runtime.trainer import train_worker

    out = {}
    for name, extra in CASES.items():
        common = {"scaling.num_workers": 2, "train.grad_accum_steps": 2, "train.max_steps": 20,
                  "optim.warmup_steps": 3, "optim.lr": 0.01, "checkpoint.every": 10, **extra}
        straight = tiny_config(data, f"{root}/{name}/straight", **common)
        split = tiny_config(data, f"{root}/{name}/split", **common)
        a = train_worker(straight.model_dump(mode="json"), track=False)
        b1 = train_worker(split.model_dump(mode="json"), track=False, stop_at=10)
        b2 = train_worker(split.model_dump(mode="json"), resume=True, track=False)
        out[name] = (a.losses, b1.losses, b2.losses)
    return out


@pytest.fixture(scope="module")
def runs(token_data, tmp_path_factory):
    return run_distributed(straight_and_resumed, 2, token_data, str(tmp_path_factory.mktemp("resume")))[0]


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_run_continues_the_same_curve(runs, name):
    straight, first, second = runs[name]
    assert sorted(first) == list(range(1, 11))
    assert sorted(second) == list(range(11, 21))  # resumed at step 10, not from scratch
    for step in range(1, 21):
        got = first[step] if step <= 10 else second[step]
        assert got == pytest.approx(straight[step], abs=1e-6), f"step {step}"
    assert straight[20] < straight[1]  # it learned something


def test_incomplete_checkpoint_is_ignored(tmp_path):
    root = str(tmp_path)
    for step in (10, 20):
        os.makedirs(ckpt.step_path(root, step))
    ckpt.write_bytes_atomic(os.path.join(ckpt.step_path(root, 10), ckpt.MARKER), b"10\n")
    # step 20 was being written when the job died: no marker, so step 10 is the latest.
    assert ckpt.latest_checkpoint(root) == (10, ckpt.step_path(root, 10))
    assert ckpt.latest_checkpoint(str(tmp_path / "nothing")) is None
