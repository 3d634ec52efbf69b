"""`checkpoint.async: true`: a run resumed from asynchronously written checkpoints
continues exactly as a run that never stopped (fsdp2: DCP async_save; ZeRO-3: staged
copy), and the COMPLETE marker appears only once every rank's upload has finished
(the upload is held back by a gate: no marker while it waits, the marker after)."""
from __future__ import annotations

import os
import threading

from distreg.runtime import checkpoint as ckpt
from distreg.testing import run_distributed
from tests.conftest import record_eval_losses, tiny_config

CASES = {
    "fsdp2": {"strategy.name": "fsdp2"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
}


def resumed_from_async(data: str, root: str) -> dict:
    from distreg.runtime.trainer import train_worker

    out = {}
    for name, extra in CASES.items():
        common = {"scaling.num_workers": 2, "train.max_steps": 4, "optim.lr": 0.01, "checkpoint.every": 2, **extra}
        straight = tiny_config(data, f"{root}/{name}/straight", **common)
        split = tiny_config(data, f"{root}/{name}/split", **common, **{"checkpoint.async": True})
        a = train_worker(straight.model_dump(mode="json"), track=False)
        b1 = train_worker(split.model_dump(mode="json"), track=False, stop_at=2)
        b2 = train_worker(split.model_dump(mode="json"), resume=True, track=False)
        out[name] = (a.losses, b1.losses, b2.losses, [s for s, _ in ckpt.complete_checkpoints(split.checkpoint_dir)])
    return out


def gated_marker(data: str, root: str) -> dict:
    from distreg.runtime.async_checkpoint import AsyncCheckpointer
    from distreg.runtime.comm import Comm
    from distreg.runtime.trainer import Trainer

    gate = threading.Event()

    class Gated(AsyncCheckpointer):
        def _stage_dcp(self, *args):
            upload = super()._stage_dcp(*args)
            return lambda: (gate.wait(timeout=120), upload())

    cfg = tiny_config(data, f"{root}/gated", **{"scaling.num_workers": 2, "checkpoint.async": True})
    t = Trainer(cfg, Comm(), track=False)
    t._async_ckpt = Gated(t.comm)
    t.train_step()
    t.step = t.ctx.step
    path = t.save()
    t.train_step()  # the step goes on while the save is held back
    t.comm.barrier()
    before = os.path.exists(os.path.join(path, ckpt.MARKER))
    gate.set()
    t.wait_for_checkpoint()
    t.comm.barrier()
    return {"before": before, "after": os.path.exists(os.path.join(path, ckpt.MARKER)),
            "complete": ckpt.complete_checkpoints(cfg.checkpoint_dir)}


def test_resume_from_async_checkpoints_is_exact(token_data, tmp_path):
    runs = run_distributed(resumed_from_async, 2, token_data, str(tmp_path))[0]
    for name, (straight, first, resumed, complete) in runs.items():
        assert complete == [2, 4], name
        assert list(first) == [1, 2] and list(resumed) == [3, 4], name
        for step in (1, 2):
            assert first[step] == straight[step], (name, step)
        for step in (3, 4):
            assert resumed[step] == straight[step], (name, step)


def test_marker_only_after_every_upload(token_data, tmp_path):
    for rank in run_distributed(gated_marker, 2, token_data, str(tmp_path)):
        assert rank["before"] is False and rank["after"] is True
        assert [s for s, _ in rank["complete"]] == [1]


def test_async_saves_keep_the_best_checkpoint(token_data, tmp_path):
    """keep_best with asynchronous saves: pruned after each upload completes, by the same
    rule as synchronous saves (mode max: the best is the first step, which keep_last
    alone would prune)."""
    from distreg.runtime.comm import Comm
    from distreg.runtime.trainer import Trainer

    cfg = tiny_config(token_data, str(tmp_path), **{
        "scaling.num_workers": 1, "strategy.name": "ddp", "train.max_steps": 3, "checkpoint.every": 1,
        "checkpoint.async": True, "checkpoint.keep_last": 1, "eval.path": token_data, "eval.every": 1,
        "eval.batch_size": 4, "eval.max_samples": 8, "checkpoint.keep_best": "{metric: eval/loss, mode: max}"})
    trainer = Trainer(cfg, Comm(), track=False)
    history = record_eval_losses(trainer)
    trainer.fit()
    kept = {s: ckpt.load_torch(f"{p}/trainer.pt")["eval"]["eval/loss"] for s, p in ckpt.complete_checkpoints(cfg.checkpoint_dir)}
    best = max(history, key=lambda s: (history[s], -s))
    assert best != 3 and set(kept) == {3, best}
    assert all(kept[s] == history[s] for s in kept)
