"""One-batch prefetch across steps (`Trainer.fit`): the next step's micro-batches are
fetched and copied at the end of the current step. The batches each step trains on are
the ones without prefetch, and a checkpoint taken while a prefetch is pending holds the
data position of the steps run (a resume trains on exactly the batches that followed)."""
from __future__ import annotations

import torch

from distreg.hooks.base import Hook
from distreg.runtime.checkpoint import step_path
from distreg.runtime.comm import Comm
from tests.conftest import tiny_config


class _Seen(Hook):
    """Records (step, micro-step, sample indices, epoch) of every micro-batch a step trains on."""

    name = "seen"

    def __init__(self):
        super().__init__(Hook.Params())
        self.rows = []

    def loss(self, ctx, out, batch, terms):
        self.rows.append((ctx.step, ctx.micro_step, batch["index"].tolist(), ctx.epoch))
        return terms


def _trainer(token_data, run_dir):
    from distreg.runtime.trainer import Trainer

    cfg = tiny_config(token_data, run_dir, **{"scaling.num_workers": 1, "strategy.name": "ddp",
                                              "train.max_steps": 8, "train.grad_accum_steps": 2,
                                              "checkpoint.every": 4, "train.log_every": 4})
    t = Trainer(cfg, Comm(), track=False)
    t.hooks.append(_Seen())
    return t


def test_prefetch_same_batches_and_exact_resume(tmp_path):
    from distreg.data.tokens import synth_tokens

    token_data = str(tmp_path / "tokens")  # ~60 windows of 32 tokens, 8 per step: an epoch ends inside the 8 steps
    synth_tokens(token_data, num_tokens=2000, vocab_size=256, num_shards=1)
    with_prefetch = _trainer(token_data, str(tmp_path / "a"))
    result = with_prefetch.fit()
    seen = with_prefetch.hooks[-1].rows
    assert len(seen) == 16 and with_prefetch._prefetched is None  # nothing fetched past the last step

    plain = _trainer(token_data, str(tmp_path / "b"))
    losses, plain_states = {}, {}
    for step in range(1, 9):
        losses[step] = plain.train_step()[0]  # no prefetch
        plain_states[step] = plain.data.state_dict()
    assert plain.hooks[-1].rows == seen
    assert losses == result.losses
    assert len({e for *_, e in seen}) > 1  # the run crosses an epoch boundary

    # The step-4 checkpoint was written while step 5's batches were prefetched: it holds
    # the position after step 4, and a resume trains on the batches of steps 5..8.
    path = step_path(with_prefetch.cfg.checkpoint_dir, 4)
    state = torch.load(path + "/trainer.pt", weights_only=False)
    assert state["data"] == plain_states[4]
    resumed = _trainer(token_data, str(tmp_path / "c"))
    resumed._resume(path)
    res = resumed.fit()
    assert resumed.hooks[-1].rows == seen[8:]
    assert {s: res.losses[s] for s in range(5, 9)} == {s: result.losses[s] for s in range(5, 9)}
