"""JPEG decode and the standard ImageNet transforms (torchvision.transforms.v2).

Augmentation randomness is seeded per sample from (seed, epoch, global index), not
drawn from a per-worker stream: the pixels a sample gets then do not depend on which
rank or dataloader worker decodes it, so a run resumed on another number of ranks or
workers sees exactly the tensors the uninterrupted run would.
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
    """RandomResizedCrop(size) + horizontal flip + normalise (the ResNet recipe)."""
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def val_transform(size: int) -> v2.Transform:
    """Resize the short side to size*256/224 (256 for 224), centre crop `size`, normalise."""
    return v2.Compose([v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


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
