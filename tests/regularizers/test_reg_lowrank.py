"""TRP energy-rank projection and nuclear subgradient, by SVD and by Gram all-reduce
(spec sparsity-reweighting-ot.md section 6 and S3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distreg.regularizers import (
    energy_rank,
    low_rank_project,
    low_rank_project_gram,
    nuclear_subgradient,
    trp_matrix,
    trp_unmatrix,
)
from tests.regularizers._threads import run_threads, split_rows

TOL = dict(rtol=1e-5, atol=1e-6)


def np_trp(a, e=0.9):
    """Reference: numpy SVD, k = first index where the cumulative squared energy reaches e."""
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    cum = np.cumsum(s**2) / np.sum(s**2)
    k = next(i + 1 for i, c in enumerate(cum) if c >= e)
    return u[:, :k] * s[:k] @ vt[:k], u[:, :k] @ vt[:k], k


def test_trp_spec_vector_1():
    w = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    np.testing.assert_allclose(s, [3.0, 0.5], **TOL)
    np.testing.assert_allclose(torch.cumsum(s**2, 0) / (s**2).sum(), [0.972973, 1.0], **TOL)
    for res in (low_rank_project(w), low_rank_project_gram(w)):
        assert int(res.rank) == 1
        np.testing.assert_allclose(res.projection, [[3, 0, 0], [0, 0, 0]], **TOL)
        np.testing.assert_allclose(res.subgradient, [[1, 0, 0], [0, 0, 0]], **TOL)
        np.testing.assert_allclose(3e-4 * res.subgradient, [[3e-4, 0, 0], [0, 0, 0]], rtol=1e-5, atol=1e-12)


def _gram_rank(comm, blocks, energy, shard):
    res = low_rank_project_gram(blocks[comm.rank], comm, energy, shard)
    return res.projection, res.subgradient, int(res.rank)


def test_trp_spec_vector_2_rows_on_two_ranks():
    w = torch.tensor([[1.8, -0.4, 0.0], [2.4, 0.3, 0.0]], dtype=torch.float64)
    proj_want, sub_want = [[1.8, 0, 0], [2.4, 0, 0]], [[0.6, 0, 0], [0.8, 0, 0]]
    for res in (low_rank_project(w), low_rank_project_gram(w)):
        np.testing.assert_allclose(res.projection, proj_want, **TOL)
        np.testing.assert_allclose(res.subgradient, sub_want, **TOL)
    ranks = run_threads(_gram_rank, 2, split_rows(w, [0, 1, 2]), 0.9, "rows")
    np.testing.assert_allclose(torch.cat([r[0] for r in ranks]), proj_want, **TOL)
    np.testing.assert_allclose(torch.cat([r[1] for r in ranks]), sub_want, **TOL)
    assert [r[2] for r in ranks] == [1, 1]


def test_energy_rank_against_loop():
    rng = np.random.default_rng(0)
    s = -np.sort(-rng.uniform(0, 3, size=(6, 5)), axis=1)
    for e in (0.5, 0.9, 0.99, 1.0):
        want = [next(i + 1 for i, c in enumerate(np.cumsum(r**2) / np.sum(r**2)) if c >= e - 1e-15) for r in s]
        assert energy_rank(torch.tensor(s), e).tolist() == want
    assert energy_rank(torch.zeros(3), 0.9).item() == 0
    with pytest.raises(ValueError):
        energy_rank(torch.ones(3), 1.5)


@pytest.mark.parametrize("energy", [0.6, 0.9])
def test_projection_random_matrix_svd_and_gram_shards(energy):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(7, 5)) * np.array([4.0, 2.0, 1.0, 0.5, 0.2])  # distinct singular values
    proj, sub, k = np_trp(a, energy)
    t = torch.tensor(a)
    svd = low_rank_project(t, energy)
    assert int(svd.rank) == k
    np.testing.assert_allclose(svd.projection, proj, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(svd.subgradient, sub, rtol=1e-10, atol=1e-12)
    ranks = run_threads(_gram_rank, 3, split_rows(t, [0, 3, 3, 7]), energy, "rows")  # uneven, one empty
    np.testing.assert_allclose(torch.cat([r[0] for r in ranks]), proj, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(torch.cat([r[1] for r in ranks]), sub, rtol=1e-8, atol=1e-10)
    # column blocks (the VH kind under a Shard(0) of the conv weight)
    cols = run_threads(_gram_rank, 2, [t[:, :2], t[:, 2:]], energy, "cols")
    np.testing.assert_allclose(torch.cat([r[0] for r in cols], 1), proj, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(torch.cat([r[1] for r in cols], 1), sub, rtol=1e-8, atol=1e-10)


def test_trp_matrix_layouts_and_batched_nd():
    w = torch.randn(4, 3, 2, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    n, c, kh, kw = w.shape
    vh = trp_matrix(w, "VH")
    assert vh.shape == (c * kh, n * kw)
    assert vh[1 * kh + 1, 2 * kw + 3] == w[2, 1, 1, 3]
    assert trp_matrix(w, "NC").shape == (4, 30) and trp_matrix(w, "ND").shape == (4, 3, 10)
    for kind in ("NC", "VH", "ND"):
        assert torch.equal(trp_unmatrix(trp_matrix(w, kind), kind, w.shape), w)
    with pytest.raises(ValueError):
        trp_matrix(w, "XY")
    nd = low_rank_project(trp_matrix(w, "ND"), 0.9)  # one SVD per output filter
    for i in range(n):
        proj, sub, k = np_trp(w[i].reshape(c, kh * kw).numpy())
        assert int(nd.rank[i]) == k
        np.testing.assert_allclose(nd.projection[i], proj, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(nd.subgradient[i], sub, rtol=1e-10, atol=1e-12)


def test_nuclear_subgradient_exact_on_rank_deficient_and_zero():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 2)) @ rng.normal(size=(2, 4))  # rank 2
    u, s, vt = np.linalg.svd(a)
    sub = nuclear_subgradient(torch.tensor(a)).numpy()
    np.testing.assert_allclose(sub, u[:, :2] @ vt[:2], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose((sub * a).sum(), s.sum(), rtol=1e-10)  # <UV^T, W> = ||W||_*
    res = low_rank_project(torch.tensor(a), 1.0)
    assert int(res.rank) == 2
    z = low_rank_project(torch.zeros(3, 2))
    assert int(z.rank) == 0 and not z.projection.any() and not z.subgradient.any()
