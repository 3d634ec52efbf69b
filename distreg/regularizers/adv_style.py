"""Adversarial Style Augmentation (AdvStyle; Zhang, Deng, Li, Jia, Zhang, "Adversarial Style
Augmentation for Domain Generalization", arXiv 2301.12643, 2023): the functional core.

Read from the authors' code (github YBZh/AdvStyle, `Dassl.pytorch/dassl/modeling/ops/
advstyle.py` and `imcls/trainers/vanilla2_advstyle.py`, the image-classification
version). For a feature map x [B, C, H, W] at a chosen layer:

    mu_bc  = mean_hw x                      sig_bc = sqrt(var_hw x + eps)   (unbiased var)
    x_norm = (x - mu) / sig
    mu~    = mu  + e_mu  * s_mu             sig~   = sig + e_sig * s_sig
    out    = x_norm * sig~ + mu~            e_mu, e_sig ~ N(0, 1) per sample and channel

s_mu, s_sig in R^C are the learnable adversarial style scales of that layer (the
reference's `adv_mean_std`, `adv_std_std`), shared by all samples and persistent across
steps. They are initialised once, from the batch that first reaches the layer, to the
standard deviation over samples of mu and sig: s = sqrt(var_b(mu) + eps) (unbiased), and
updated by gradient *ascent* on the task loss: the reference passes them through a
gradient-reversal layer of coefficient `adv_weight` and steps them with their own SGD
optimizer (momentum 0, weight decay 0, the model's learning rate and schedule), i.e.

    s <- s + lr * adv_weight * dL/ds.

Everything here is per sample except the initial scales (a variance over the batch) and
the ascent gradient (a sum over the batch): both are formed from sums that the hook
all-reduces over ranks (`init_scales` takes the sums, not the batch).
"""
from __future__ import annotations

import math

import torch

from distreg.sparsity.masks import index_uniform_at

EPS = 1e-6  # the reference module's `eps`


def channel_stats(x: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel (mean, std) of a [B, C, H, W] map, each [B, C, 1, 1]; the std
    is sqrt(unbiased variance over H·W + eps), as the reference's `x.var(dim=[2, 3])`."""
    if x.dim() != 4:
        raise ValueError(f"adv_style: expected a [B, C, H, W] feature map, got shape {tuple(x.shape)}")
    if x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"adv_style: a {x.shape[2]}x{x.shape[3]} feature map has no spatial variance "
                         "(unbiased variance needs H·W >= 2): perturb an earlier layer or use larger images")
    mu = x.mean(dim=(2, 3), keepdim=True)
    sig = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt()
    return mu, sig


def perturb(x: torch.Tensor, mean_scale: torch.Tensor, std_scale: torch.Tensor, noise_mean: torch.Tensor,
            noise_std: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """x re-styled with perturbed statistics: (x - mu)/sig * (sig + e_sig*s_sig) + mu + e_mu*s_mu.

    mean_scale, std_scale: [C] (the adversarial scales); noise_*: [B, C] (unit normals).
    Differentiable in x and in both scales (mu and sig are not detached, as in the reference)."""
    mu, sig = channel_stats(x, eps)
    b, c = x.shape[:2]
    new_mu = mu + (noise_mean.reshape(b, c, 1, 1) * mean_scale.reshape(1, c, 1, 1)).to(x.dtype)
    new_sig = sig + (noise_std.reshape(b, c, 1, 1) * std_scale.reshape(1, c, 1, 1)).to(x.dtype)
    return (x - mu) / sig * new_sig + new_mu


def moment_sums(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """[5, C] float64 sums over this batch's samples for `init_scales`: sum mu, sum mu^2,
    sum sig, sum sig^2, and the sample count (every channel)."""
    mu, sig = channel_stats(x.detach(), eps)
    mu, sig = mu.flatten(1).double(), sig.flatten(1).double()
    n = torch.full_like(mu[0], float(mu.shape[0]))
    return torch.stack([mu.sum(0), (mu * mu).sum(0), sig.sum(0), (sig * sig).sum(0), n])


def init_scales(sums: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """[2, C]: (s_mu, s_sig) = sqrt(unbiased var over samples of (mu, sig) + eps), from the
    (all-ranks) `moment_sums`; the reference's first-batch initialisation."""
    n = sums[4]
    if bool((n < 2).any()):
        raise ValueError("adv_style: initialising the style scales needs at least 2 samples")
    var_mu = ((sums[1] - sums[0] * sums[0] / n) / (n - 1)).clamp(min=0)
    var_sig = ((sums[3] - sums[2] * sums[2] / n) / (n - 1)).clamp(min=0)
    return torch.stack([(var_mu + eps).sqrt(), (var_sig + eps).sqrt()]).float()


def ascent(scales: torch.Tensor, grad: torch.Tensor, lr: float, adv_weight: float) -> torch.Tensor:
    """One reference ascent step: s + lr * adv_weight * dL/ds (SGD through the gradient
    reversal layer of coefficient adv_weight, no momentum, no weight decay)."""
    return scales + (lr * adv_weight) * grad


def keyed_normal(seed: int, key: str, index: torch.Tensor, channels: int) -> torch.Tensor:
    """[len(index), channels] float64 unit normals; element (b, c) depends only on (seed, key,
    index[b], c) (Box-Muller on two counter-based uniforms), so a sample draws the same
    noise on any rank, in any micro-batch, under any strategy."""
    j = index.to(torch.int64).reshape(-1, 1) * channels + torch.arange(channels, device=index.device)
    u1 = index_uniform_at(seed, key + "/u1", j)
    u2 = index_uniform_at(seed, key + "/u2", j)
    return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)  # 1 - u1 in (0, 1]
