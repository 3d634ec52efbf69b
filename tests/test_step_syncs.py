"""The training step reads nothing back to the host and runs no collective of its own
(packed token windows: the counts are known); a logging step flushes the whole interval
with exactly one all-reduce and one host read. Counted with a wrapper on `Comm` and
patches of every tensor->host conversion (on a GPU each is a stream sync); data loading,
which works on host tensors before the copy, and the CPU optimizer's step counter (fused
AdamW on CUDA keeps it on the device) are not counted."""
from __future__ import annotations

import contextlib
import json
import statistics
from unittest import mock

import pytest
import torch

from distreg.runtime.comm import Comm
from tests.conftest import tiny_config

HOST_READS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")


@contextlib.contextmanager
def counting():
    counts = {"collectives": 0, "host_reads": 0, "where": []}
    active = [True]
    real = {n: getattr(torch.Tensor, n) for n in HOST_READS}

    def host(name):
        def f(self, *a, **k):
            if active[0]:
                counts["host_reads"] += 1
                counts["where"].append(name)
            return real[name](self, *a, **k)
        return f

    def collective(name):
        orig = getattr(Comm, name)

        def f(self, *a, **k):
            if active[0]:
                counts["collectives"] += 1
                counts["where"].append(name)
            return orig(self, *a, **k)
        return f

    with contextlib.ExitStack() as stack:
        for n in HOST_READS:
            stack.enter_context(mock.patch.object(torch.Tensor, n, host(n)))
        for n in ("all_reduce", "all_gather", "all_gather_uneven", "broadcast", "broadcast_object"):
            stack.enter_context(mock.patch.object(Comm, n, collective(n)))
        yield counts, active


def per_call(trainer, name: str, active, counts) -> list[tuple[int, int]]:
    """Wraps trainer.<name> to record (collectives, host reads) of each call."""
    seen = []
    fn = getattr(trainer, name)

    def wrapped(*a, **k):
        c0, h0 = counts["collectives"], counts["host_reads"]
        out = fn(*a, **k)
        seen.append((counts["collectives"] - c0, counts["host_reads"] - h0))
        return out

    setattr(trainer, name, wrapped)
    return seen


def untrack_data_and_optimizer(trainer, active) -> None:
    """Host-side batch assembly is not the step's business; the CPU AdamW reads its step
    counter (a host tensor) with .item(), the fused CUDA AdamW does not: neither counts."""
    def untracked(fn):
        def f(*a, **k):
            active[0] = False
            try:
                return fn(*a, **k)
            finally:
                active[0] = True
        return f

    trainer.data.next_step = untracked(trainer.data.next_step)
    trainer.strategy.optimizer.step = untracked(trainer.strategy.optimizer.step)


def test_step_sync_count(token_data, tmp_path):
    from distreg.runtime.loss import known_counts, step_counts
    from distreg.runtime.mfu import model_flops_per_token
    from distreg.runtime.trainer import Trainer

    cfg = tiny_config(token_data, str(tmp_path), **{
        "scaling.num_workers": 1, "strategy.name": "ddp", "train.max_steps": 4, "train.log_every": 2,
        "train.grad_accum_steps": 2, "hooks": "[{name: param_norm}]", "train.peak_tflops": 0.001})
    trainer = Trainer(cfg, Comm(), track=False)
    next_step = trainer.data.next_step
    with counting() as (counts, active):
        untrack_data_and_optimizer(trainer, active)
        steps = per_call(trainer, "step_on_device", active, counts)
        logs = per_call(trainer, "_log", active, counts)
        result = trainer.fit()
        # Declared: the step itself reads nothing back and, with the counts known from
        # packed windows, runs no collective of its own.
        assert steps == [(0, 0)] * 4, counts["where"]
        # Logging steps 2 and 4: one all-reduce + one host read for the whole interval
        # (hook metrics are read there too, by the MLflow path, off here).
        assert logs == [(0, 0), (1, 1), (0, 0), (1, 1)], counts["where"]
        assert sorted(result.losses) == [1, 2, 3, 4]
        # MFU per logging interval (peak from train.peak_tflops here) in the summary.
        summary = json.loads((tmp_path / "summary.json").read_text())
        flops = model_flops_per_token(cfg)
        assert result.mfu == pytest.approx([t * flops / 1e9 for t in result.tokens_per_s_per_device])
        assert len(result.mfu) == 2 and summary["mfu"] == pytest.approx(statistics.median(result.mfu))
        # Data without the guarantee: one all-reduce of the counts per step, still no read.
        trainer.data.full_windows = False
        trainer.step_on_device()
        assert steps[-1] == (1, 0), counts["where"]
    # The guarantee holds for packed token windows: assumed counts = counted ones.
    counted = step_counts(next_step(), Comm())
    assert known_counts(trainer.data, cfg.train.global_batch_size, cfg.data.seq_len) is None
    trainer.data.full_windows = True
    assert known_counts(trainer.data, cfg.train.global_batch_size, cfg.data.seq_len) == (counted.tokens, counted.samples)


# Per micro-batch, what the methods need every step (declared in the hooks' docstrings):
# loss_reweighting one MAX all-reduce (the group's loss range) + one all-gather (the tilt
# normaliser and the group's mass together); z_loss_logit and collapse_monitor nothing.
# Metrics (logging steps only): z_loss_logit 1 all-reduce, collapse_monitor 1,
# loss_reweighting's weight_stats 3; param_norm none (replicated parameters).
METHOD_COLLECTIVES_PER_MICRO_BATCH = 2
METRIC_COLLECTIVES = 1 + 1 + 3


def test_hook_step_sync_count(token_data, tmp_path):
    """A step with loss hooks: on a non-logging step exactly the method's collectives and no
    host read; metric reductions only on the logging step. Counted at world size 1, where
    `Comm` calls are still made (no-ops), so the count is the one of every world size."""
    from distreg.runtime.trainer import Trainer

    cfg = tiny_config(token_data, str(tmp_path), **{
        "scaling.num_workers": 1, "strategy.name": "ddp", "train.max_steps": 3, "train.log_every": 3,
        "train.grad_accum_steps": 2,
        "hooks": "[{name: loss_reweighting, r: 0.5}, {name: z_loss_logit}, {name: collapse_monitor}, "
                 "{name: param_norm}]"})
    trainer = Trainer(cfg, Comm(), track=False)
    with counting() as (counts, active):
        untrack_data_and_optimizer(trainer, active)
        steps = per_call(trainer, "step_on_device", active, counts)
        result = trainer.fit()
    method = METHOD_COLLECTIVES_PER_MICRO_BATCH * cfg.train.grad_accum_steps
    assert steps[:2] == [(method, 0)] * 2, counts["where"]  # steps 1, 2: not logging steps
    assert steps[2][0] == method + METRIC_COLLECTIVES and steps[2][1] > 0, counts["where"]  # step 3 logs
    assert sorted(result.losses) == [1, 2, 3]
    metrics = {}
    for hook in trainer.hooks:
        metrics.update(hook.metrics())
    # the metrics of the logging step are there (and global: world size 1 here)
    assert {"loss_reweighting/ess", "z_loss_logit/value", "collapse_monitor/zero_loss",
            "hooks/param_norm"} <= metrics.keys()
    assert metrics["loss_reweighting/weight_mean"] == pytest.approx(1 / cfg.train.global_batch_size)
