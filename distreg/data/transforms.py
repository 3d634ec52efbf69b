"""JPEG decode and the standard ImageNet transforms (torchvision.transforms.v2).

Augmentation randomness is seeded per sample from (seed, epoch, global index), not
drawn from a per-worker stream: the pixels a sample gets then do not depend on which
rank or dataloader worker decodes it, so a run resumed on another number of ranks or
workers sees exactly the tensors the uninterrupted run would.

Images travel as uint8 [B, 3, S, S] (a quarter of the fp32 bytes through the loader
workers, pinned memory and the host->device copy) and are scaled and normalised on the
device by `device_input.model_input` (the Trainer's batch move, the Evaluator), with the same
torchvision kernels the host pipeline used: the fp32 result is bitwise the one
`ToDtype(float32, scale=True) + Normalize(MEAN, STD)` gave on the host.
"""
from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def decode(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W] RGB from JPEG (or PNG, GIF, WebP) bytes; greyscale and CMYK
    JPEGs, which ImageNet has, are converted. Raises on undecodable bytes."""
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def train_transform(size: int) -> v2.Transform:
    """RandomResizedCrop(size) + horizontal flip (the ResNet recipe), uint8 out;
    `normalize_on_device` completes it."""
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


def val_transform(size: int) -> v2.Transform:
    """Resize the short side to size*256/224 (256 for 224), centre crop `size`, uint8 out;
    `normalize_on_device` completes it."""
    return v2.Compose([v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)])


def normalize_on_device(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std, where `images` lives."""
    from torchvision.transforms.v2 import functional as F

    return F.normalize(F.to_dtype(images, torch.float32, scale=True), MEAN, STD)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1)


def apply_seeded(transform: v2.Transform, image: torch.Tensor, seed: int) -> torch.Tensor:
    """Run `transform` with torch's global RNG seeded to `seed`, restoring the caller's
    RNG afterwards (the Trainer's own random state must not move)."""
    # torch.random.fork_rng + torch.manual_seed would do, but manual_seed also queues a
    # lazy CUDA seed with a formatted stack trace: ~1 ms per sample. Only the CPU
    # generator drives the transforms.
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        return transform(image)
    finally:
        gen.set_state(state)
