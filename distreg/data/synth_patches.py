"""Synthetic ImageNet whose per-patch difficulty is predictable, for masked image modeling
tests and benchmarks: the same ILSVRC tree as `synth_imagenet` (and the same converter),
with every training image replaced by a left half of smooth colour ramps (easy to
reconstruct from context) and a right half of pixel noise (impossible to reconstruct), so a
loss predictor has something to rank."""
from __future__ import annotations

import glob
import os

import numpy as np
from PIL import Image

from distreg.data.synth_imagenet import synth_imagenet


def structured_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-3, 3, (2, 3))
    img = base[None, None] + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    right = xx >= w / 2
    img[right] = rng.uniform(0, 255, (int(right.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def synth_patch_imagenet(root: str, num_classes: int = 4, train_per_class: int = 8, seed: int = 0) -> None:
    """`synth_imagenet(root, ...)`, then its train JPEGs rewritten as structured images."""
    synth_imagenet(root, num_classes=num_classes, train_per_class=train_per_class, val_per_class=1,
                   min_size=32, max_size=40, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for path in sorted(glob.glob(os.path.join(root, "train", "*", "*.JPEG"))):
        with Image.open(path) as im:
            size = im.size
        Image.fromarray(structured_image(rng, size), "RGB").save(path, format="JPEG", quality=95)
