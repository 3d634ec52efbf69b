"""TRP low-rank projection and nuclear-norm subgradient (spec sparsity-reweighting-ot.md
section 6 and pattern S3).

Per selected matrix W_r: rank k = smallest k with sum_{i<=k} s_i^2 / sum_i s_i^2 >= e (e = 0.9 in
the reference); projection U_k S_k V_k^T (a pre-forward weight edit every m steps) and
subgradient U_k V_k^T (added as lambda * U_k V_k^T to the already-reduced gradient, P2b).
If the hook's SVD fails it skips the layer (subgradient 0), as the reference does.

Numerical-rank guard [DERIVED]: k never exceeds the number of numerically nonzero singular
values (s > max(rows, cols) * eps64 * s_max on the SVD route, s^2 > D * eps64 * s_max^2 on the
Gram route), so `energy=1.0` gives the exact nuclear subgradient sum over s > 0 of u v^T. A zero
matrix has k = 0 and zero outputs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from distreg.regularizers._dist import active, all_reduce_nograd
from distreg.runtime.comm import Comm

_EPS64 = torch.finfo(torch.float64).eps


class LowRank(NamedTuple):
    projection: torch.Tensor  # U_k S_k V_k^T (this rank's rows / columns on the Gram route)
    subgradient: torch.Tensor  # U_k V_k^T
    rank: torch.Tensor  # k, int64 (one per matrix of a batch)


def energy_rank(sigma: torch.Tensor, energy: float = 0.9) -> torch.Tensor:
    """Smallest k with cumulative squared-singular-value energy >= `energy` (sigma descending
    along the last dim; batched). 0 for an all-zero sigma."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    e2 = sigma.to(torch.float64) ** 2
    total = e2.sum(-1)
    cum = e2.cumsum(-1) / total.clamp(min=torch.finfo(torch.float64).tiny).unsqueeze(-1)
    k = ((cum < energy).sum(-1) + 1).clamp(max=sigma.shape[-1])
    return torch.where(total > 0, k, torch.zeros_like(k))


def trp_matrix(weight: torch.Tensor, kind: str = "NC") -> torch.Tensor:
    """The matrix (or batch of matrices) TRP decomposes, from a conv weight [N, C, kh, kw] [CODE]:
    NC -> [N, C*kh*kw]; VH -> permute to (C, kh, N, kw), [C*kh, N*kw]; ND -> [N, C, kh*kw]."""
    n, c, kh, kw = weight.shape
    if kind == "NC":
        return weight.reshape(n, c * kh * kw)
    if kind == "VH":
        return weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)
    if kind == "ND":
        return weight.reshape(n, c, kh * kw)
    raise ValueError(f"kind must be 'NC', 'VH' or 'ND', got {kind!r}")


def trp_unmatrix(matrix: torch.Tensor, kind: str, shape: torch.Size | tuple) -> torch.Tensor:
    """Inverse of `trp_matrix` for a conv weight of `shape`."""
    n, c, kh, kw = shape
    if kind in ("NC", "ND"):
        return matrix.reshape(n, c, kh, kw)
    if kind == "VH":
        return matrix.reshape(c, kh, n, kw).permute(2, 0, 1, 3).contiguous()
    raise ValueError(f"kind must be 'NC', 'VH' or 'ND', got {kind!r}")


def low_rank_project(matrix: torch.Tensor, energy: float = 0.9) -> LowRank:
    """Energy-threshold truncated SVD of a whole matrix or a batch [..., rows, cols] (e.g. the
    ND kind), computed in float64; outputs in the input dtype."""
    a = matrix.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    k = energy_rank(s, energy)
    if s.shape[-1]:
        tol = max(a.shape[-2:]) * _EPS64 * s[..., :1]
        k = torch.minimum(k, (s > tol).sum(-1))
    keep = (torch.arange(s.shape[-1], device=s.device) < k.unsqueeze(-1)).to(a.dtype)
    proj = (u * (s * keep).unsqueeze(-2)) @ vh
    sub = (u * keep.unsqueeze(-2)) @ vh
    return LowRank(proj.to(matrix.dtype), sub.to(matrix.dtype), k)


def nuclear_subgradient(matrix: torch.Tensor) -> torch.Tensor:
    """Exact subgradient U V^T of ||W||_* over the numerically nonzero singular values."""
    return low_rank_project(matrix, energy=1.0).subgradient


def low_rank_project_gram(local: torch.Tensor, comm: Comm | None = None, energy: float = 0.9,
                          shard: str = "rows") -> LowRank:
    """TRP projection and subgradient of a matrix split across ranks, without gathering it (S3).

    `shard="rows"`: `local` is this rank's block of whole rows [n_r, D] (FSDP2 `Shard(0)` of the
    NC kind); G = W^T W = sum_r W_r^T W_r is all-reduced in float64 (the Gram squares the
    condition number), eigendecomposed on rank 0 and (Lambda, V) broadcast, s = sqrt(Lambda);
    returns this rank's rows of W V_k V_k^T and W V_k S_k^-1 V_k^T (= rows of U_k V_k^T).
    `shard="cols"`: `local` is a block of whole columns (the VH kind under `Shard(0)`); the
    column-block Gram W W^T is used instead. Cost D^2 floats (float64) per matrix; for N < D an
    owner-gather of the matrix is cheaper (hook's choice). With `comm=None` the whole matrix.
    """
    if shard not in ("rows", "cols"):
        raise ValueError(f"shard must be 'rows' or 'cols', got {shard!r}")
    if shard == "cols":
        res = low_rank_project_gram(local.t(), comm, energy, "rows")
        return LowRank(res.projection.t(), res.subgradient.t(), res.rank)
    w = local.detach().to(torch.float64)
    d = w.shape[1]
    gram = all_reduce_nograd(w.t() @ w, comm)
    if active(comm):
        packed = torch.empty(d + 1, d, dtype=torch.float64, device=w.device)
        if comm.rank == 0:
            lam, vec = torch.linalg.eigh(gram)
            packed[0], packed[1:] = lam, vec
        comm.broadcast(packed, src=0)
        lam, vec = packed[0], packed[1:]
    else:
        lam, vec = torch.linalg.eigh(gram)
    lam, vec = lam.flip(0).clamp(min=0), vec.flip(1)
    sigma = lam.sqrt()
    k = energy_rank(sigma, energy)
    if d:
        k = torch.minimum(k, (lam > d * _EPS64 * lam[0]).sum())
    kk = int(k)
    vk = vec[:, :kk]
    coords = w @ vk  # this rank's rows of U_k S_k
    proj = coords @ vk.t()
    sub = (coords / sigma[:kk]) @ vk.t()
    return LowRank(proj.to(local.dtype), sub.to(local.dtype), k)

