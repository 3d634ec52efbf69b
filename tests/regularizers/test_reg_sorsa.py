"""SORSA cores (spec regularizers.md section 6): SVD split, orthonormal regulariser value and
closed-form gradient (whole, and from B row blocks on thread ranks), merge."""
from __future__ import annotations

import math

import pytest
import torch

from distreg.regularizers.sorsa import gram, merge, orth_loss, orth_norm, principal, svd_split
from tests.regularizers._threads import run_threads, split_rows

F64 = torch.float64


def _randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_split_spec_vector():
    w = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # out 3, in 2
    res = svd_split(w, 1)
    assert res.S.tolist() == [3.0]
    torch.testing.assert_close(principal(res.A, res.S, res.B), torch.tensor([[3.0, 0], [0, 0], [0, 0]], dtype=F64))
    torch.testing.assert_close(res.residual, torch.tensor([[0.0, 0], [0, 2], [0, 0]], dtype=F64))
    assert res.A.shape == (1, 2) and res.B.shape == (3, 1)
    # scale s = alpha / r = 2 enters the residual only: W_res = W - 2 * [[3,0],[0,0],[0,0]]
    res2 = svd_split(w, 1, scale=2.0)
    torch.testing.assert_close(res2.residual, torch.tensor([[-3.0, 0], [0, 2], [0, 0]], dtype=F64))
    torch.testing.assert_close(merge(res2.residual, res2.A, res2.S, res2.B, 2.0), w.to(F64))


def test_split_reconstructs_and_is_the_principal_part():
    w = _randn(24, 40, seed=1, dtype=torch.float32)
    res = svd_split(w, 5)
    sigma = torch.linalg.svdvals(w.to(F64))
    torch.testing.assert_close(res.S, sigma[:5], rtol=1e-12, atol=0)
    # residual + principal = W, also after both are stored in float32 (the model's dtype)
    cast = [t.float() for t in (res.residual, res.A, res.S, res.B)]
    torch.testing.assert_close(cast[0] + principal(*cast[1:]), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(merge(*cast), w, rtol=0, atol=1e-6)
    assert merge(*cast).dtype == torch.float32
    # the residual holds exactly the remaining spectrum, orthogonal to the principal part
    torch.testing.assert_close(torch.linalg.svdvals(res.residual)[:19], sigma[5:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.A @ res.residual.t(), torch.zeros(5, 24, dtype=F64), rtol=0, atol=1e-12)
    # orthonormal factors at init: both regulariser terms vanish to round-off
    torch.testing.assert_close(gram(res.A, "rows"), torch.eye(5, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(gram(res.B, "cols"), torch.eye(5, dtype=F64), rtol=0, atol=1e-12)
    # canonical signs: the largest-magnitude entry of every column of B is positive, and a
    # sign flip of W gives the same B (A absorbs the sign)
    assert bool((res.B.gather(0, res.B.abs().argmax(0, keepdim=True)) > 0).all())
    flipped = svd_split(-w, 5)
    torch.testing.assert_close(flipped.B, res.B)
    torch.testing.assert_close(flipped.A, -res.A)


def test_split_rank_must_fit():
    with pytest.raises(ValueError, match="rank 4 must be in 1..min"):
        svd_split(torch.ones(3, 5), 4)
    with pytest.raises(ValueError, match="rank 0"):
        svd_split(torch.ones(3, 5), 0)
    with pytest.raises(ValueError, match="matrix"):
        svd_split(torch.ones(3, 5, 2), 1)


def test_regulariser_spec_vector():
    a = torch.tensor([[1.0, 0, 0], [0, 2, 0]])  # A [r=2, in=3]
    b = torch.tensor([[1.0, 0], [0, 1], [0, 0]])  # B [out=3, r=2]
    va, ga = orth_norm(a, "rows")
    vb, gb = orth_norm(b, "cols")
    assert float(va) == pytest.approx(3.0) and float(vb) == 0.0
    torch.testing.assert_close(ga, torch.tensor([[0.0, 0, 0], [0, 4, 0]], dtype=F64))
    torch.testing.assert_close(gb, torch.zeros(3, 2, dtype=F64))  # exact zero norm: zero gradient
    loss = orth_loss([a], [b])
    assert float(loss) == pytest.approx(1.5)
    assert float(4e-4 / 3e-5 * loss) == pytest.approx(20.0)  # the added objective at gamma 4e-4, lr 3e-5
    # by hand: B = [[1,1],[0,1],[0,0]] -> B^T B - I = [[0,1],[1,1]], norm sqrt(3),
    # gradient 2 B (B^T B - I) / sqrt(3) = 2 / sqrt(3) [[1,2],[1,1],[0,0]]
    v, g = orth_norm(torch.tensor([[1.0, 1], [0, 1], [0, 0]]), "cols")
    assert float(v) == pytest.approx(math.sqrt(3))
    torch.testing.assert_close(g, 2 / math.sqrt(3) * torch.tensor([[1.0, 2], [1, 1], [0, 0]], dtype=F64))


@pytest.mark.parametrize("side,shape", [("rows", (4, 9)), ("cols", (9, 4))])
def test_gradient_matches_autograd_and_finite_differences(side, shape):
    m = _randn(*shape, seed=3) / 2
    value, grad = orth_norm(m, side)
    leaf = m.clone().requires_grad_()
    g = leaf @ leaf.t() if side == "rows" else leaf.t() @ leaf
    auto_v = torch.linalg.matrix_norm(g - torch.eye(g.shape[0], dtype=F64))
    torch.testing.assert_close(value, auto_v.detach())
    torch.testing.assert_close(grad, torch.autograd.grad(auto_v, leaf)[0], rtol=1e-10, atol=1e-12)
    eps, fd = 1e-6, torch.zeros_like(m)
    for i in range(m.numel()):
        d = torch.zeros(m.numel(), dtype=F64)
        d[i] = eps
        d = d.view_as(m)
        fd.view(-1)[i] = (orth_norm(m + d, side)[0] - orth_norm(m - d, side)[0]) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    # and the reference formula's gradient: 1/(2L) of the term gradients
    a, b = _randn(3, 7, seed=4).requires_grad_(), _randn(6, 3, seed=5).requires_grad_()
    ga, gb = torch.autograd.grad(orth_loss([a], [b]), [a, b])
    torch.testing.assert_close(ga, orth_norm(a.detach(), "rows")[1] / 2)
    torch.testing.assert_close(gb, orth_norm(b.detach(), "cols")[1] / 2)


@pytest.mark.parametrize("cuts", [[0, 11], [0, 6, 11], [0, 4, 4, 11]])  # 1, 2 and 3 ranks, one empty
def test_b_row_blocks_give_the_full_value_and_their_rows_of_the_gradient(cuts):
    b = _randn(11, 3, seed=6) / 2
    full_v, full_g = orth_norm(b, "cols")
    blocks = split_rows(b, cuts)

    def body(comm):
        return orth_norm(blocks[comm.rank], "cols", comm=comm)

    out = run_threads(body, len(cuts) - 1)
    for v, _ in out:
        assert float(v) == pytest.approx(float(full_v), rel=1e-12)
    torch.testing.assert_close(torch.cat([g for _, g in out]), full_g, rtol=1e-12, atol=1e-14)


def test_rows_side_needs_the_whole_matrix():
    def body(comm):
        return orth_norm(torch.ones(1, 3), "rows", comm=comm)

    with pytest.raises(ValueError, match="side 'cols' only"):
        run_threads(body, 2)
    with pytest.raises(ValueError, match="one B per A"):
        orth_loss([torch.eye(2)], [])
