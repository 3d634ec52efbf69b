"""The imagenet data source: rank invariance, resume across ranks and workers,
transforms, global index, reading over a real HTTP server."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from distreg.data.images import ImageBatches, ImageSamples
from tests.data.httpserver import serve

SIZE = 16  # image side in these tests: small is fast


def _streams(url: str, world: int, accum: int = 1, global_batch: int = 8, workers: int = 0, **kw):
    samples = ImageSamples(url, SIZE, **kw)
    return [ImageBatches(samples, global_batch, accum, r, world, seed=5, num_workers=workers) for r in range(world)]


def _step(streams) -> list[dict]:
    """One optimizer step of all ranks: the micro-batches in global order (micro-batch
    major, then rank, as `rank_slices` lays them out)."""
    per_rank = [s.next_step() for s in streams]
    return [per_rank[r][m] for m in range(len(per_rank[0])) for r in range(len(streams))]


def _cat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in ("input", "target", "index")}


def test_each_sample_once_per_epoch_and_same_global_batches_for_1_2_4_ranks(imagenet_shards):
    train = os.path.join(imagenet_shards, "train")  # 48 samples, global batch 8: 6 steps an epoch
    runs = {}
    for world, accum in ((1, 1), (2, 1), (4, 1), (2, 2)):
        streams = _streams(train, world, accum)
        runs[(world, accum)] = [_cat(_step(streams)) for _ in range(6)]
    ref = runs[(1, 1)]
    assert sorted(torch.cat([s["index"] for s in ref]).tolist()) == list(range(48))  # exactly once
    for key, steps in runs.items():
        epoch = Counter(torch.cat([s["index"] for s in steps]).tolist())
        assert epoch == Counter(range(48)), key  # the same multiset for every world size
        for a, b in zip(steps, ref):  # and the same global batch, pixels included, at every step
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["target"], b["target"])
            assert torch.equal(a["input"], b["input"]), key


def test_resume_on_other_ranks_and_worker_counts_sees_the_same_samples(imagenet_shards):
    train = os.path.join(imagenet_shards, "train")
    straight = _streams(train, 1)
    expected = [_cat(_step(straight)) for _ in range(9)]  # crosses into epoch 1 at step 7
    first = _streams(train, 1, workers=0)
    for _ in range(4):
        _step(first)
    state = first[0].state_dict()
    resumed = _streams(train, 2, accum=2, workers=2)  # 2 ranks x 2 decode workers, other accumulation
    for s in resumed:
        s.load_state_dict(state)
    for step in range(4, 9):
        got = _cat(_step(resumed))
        assert torch.equal(got["index"], expected[step]["index"]), step
        assert torch.equal(got["input"], expected[step]["input"]), step
    assert resumed[0].state_dict()["epoch"] == 1 == straight[0].state_dict()["epoch"]
    for s in resumed:
        s.close()


def test_labels_transforms_and_global_index(imagenet_shards):
    train = os.path.join(imagenet_shards, "train")
    samples = ImageSamples(train, 32)
    batch = samples.__getitems__([(0, 0), (0, 47)])
    assert batch["input"].shape == (2, 3, 32, 32) and batch["input"].dtype == torch.uint8  # normalised on the device
    assert batch["index"].tolist() == [0, 47]
    assert batch["target"].tolist() == [int(samples.index.read(i)["cls"]) for i in (0, 47)]
    # Train augmentation is seeded per (seed, epoch, index): reproducible, new each epoch.
    assert torch.equal(samples.load(0, 3)[0], samples.load(0, 3)[0])
    assert not torch.equal(samples.load(0, 3)[0], samples.load(1, 3)[0])
    # Val: resize + centre crop, deterministic; roughly normalised values.
    val = ImageSamples(os.path.join(imagenet_shards, "val"), 24, train=False)
    a, b = val.load(0, 1)[0], val.load(3, 1)[0]
    assert a.shape == (3, 24, 24) and torch.equal(a, b) and a.dtype == torch.uint8 and 0 < float(a.double().mean()) < 255


def test_uint8_batches_normalised_on_the_device_equal_the_host_pipeline(imagenet_shards):
    """The loader yields uint8; the Trainer's batch move normalises after the copy. The fp32
    result equals the former host pipeline (ToDtype(scale) + Normalize per sample) bitwise,
    and hand-computed pixels."""
    from types import SimpleNamespace

    from torchvision.transforms import v2

    from distreg.data.transforms import MEAN, STD, normalize_on_device
    from distreg.runtime.trainer import Trainer

    # by hand: (p / 255 - mean_c) / std_c
    px = torch.zeros(1, 3, 1, 3, dtype=torch.uint8)
    px[0, 0, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    px[0, 2, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    got = normalize_on_device(px)
    assert got.dtype == torch.float32
    assert got[0, 0, 0].tolist() == pytest.approx([-2.1179039, 0.0740646, 2.2489083], abs=1e-6)  # R: 0.485, 0.229
    assert got[0, 2, 0].tolist() == pytest.approx([-1.8044444, 0.4264924, 2.64], abs=1e-6)  # B: 0.406, 0.225
    host = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    for train in (True, False):
        samples = ImageSamples(os.path.join(imagenet_shards, "train"), 32, train=train)
        batch = samples.__getitems__([(0, 3), (1, 3), (0, 40)])
        del batch["skipped"]  # ImageBatches.next_step hands the Trainer tensors only
        assert batch["input"].dtype == torch.uint8
        (moved,) = Trainer._to_device(SimpleNamespace(device=torch.device("cpu")), [batch])
        want = torch.stack([host(img) for img in batch["input"]])
        assert moved["input"].dtype == torch.float32 and torch.equal(moved["input"], want)
        assert torch.equal(moved["index"], batch["index"]) and torch.equal(moved["target"], batch["target"])


@pytest.mark.parametrize("ranges", [True, False], ids=["range-requests", "server-ignores-range"])
def test_reads_shards_over_http(imagenet_shards, ranges):
    local = _streams(os.path.join(imagenet_shards, "train"), 2, global_batch=4)
    with serve(imagenet_shards, ranges=ranges) as base:
        remote = _streams(f"{base}/train", 2, global_batch=4)
        for _ in range(2):
            a, b = _cat(_step(local)), _cat(_step(remote))
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["input"], b["input"])
