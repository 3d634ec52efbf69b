"""SaRA core (`distreg.sparsity.sara`, spec sparsity-reweighting-ot.md section 7).

The spec's three test vectors, the nuclear gradient against central finite differences,
the exact fraction selection on 1-4 thread ranks (row and flat slices) against a
stable-sort brute force, and the step-keyed matrix draw.
"""
from __future__ import annotations

import math

import pytest
import torch

from distreg.sparsity import ShardScores
from distreg.sparsity.sara import (
    DEFAULT_THRESHOLD,
    fraction_masks,
    masked_nuclear_grad,
    nuclear_direction,
    pick_matrix,
    reselect,
    sara_lr,
    threshold_mask,
)
from tests.sparsity.threadcomm import run_threads

F64 = torch.float64


def test_spec_vector_1_mask_and_learning_rate():
    theta = torch.tensor([0.001, -0.0015, 0.003, -0.0005, 0.01])
    assert threshold_mask(theta, DEFAULT_THRESHOLD).tolist() == [True, True, False, True, False]
    assert DEFAULT_THRESHOLD == 2e-3
    assert sara_lr(2e-3) == pytest.approx(4.965853e-4, rel=1e-6)
    assert sara_lr(1e-3) == pytest.approx(1e-3 * math.exp(-0.35), rel=1e-12)
    # |theta| == tau is frozen (strict <, as the reference's `param.abs() < threshold`)
    assert threshold_mask(torch.tensor([2e-3, -2e-3]), 2e-3).tolist() == [False, False]
    with pytest.raises(ValueError, match="threshold"):
        threshold_mask(theta, 0.0)
    with pytest.raises(ValueError, match="threshold"):
        sara_lr(-1.0)


def test_spec_vector_2_nuclear_gradient():
    theta = torch.tensor([[0.001, 0.5], [0.0005, -0.001]], dtype=F64)
    mask = threshold_mask(theta, 2e-3)
    assert mask.tolist() == [[True, False], [True, True]]
    torch.testing.assert_close(theta * mask, torch.tensor([[0.001, 0], [0.0005, -0.001]], dtype=F64))
    torch.testing.assert_close(torch.linalg.svdvals(theta * mask), torch.tensor([0.0012808, 0.0007808], dtype=F64),
                               rtol=0, atol=1e-7)
    direction, norm = nuclear_direction(theta * mask)
    torch.testing.assert_close(direction, torch.tensor([[0.970143, 0.242536], [0.242536, -0.970143]], dtype=F64),
                               rtol=0, atol=1e-6)
    assert norm == pytest.approx(0.0012808 + 0.0007808, abs=2e-7)
    grad, norm2 = masked_nuclear_grad(theta, mask, 5e-4)
    torch.testing.assert_close(grad, torch.tensor([[4.850713e-4, 0], [1.212678e-4, -4.850713e-4]], dtype=F64),
                               rtol=0, atol=1e-9)
    assert norm2 == norm


def nuclear_fd(theta: torch.Tensor, mask: torch.Tensor, lam: float, h: float) -> torch.Tensor:
    """Central differences of lam * ||theta * M||_* in every entry (float64)."""
    f = lambda t: lam * float(torch.linalg.svdvals(t * mask).sum())  # noqa: E731
    out = torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta).view(-1)
        e[i] = h
        out.view(-1)[i] = (f(theta + e.view_as(theta)) - f(theta - e.view_as(theta))) / (2 * h)
    return out


@pytest.mark.parametrize("shape,seed", [((2, 2), None), ((5, 4), 0), ((3, 7), 1)])
def test_nuclear_gradient_matches_finite_differences(shape, seed):
    if seed is None:  # the spec matrix
        theta = torch.tensor([[0.001, 0.5], [0.0005, -0.001]], dtype=F64)
        mask, h = threshold_mask(theta, 2e-3), 1e-7
    else:
        g = torch.Generator().manual_seed(seed)
        theta = torch.randn(shape, generator=g, dtype=F64)
        mask, h = threshold_mask(theta, 1.0), 1e-6  # ~2/3 trainable, theta * M full rank
    grad, norm = masked_nuclear_grad(theta, mask, 5e-4)
    fd = nuclear_fd(theta, mask, 5e-4, h)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-9)
    assert not grad[~mask].any()  # frozen entries get nothing (their derivative is 0 too)
    assert norm == pytest.approx(float(torch.linalg.svdvals(theta * mask).sum()), rel=1e-12)


def test_nuclear_direction_rank_deficient_and_zero():
    # rank 1: U V^T is u1 v1^T, the null-space vectors (arbitrary) are left out
    u, v = torch.tensor([0.6, 0.8], dtype=F64), torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    direction, norm = nuclear_direction(3.0 * torch.outer(u, v))
    torch.testing.assert_close(direction, torch.outer(u, v), rtol=0, atol=1e-12)
    assert norm == pytest.approx(3.0, abs=1e-12)
    direction, norm = nuclear_direction(torch.zeros(3, 2, dtype=F64))
    assert not direction.any() and norm == 0.0
    with pytest.raises(ValueError, match="matrix"):
        nuclear_direction(torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="mask shape"):
        masked_nuclear_grad(torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool), 1.0)


