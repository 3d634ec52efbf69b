"""Soft (matrix) orthogonality, whole and from row shards, and conv-kernel orthogonality
(spec regularizers.md section 7)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distreg.regularizers import conv_orthogonality, soft_orthogonality
from tests.regularizers._threads import run_threads, split_rows

TOL = dict(rtol=1e-5, atol=1e-6)


def np_self_conv(k, s):
    """Conv(K, K; S, P)[i, j, a, b] = sum_c sum_{u,v} K[i, c, S a + u - P, S b + v - P] K[j, c, u, v]
    straight from the spec's definition, P = floor((k - 1) / S) * S."""
    m, c, kh, kw = k.shape
    ph, pw = (kh - 1) // s * s, (kw - 1) // s * s
    ho, wo = 2 * ph // s + 1, 2 * pw // s + 1
    out = np.zeros((m, m, ho, wo))
    for i in range(m):
        for j in range(m):
            for a in range(ho):
                for b in range(wo):
                    for u in range(kh):
                        for v in range(kw):
                            y, x = s * a + u - ph, s * b + v - pw
                            if 0 <= y < kh and 0 <= x < kw:
                                out[i, j, a, b] += (k[i, :, y, x] * k[j, :, u, v]).sum()
    return out, ph // s, pw // s


def np_conv_orth(k, s):
    out, ch, cw = np_self_conv(k, s)
    m, c = k.shape[:2]
    for i in range(m):
        out[i, i, ch, cw] -= 1
    return (out**2).sum() - max(0, m - c * s * s)


def test_conv_orthogonality_spec_vectors():
    k1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    np.testing.assert_allclose(conv_orthogonality(k1).item(), 0.0, atol=1e-12)
    k2 = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 1, 2, 2) / 2**0.5
    np.testing.assert_allclose(conv_orthogonality(k2).item(), 0.5, **TOL)
    haar = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64) / 2
    np.testing.assert_allclose(conv_orthogonality(haar.reshape(4, 1, 2, 2), stride=2).item(), 0.0, atol=1e-12)
    col = torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1)  # raw 1, correction -1
    np.testing.assert_allclose(conv_orthogonality(col).item(), 0.0, atol=1e-12)
    k = torch.arange(18, dtype=torch.float64).reshape(2, 1, 3, 3) / 10
    np.testing.assert_allclose(conv_orthogonality(k, 1).item(), 1261.1473, rtol=1e-6)
    np.testing.assert_allclose(conv_orthogonality(k, 1, reference_compat=True).item(), 31.975204, **TOL)
    np.testing.assert_allclose(conv_orthogonality(k, 1, reference_compat=True).item() ** 2, 1022.4137, rtol=1e-6)
    np.testing.assert_allclose(conv_orthogonality(k, 2).item(), 411.7561, rtol=1e-6)
    np.testing.assert_allclose(conv_orthogonality(k, 2, reference_compat=True).item(), 14.461314, **TOL)
    delta = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    delta[:, :, 1, 1] = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])
    for s in (1, 2):
        np.testing.assert_allclose(conv_orthogonality(delta, s).item(), 0.0, atol=1e-12)
    np.testing.assert_allclose(conv_orthogonality(delta, 2, reference_compat=True).item(), 1.414214, **TOL)


@pytest.mark.parametrize("shape,stride", [((3, 2, 3, 3), 1), ((3, 2, 3, 3), 2), ((5, 1, 2, 3), 2), ((9, 2, 2, 2), 2),
                                          ((2, 3, 4, 4), 3)])
def test_conv_orthogonality_matches_definition(shape, stride):
    k = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + stride), dtype=torch.float64)
    np.testing.assert_allclose(conv_orthogonality(k, stride).item(), np_conv_orth(k.numpy(), stride), rtol=1e-10)


