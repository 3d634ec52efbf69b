"""DIN mini-batch-aware L2 and Dice (spec regularizers.md section 10)."""
from __future__ import annotations

import numpy as np
import torch

from distreg.regularizers import batch_presence, dice, dice_batch_moments, dice_reference, feature_counts, mba_l2
from tests.regularizers._threads import run_threads, split_rows

TOL = dict(rtol=1e-5, atol=1e-6)


def test_mba_spec_vector():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5], [0.0, 1.0]], requires_grad=True)
    present = batch_presence(torch.tensor([[0, 2, -1], [2, -1, -1]]), 4)
    assert present.tolist() == [True, False, True, False]
    loss = mba_l2(w, torch.tensor([10, 5, 1, 20]), present, lam=0.1)
    np.testing.assert_allclose(loss.item(), 0.0875, **TOL)
    loss.backward()
    np.testing.assert_allclose(w.grad, [[0.01, 0.02], [0, 0], [-0.1, 0.05], [0, 0]], **TOL)


IDS = torch.tensor([[0, 3, 3, -1], [1, 3, -1, -1], [5, 0, 1, 2], [3, -1, -1, -1], [6, 6, 6, 6], [2, 5, -1, -1]])


def np_counts(ids, n):
    out = np.zeros(n, dtype=np.int64)
    for row in ids:
        for j in set(row) - {-1}:
            out[j] += 1
    return out


def test_feature_counts_once_per_sample():
    assert feature_counts(IDS, 8).tolist() == np_counts(IDS.tolist(), 8).tolist()
    assert feature_counts(IDS, 8).tolist() == [2, 2, 2, 3, 0, 2, 1, 0]


def _mba_rank(comm, id_cuts, row_cuts, weight, lam):
    r = comm.rank
    ids = IDS[id_cuts[r]:id_cuts[r + 1]]
    a, b = row_cuts[r], row_cuts[r + 1]
    counts = feature_counts(ids, weight.shape[0], comm)  # over the (here: one-batch) training set
    present = batch_presence(ids, b - a, a, comm)
    w = weight[a:b].clone().requires_grad_()
    loss = mba_l2(w, counts[a:b], present, lam)
    loss.backward()
    return counts, present, loss.item(), w.grad


def test_mba_rows_and_batch_split_across_ranks():
    weight = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = run_threads(_mba_rank, 3, [0, 1, 4, 6], [0, 5, 5, 8], weight, 0.3)  # row shards 5 | 0 | 3
    counts = np_counts(IDS.tolist(), 8)
    present = counts > 0
    w = weight.numpy()
    coef = np.where(present, 1 / np.maximum(counts, 1), 0)
    for r in res:
        assert r[0].tolist() == counts.tolist()
    assert torch.cat([r[1] for r in res]).tolist() == present.tolist()
    np.testing.assert_allclose(sum(r[2] for r in res), 0.15 * np.sum(coef * (w**2).sum(1)), rtol=1e-12)
    np.testing.assert_allclose(torch.cat([r[3] for r in res]), 0.3 * coef[:, None] * w, rtol=1e-12)


def test_dice_spec_vectors():
    s = torch.tensor([[-1.0], [0.0], [1.0], [2.0]], dtype=torch.float64)
    mean, var = dice_batch_moments(s)
    np.testing.assert_allclose([mean.item(), var.item()], [0.5, 1.25], rtol=1e-12)  # population variance
    p = torch.sigmoid((s - mean) / torch.sqrt(var + 1e-8)).flatten()
    np.testing.assert_allclose(p, [0.207240, 0.390023, 0.609977, 0.792760], **TOL)
    np.testing.assert_allclose(dice(s, 0.25, mean, var).flatten(), [-0.405430, 0, 0.707482, 1.689139], **TOL)
    np.testing.assert_allclose(dice_reference(s.flatten(), 0.25, 1.0), [-0.451780, 0, 0.798220, 1.821038], **TOL)


def _dice_rank(comm, xs, alpha, weights):
    x = xs[comm.rank].clone().requires_grad_()
    mean, var = dice_batch_moments(x, comm)
    loss = (dice(x, alpha, mean, var) * weights[comm.rank]).sum()
    loss.backward()
    return loss.item(), x.grad, mean.detach()


def test_dice_batch_moments_split_equals_single_process():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    wts = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    alpha = torch.tensor([0.1, 0.2, -0.3, 0.5], dtype=torch.float64)
    ref = s.clone().requires_grad_()
    m, v = ref.mean(0), ref.var(0, unbiased=False)
    p = torch.sigmoid((ref - m) / torch.sqrt(v + 1e-8))
    full = ((p * ref + (1 - p) * alpha * ref) * wts).sum()
    full.backward()
    cuts = [0, 2, 2, 9]
    res = run_threads(_dice_rank, 3, split_rows(s, cuts), alpha, split_rows(wts, cuts))
    np.testing.assert_allclose(sum(r[0] for r in res), full.item(), rtol=1e-12)
    np.testing.assert_allclose(torch.cat([r[1] for r in res]), ref.grad, rtol=1e-10, atol=1e-12)
    for r in res:
        np.testing.assert_allclose(r[2], s.mean(0), rtol=1e-12)
