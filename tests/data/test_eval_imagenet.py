"""Held-out evaluation of an ImageNet split: every image once on 1/2/3 ranks with its
label, and top-1 / top-5 / loss of the Evaluator equal to a direct computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from distreg.config import load_config
from distreg.data.heldout import build_heldout
from distreg.data.images import ImageSamples
from distreg.data.transforms import MEAN, STD
from distreg.runtime.comm import Comm
from distreg.runtime.evaluate import Evaluator

SIZE = 32


def _cfg(split: str, batch: int):
    return load_config(None, ["model.kind=torchvision", "model.arch=resnet18", "model.num_classes=4",
                              "data.kind=imagenet", f"data.path={split}", f"data.image_size={SIZE}",
                              f"eval.path={split}", f"eval.batch_size={batch}", "scaling.num_workers=1",
                              "train.global_batch_size=4"])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_image_once_with_its_label(imagenet_shards, world):
    split = f"{imagenet_shards}/train"  # 48 labelled images
    samples = ImageSamples(split, SIZE, train=False)
    seen = {}
    for rank in range(world):
        for b in build_heldout(_cfg(split, 5), rank, world).batches():
            for i, label in zip(b["index"].tolist(), b["target"].tolist()):
                if i >= 0:
                    assert i not in seen
                    seen[i] = label
    assert sorted(seen) == list(range(len(samples)))
    assert all(seen[i] == samples.load(0, i)[1] for i in (0, 17, len(samples) - 1))


class _MeanPixel(torch.nn.Module):
    """A fixed classifier: logits = W @ per-channel means (deterministic, no training)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 7)
        torch.nn.init.normal_(self.fc.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_top1_top5_loss_match_direct(imagenet_shards):
    split = f"{imagenet_shards}/train"
    model = _MeanPixel()
    metrics = Evaluator(_cfg(split, 5), Comm(), torch.device("cpu")).run(model, model)
    samples = ImageSamples(split, SIZE, train=False)
    images, labels = zip(*(samples.load(0, i) for i in range(len(samples))))
    host = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])  # uint8 -> the model's input
    with torch.no_grad():
        logits = model(torch.stack([host(img) for img in images]))
    labels = torch.tensor(labels)
    assert metrics["eval/samples"] == len(samples)
    assert metrics["eval/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert metrics["eval/top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert metrics["eval/top5"] == pytest.approx((logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item())
    assert 0 < metrics["eval/top5"] <= 1 and metrics["eval/top1"] <= metrics["eval/top5"]
