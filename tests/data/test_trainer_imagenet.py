"""The tiny ImageNet config through the real Trainer (one process, DDP strategy, no
tracking): finite losses, data metrics, resume continues the same samples."""
from __future__ import annotations

import math
import os

import pytest

from distreg.config import load_config
from distreg.data.errors import DataError


def _cfg(shards: str, run_dir: str, *extra: str):
    return load_config("configs/imagenet_tiny.yaml", [
        f"data.path={os.path.join(shards, 'train')}", f"run_dir={run_dir}", "scaling.num_workers=1",
        "strategy.name=ddp", "train.global_batch_size=8", "train.max_steps=3", "model.num_classes=4",
        "data.image_size=32", "checkpoint.every=0", *extra])


@pytest.fixture(autouse=True)
def _repo_root_one_thread(monkeypatch):
    import torch

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    # Two intra-op threads on 2 shared cores are several times slower than one here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_imagenet_config_trains_and_resumes_exactly(imagenet_shards, tmp_path):
    from distreg.runtime.trainer import Trainer

    straight = Trainer(_cfg(imagenet_shards, str(tmp_path / "a")), track=False)
    result = straight.fit()
    assert sorted(result.losses) == [1, 2, 3]
    assert all(math.isfinite(v) and 0 < v < 10 for v in result.losses.values())
    assert straight.data.unit == "img" and straight.data.metrics()["data/skipped_samples"] == 0
    assert straight.data.state_dict()["consumed"] == 24
    assert straight.ctx.num_samples == 48 and straight.data.epoch == 0  # what per-sample hooks size stores by

    split = _cfg(imagenet_shards, str(tmp_path / "b"))
    Trainer(split, track=False).fit(stop_at=2)  # checkpoint at step 2, as a preemption would
    resumed = Trainer(split, track=False).fit(resume=True)
    assert sorted(resumed.losses) == [3]
    assert resumed.losses[3] == pytest.approx(result.losses[3], abs=1e-6)


def test_driver_checks_classes_and_path(imagenet_shards, tmp_path):
    from distreg.data import check_data

    with pytest.raises(DataError, match="model.num_classes=2 but .* has 4 classes"):
        check_data(_cfg(imagenet_shards, str(tmp_path), "model.num_classes=2"))
    with pytest.raises(DataError, match="no webdataset split"):
        check_data(_cfg(imagenet_shards, str(tmp_path), f"data.path={imagenet_shards}"))
    big = load_config("configs/imagenet_resnet50.yaml")  # the cluster config validates
    assert big.micro_batch_size == 128 and big.data.num_workers == 8
