"""A batch's `input` on the device, ready for the model (the Trainer's batch move, the
Evaluator). Image batches travel as uint8 and are normalised here, after the copy
(`transforms.normalize_on_device`); torchvision is imported only when an image arrives."""
from __future__ import annotations

import torch


def model_input(x: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """`x` on `device`; uint8 inputs are images (token ids are int64): scaled to [0, 1]
    and normalised with the ImageNet mean / std on `device`."""
    x = x.to(device, non_blocking=non_blocking)
    if x.dtype != torch.uint8:
        return x
    from distreg.data.transforms import normalize_on_device

    return normalize_on_device(x)