def test_spec_vector_3_reselection():
    theta0 = torch.tensor([0.001, -0.0015, 0.003, -0.0005, 0.01])
    mask = threshold_mask(theta0, 2e-3)
    theta = torch.tensor([0.001, -0.0025, 0.003, -0.0001, 0.01])
    assert reselect(mask, theta, 2e-3).tolist() == [True, False, False, True, False]
    # frozen entries never come back, even if small: M' = M & 1[|theta| < tau]
    assert reselect(torch.tensor([False, True]), torch.tensor([0.0, 0.0]), 2e-3).tolist() == [False, True]
    # inclusive (fraction mode, tau = largest selected |theta|) and "nothing selected"
    assert reselect(mask, theta, 1e-3, inclusive=True).tolist() == [True, False, False, True, False]
    assert reselect(mask, theta, 1e-3).tolist() == [False, False, False, True, False]
    assert not reselect(mask, theta, None).any()


# --------------------------------------------------------------------------- fraction selection


def slices(full: torch.Tensor, world: int, rank: int, mode: str) -> tuple[int, int]:
    """(flat_start, numel) of a rank: `rows` = FSDP2 row chunks, `flat` = ZeRO-3 partitions."""
    n = full.numel()
    if mode == "rows":
        rows, row = full.shape[0], n // full.shape[0]
        per = -(-rows // world)
        a, b = min(rank * per, rows) * row, min((rank + 1) * per, rows) * row
    else:
        per = -(-n // world)
        a, b = min(rank * per, n), min((rank + 1) * per, n)
    return a, b - a


def brute_fraction(full: torch.Tensor, fraction: float) -> tuple[torch.Tensor, float | None]:
    """The k smallest |theta|, ties to the lowest flat index (stable sort)."""
    k = round(fraction * full.numel())
    order = torch.sort(full.reshape(-1).abs(), stable=True).indices[:k]
    mask = torch.zeros(full.numel(), dtype=torch.bool)
    mask[order] = True
    return mask, (float(full.reshape(-1).abs()[order[-1]]) if k else None)


TENSORS = {
    "a": torch.tensor([0.001, -0.0015, 0.003, -0.0005, 0.01]),
    # ties at the threshold: 4 entries of |0.2|; fraction 0.6 selects round(5.4) = 5 of 9,
    # i.e. 0.0, 0.05, -0.1 and the first two |0.2| in flat order (indices 0 and 3)
    "b": torch.tensor([[0.2, -0.1, 0.3], [-0.2, 0.05, 0.2], [0.4, -0.2, 0.0]]),
    "c": torch.randn(7, 6, generator=torch.Generator().manual_seed(3)),
}


@pytest.mark.parametrize("world,mode", [(1, "rows"), (2, "rows"), (3, "flat"), (4, "rows"), (2, "flat")])
@pytest.mark.parametrize("fraction", [0.2, 0.6, 1.0])
def test_fraction_masks_exact_per_tensor_on_any_sharding(world, mode, fraction):
    def body(comm):
        shards = []
        for name, full in TENSORS.items():
            a, n = slices(full, world, comm.rank, mode)
            shards.append(ShardScores(full.reshape(-1)[a:a + n].clone(), a if n else 0, name))
        masks, thr = fraction_masks(shards, fraction, comm)
        return masks, thr

    res = run_threads(body, world)
    assert not any(isinstance(r, BaseException) for r in res), res
    for i, (name, full) in enumerate(TENSORS.items()):
        got = torch.cat([r[0][i] for r in res])
        want, want_thr = brute_fraction(full, fraction)
        assert torch.equal(got, want), name
        assert all(r[1][i] == pytest.approx(want_thr, rel=1e-6) for r in res), name
        assert int(got.sum()) == round(fraction * full.numel())
    if fraction == 0.6:
        b = torch.cat([r[0][1] for r in res]).view(3, 3)
        assert b.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_fraction_masks_replicated_and_errors():
    masks, thr = fraction_masks([ShardScores(TENSORS["a"], 0, "a")], 0.4, replicated=True)
    assert masks[0].tolist() == [True, False, False, True, False] and thr == [pytest.approx(0.001)]
    masks, thr = fraction_masks([ShardScores(TENSORS["a"], 0, "a")], 0.0)
    assert not masks[0].any() and thr == [None]
    with pytest.raises(ValueError, match="fraction"):
        fraction_masks([ShardScores(TENSORS["a"], 0, "a")], 1.5)


# --------------------------------------------------------------------------- matrix draw


def test_pick_matrix_keyed_on_seed_and_step_and_uniform():
    draws = [pick_matrix(7, t, 5) for t in range(2000)]
    assert draws == [pick_matrix(7, t, 5) for t in range(2000)]  # stateless, same on every rank
    assert draws[:50] != [pick_matrix(8, t, 5) for t in range(50)]
    counts = torch.bincount(torch.tensor(draws), minlength=5).double()
    chi2 = float(((counts - 400) ** 2 / 400).sum())
    assert set(draws) == {0, 1, 2, 3, 4} and chi2 < 20.5  # chi^2_4 at p = 0.9996
    assert all(pick_matrix(1, t, 1) == 0 for t in range(10))
    with pytest.raises(ValueError, match="no matrix"):
        pick_matrix(1, 0, 0)
