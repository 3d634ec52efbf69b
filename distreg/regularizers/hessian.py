"""Hessian-trace monitor for the dynamical stability of SGD (spec regularizers.md section 15).

Hutchinson: tr(H) ≈ mean_t v_t^T H v_t over Rademacher probes v_t, stopped like PyHessian's
`trace` [CODE]: at most `max_probes` (100), stop when |mean_new - mean_old| / (|mean_old| + 1e-6)
< tol (1e-3). Logged as rho = lr * tr(H) / 2 (rho > 1: the minimum would be unstable for SGD).

Shared randomness (spec P6): every probe entry is keyed by (seed, step, probe, parameter name,
global flat offset), so a sharded probe equals the single-process one and all ranks agree
without communication.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from distreg.regularizers._dist import all_reduce_nograd
from distreg.runtime.comm import Comm
from distreg.sparsity.masks import index_uniform


class TraceEstimate(NamedTuple):
    trace: float  # mean of the probe values
    stderr: float  # std (n - 1) / sqrt(m); nan for m = 1
    num_probes: int
    samples: list[float]  # v^T H v per probe


def rademacher(seed: int, step: int, probe: int, name: str, flat_start: int, numel: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """±1 entries for global flat indices [flat_start, flat_start + numel) of parameter `name`."""
    u = index_uniform(seed, f"hutchinson/{step}/{probe}/{name}", flat_start, numel)
    return torch.where(u < 0.5, -1.0, 1.0).to(dtype)


def hvp(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
        vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """H v by double backward from `grads` = autograd.grad(loss, params, create_graph=True)."""
    dot = sum((g * v).sum() for g, v in zip(grads, vectors))
    return list(torch.autograd.grad(dot, params, retain_graph=True))


def hutchinson_trace(loss: torch.Tensor, params: Sequence[torch.Tensor], seed: int, step: int,
                     names: Sequence[str] | None = None, flat_starts: Sequence[int] | None = None,
                     max_probes: int = 100, tol: float = 1e-3, comm: Comm | None = None) -> TraceEstimate:
    """Hutchinson estimate of tr(H) of `loss` w.r.t. `params` (double backward, fp32 probes).

    Data-parallel use (DDP): `params` are the whole (unwrapped) parameters, each rank's `loss`
    is its probe-batch share (scaled by n_r / N_probe); every v^T H_r v is all-reduced, and the
    stopping rule runs on the reduced values, so all ranks stop together. `names` key the probe
    entries (default p0, p1, ...) and `flat_starts` give each tensor's global offset when it is
    a contiguous slice of a larger parameter (default 0).
    """
    params = list(params)
    names = list(names) if names is not None else [f"p{i}" for i in range(len(params))]
    starts = list(flat_starts) if flat_starts is not None else [0] * len(params)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    samples: list[float] = []
    mean = 0.0
    for t in range(max_probes):
        vs = [rademacher(seed, step, t, nm, st, p.numel(), p.dtype).to(p.device).view_as(p)
              for p, nm, st in zip(params, names, starts)]
        hv = hvp(grads, params, vs)
        local = sum(torch.dot(h.reshape(-1).double(), v.reshape(-1).double()) for h, v in zip(hv, vs))
        samples.append(float(all_reduce_nograd(local.reshape(1), comm)))
        new = sum(samples) / len(samples)
        if abs(new - mean) / (abs(mean) + 1e-6) < tol:
            mean = new
            break
        mean = new
    m = len(samples)
    stderr = math.nan if m < 2 else math.sqrt(sum((s - mean) ** 2 for s in samples) / (m - 1) / m)
    return TraceEstimate(mean, stderr, m, samples)


def vhv_from_gradients(v: Sequence[torch.Tensor], grad_plus: Sequence[torch.Tensor],
                       grad_minus: Sequence[torch.Tensor], eps: float, comm: Comm | None = None) -> torch.Tensor:
    """v^T H v ≈ <v, ∇L(θ + eps v) - ∇L(θ - eps v)> / (2 eps) (double-backward-free variant for
    FSDP2 / ZeRO-3): local shards of v and of the reduced gradients; partial dot products are
    all-reduced over the shard group. float64 scalar."""
    local = sum(torch.dot(a.reshape(-1).double(), (b - c).reshape(-1).double())
                for a, b, c in zip(v, grad_plus, grad_minus))
    return all_reduce_nograd(torch.as_tensor(local, dtype=torch.float64).reshape(1), comm)[0] / (2 * eps)


def vhv_from_losses(loss_plus: float, loss_zero: float, loss_minus: float, eps: float) -> float:
    """Forward-only v^T H v ≈ (L(θ + eps v) - 2 L(θ) + L(θ - eps v)) / eps^2, in float64."""
    return (float(loss_plus) - 2 * float(loss_zero) + float(loss_minus)) / (eps * eps)


def stability_ratio(trace: float, lr: float) -> float:
    """rho = lr * tr(H) / 2; rho > 1 means tr(H) > 2 / lr [PAPER]."""
    return lr * trace / 2
