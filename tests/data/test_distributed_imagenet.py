"""Two real gloo ranks (DDP) train on the shards with decode workers and a corrupt
image: the rank that meets it skips it, and the count rank 0 reports covers the job."""
from __future__ import annotations

import math
import os

from distreg.data.position import epoch_permutation
from distreg.data.tarshards import ShardIndex
from distreg.testing import run_distributed


def _train(cfg: dict) -> dict:
    from distreg.config import RunConfig
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(RunConfig.model_validate(cfg), track=False)
    result = trainer.fit()
    return {"losses": result.losses, "metrics": trainer.data.metrics(), "skipped": trainer.data.skipped_local}


def test_two_ranks_skip_and_count_a_corrupt_image(shard_copy, tmp_path):
    from distreg.config import load_config

    split = os.path.join(shard_copy, "train")
    bad = int(epoch_permutation(48, 0, 0, True)[5])  # step 1, in rank 1's half of the global batch of 8
    index = ShardIndex(split)
    j, start, _ = index.locate(bad)
    with open(index.shards[j], "r+b") as f:
        f.seek(start + 3 * 512)  # the .jpg member's data
        f.write(b"not a jpeg" * 30)
    cfg = load_config("configs/imagenet_tiny.yaml", [
        f"data.path={split}", f"run_dir={tmp_path}", "scaling.num_workers=2", "strategy.name=ddp",
        "train.global_batch_size=8", "train.max_steps=2", "model.num_classes=4", "data.image_size=32",
        "model.arch=mobilenet_v3_small",  # the data path is under test: a small model is enough
        "data.num_workers=1", "data.skip_corrupt=true", "checkpoint.every=0"])
    rank0, rank1 = run_distributed(_train, 2, cfg.model_dump(mode="json"))
    assert rank0["losses"] == rank1["losses"] and all(math.isfinite(v) for v in rank0["losses"].values())
    assert rank0["skipped"] == [] and len(rank1["skipped"]) == 1 and f"sample {bad}:" in rank1["skipped"][0]
    assert rank0["metrics"]["data/skipped_samples"] == 1 == rank1["metrics"]["data/skipped_samples"]