def test_conv_orthogonality_zero_on_orthogonal_strided_convs():
    q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    full = q.reshape(8, 2, 2, 2)  # stride = kernel size: non-overlapping patches, orthogonal operator
    np.testing.assert_allclose(conv_orthogonality(full, 2).item(), 0.0, atol=1e-10)
    np.testing.assert_allclose(conv_orthogonality(full[:6], 2).item(), 0.0, atol=1e-10)  # M < C S^2: rows
    np.testing.assert_allclose(conv_orthogonality(1.1 * full, 2).item(), 8 * (1.21 - 1) ** 2, rtol=1e-10)


# --------------------------------------------------------------------------- matrix form


def test_soft_orthogonality_spec_vector_and_sides():
    w = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(soft_orthogonality(w, squared=False).item(), 1.732051, **TOL)
    np.testing.assert_allclose(soft_orthogonality(w).item(), 3.0, **TOL)
    wide = np.random.default_rng(0).normal(size=(3, 5))
    rows = ((wide @ wide.T - np.eye(3)) ** 2).sum()
    cols = ((wide.T @ wide - np.eye(5)) ** 2).sum()
    t = torch.tensor(wide)
    np.testing.assert_allclose(soft_orthogonality(t).item(), rows, rtol=1e-12)  # auto: smaller Gram
    np.testing.assert_allclose(soft_orthogonality(t.t().contiguous()).item(), rows, rtol=1e-12)
    np.testing.assert_allclose(soft_orthogonality(t, side="cols").item(), cols, rtol=1e-12)
    conv = torch.tensor(np.random.default_rng(1).normal(size=(4, 2, 3, 3)))
    wm = conv.reshape(4, 18).numpy()
    np.testing.assert_allclose(soft_orthogonality(conv).item(), ((wm @ wm.T - np.eye(4)) ** 2).sum(), rtol=1e-12)


def test_soft_orthogonality_gradient():
    w = torch.tensor(np.random.default_rng(2).normal(size=(3, 4)), requires_grad=True)
    soft_orthogonality(w, side="rows").backward()
    wn = w.detach().numpy()
    np.testing.assert_allclose(w.grad, 4 * (wn @ wn.T - np.eye(3)) @ wn, rtol=1e-10)
    w.grad = None
    soft_orthogonality(w, side="cols").backward()
    np.testing.assert_allclose(w.grad, 4 * wn @ (wn.T @ wn - np.eye(4)), rtol=1e-10)


def _orth_rank(comm, blocks, cases):
    out = []
    for side, squared in cases:
        w = blocks[comm.rank].clone().requires_grad_()
        v = soft_orthogonality(w, side=side, squared=squared, comm=comm)
        v.backward()
        out.append((v.item(), w.grad))
    return out


CASES = [("auto", True), ("rows", True), ("cols", True), ("auto", False), ("rows", False)]


@pytest.mark.parametrize("shape,cuts", [((4, 6), [0, 3, 3, 4]), ((7, 3), [0, 1, 5, 7])])
def test_soft_orthogonality_row_shards_equal_whole(shape, cuts):
    w = torch.tensor(np.random.default_rng(3).normal(size=shape) / np.sqrt(shape[1]))
    res = run_threads(_orth_rank, 3, split_rows(w, cuts), CASES)
    for c, (side, squared) in enumerate(CASES):
        ref = w.clone().requires_grad_()
        want = soft_orthogonality(ref, side=side, squared=squared)
        want.backward()
        for r in res:
            np.testing.assert_allclose(r[c][0], want.item(), rtol=1e-10)
        np.testing.assert_allclose(torch.cat([r[c][1] for r in res]), ref.grad, rtol=1e-8, atol=1e-12)


def test_soft_orthogonality_shards_of_orthogonal_rows():
    q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64))[0][:3]
    res = run_threads(lambda comm: soft_orthogonality(split_rows(q, [0, 2, 3])[comm.rank], comm=comm).item(), 2)
    np.testing.assert_allclose(res, [0.0, 0.0], atol=1e-12)  # rows side via ||G||^2 - 2 tr G + m
