"""WGSEF value, DC gap and proximal operator (spec regularizers.md section 8)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distreg.regularizers import group_sq_norms, sparse_envelope, sparse_envelope_gap, wgsef_prox
from tests.regularizers._threads import run_threads

TOL = dict(rtol=1e-5, atol=1e-6)
G = torch.tensor([0, 0, 1, 2, 2, 3])
V = torch.tensor([3.0, 4.0, 1.0, 0.6, 0.8, 2.0], dtype=torch.float64)


def np_sk(x, groups, k, d):
    """S_k from the variational form 1/2 min { sum z_i^2 / w_i : 0 <= w <= 1, sum w <= k } with
    z_i = sqrt(d_i) ||x_{G_i}||: w_i = min(1, z_i / theta), theta by bisection (not the closed form)."""
    z = np.sqrt(d * np.array([np.sum(x[groups == g] ** 2) for g in range(len(d))]))
    if np.count_nonzero(z) <= k:
        return 0.5 * np.sum(z**2)
    lo, hi = 0.0, z.sum() / k  # sum_i min(1, z_i / hi) <= k
    for _ in range(200):
        th = (lo + hi) / 2
        lo, hi = (th, hi) if np.minimum(1, z / th).sum() > k else (lo, th)
    w = np.minimum(1, z / hi)
    nz = z > 0
    return 0.5 * np.sum(z[nz] ** 2 / w[nz])


def test_spec_vectors_singletons():
    v, g = torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=torch.float64), torch.arange(4)
    sq = group_sq_norms(v, g, 4)
    np.testing.assert_allclose(sparse_envelope(sq, 2).item(), 10.5625, **TOL)
    np.testing.assert_allclose(0.5 * sq.sum().item(), 7.125, **TOL)
    x, omega = wgsef_prox(v, g, 4, alpha=0.5, k=2)
    np.testing.assert_allclose(x, [2.0, -1.25, 0.25, 0.0], **TOL)
    np.testing.assert_allclose(omega, [1.0, 0.833333, 0.166667, 0.0], **TOL)
    xn = x.numpy()
    np.testing.assert_allclose(0.5 * np.sum((xn - v.numpy()) ** 2) + 0.5 * np_sk(xn, g.numpy(), 2, np.ones(4)), 2.75,
                               **TOL)


def test_spec_vectors_groups_and_weights():
    sq = group_sq_norms(V, G, 4)
    np.testing.assert_allclose(sq.sqrt(), [5, 1, 1, 2], **TOL)
    np.testing.assert_allclose(sparse_envelope(sq, 2).item(), 20.5, **TOL)
    x, omega = wgsef_prox(V, G, 4, alpha=1.0, k=2)
    np.testing.assert_allclose(x, [1.5, 2, 0, 0, 0, 1], **TOL)
    np.testing.assert_allclose(omega, [1, 0, 0, 1], **TOL)
    d = torch.tensor([2.0, 1.0, 0.5, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(sparse_envelope(sq, 2, d).item(), 31.871320, **TOL)
    x, omega = wgsef_prox(V, G, 4, alpha=1.0, k=2, d=d)
    np.testing.assert_allclose(x, [1.0, 1.333333, 0, 0.140589, 0.187452, 0.917157], **TOL)
    np.testing.assert_allclose(omega, [1, 0, 0.153010, 0.846990], **TOL)
    sparse = torch.tensor([3.0, 4, 0, 0, 0, 2], dtype=torch.float64)
    np.testing.assert_allclose(sparse_envelope_gap(group_sq_norms(sparse, G, 4), 2).item(), 0.0, atol=1e-12)
    np.testing.assert_allclose(sparse_envelope_gap(sq, 2).item(), 5.0, **TOL)


def test_envelope_matches_variational_form():
    rng = np.random.default_rng(0)
    for n, k in [(6, 1), (6, 3), (9, 4), (5, 5), (3, 7)]:
        x = rng.normal(size=2 * n)
        groups = np.repeat(np.arange(n), 2)
        d = rng.uniform(0.5, 2.0, size=n)
        sq = group_sq_norms(torch.tensor(x), torch.tensor(groups), n)
        np.testing.assert_allclose(sparse_envelope(sq, k, torch.tensor(d)).item(), np_sk(x, groups, k, d), rtol=1e-9)
        gap = sparse_envelope_gap(sq, k, torch.tensor(d)).item()
        assert gap >= -1e-12 and (gap > 1e-6) == (n > k)


def test_prox_is_the_minimiser():
    rng = np.random.default_rng(1)
    n, k, alpha = 7, 3, 0.4
    groups = rng.integers(0, n, size=15)
    groups[:n] = np.arange(n)
    d = rng.uniform(0.5, 2.0, size=n)
    v = rng.normal(size=15) * 2
    x, _ = wgsef_prox(torch.tensor(v), torch.tensor(groups), n, alpha, k, torch.tensor(d))
    x = x.numpy()

    def objective(y):
        return 0.5 * np.sum((y - v) ** 2) + alpha * np_sk(y, groups, k, d)

    best = objective(x)
    for scale in (1e-3, 1e-2, 1e-1, 1.0):
        for _ in range(40):
            assert objective(x + scale * rng.normal(size=15)) >= best - 1e-9
    assert objective(v) > best


def test_prox_few_groups_and_zero_alpha():
    v, g = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 2.0], dtype=torch.float64), G
    x, omega = wgsef_prox(v, g, 4, alpha=0.5, k=2, d=torch.tensor([1.0, 1.0, 1.0, 3.0], dtype=torch.float64))
    np.testing.assert_allclose(x, [2.0, 8 / 3, 0, 0, 0, 0.8], rtol=1e-12)  # v / (1 + alpha d): 2 groups <= k
    assert omega.tolist() == [1, 1, 1, 1]
    x0, _ = wgsef_prox(V.float(), G, 4, alpha=0.0, k=1)
    assert torch.equal(x0, V.float())
    with pytest.raises(ValueError):
        wgsef_prox(V, G, 4, alpha=1.0, k=0)


def _prox_rank(comm, v, g, cuts, d):
    a, b = cuts[comm.rank], cuts[comm.rank + 1]
    return wgsef_prox(v[a:b], g[a:b], 5, 0.3, 2, d, comm)


def test_prox_groups_split_across_ranks():
    rng = np.random.default_rng(2)
    g = torch.tensor(rng.integers(0, 5, size=13))  # interleaved groups: every group spans ranks
    v = torch.tensor(rng.normal(size=13))
    d = torch.tensor(rng.uniform(0.5, 2.0, size=5))
    want_x, want_w = wgsef_prox(v, g, 5, 0.3, 2, d)
    res = run_threads(_prox_rank, 3, v, g, [0, 6, 6, 13], d)
    np.testing.assert_allclose(torch.cat([r[0] for r in res]), want_x, rtol=1e-12, atol=1e-14)
    for r in res:
        np.testing.assert_allclose(r[1], want_w, rtol=1e-12, atol=1e-14)
    assert (want_w > 0).sum() > 2  # a fractional solution, not the trivial one
