"""EQ-Net WDR loss (spec regularizers.md section 14)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distreg.regularizers import standardized_moments, wdr_loss
from tests.regularizers._threads import run_threads

TOL = dict(rtol=1e-5, atol=1e-6)
W1 = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
W2 = torch.tensor([0.0, 0.0, 0.0, 3.0], dtype=torch.float64)


def test_wdr_spec_vectors():
    np.testing.assert_allclose(W1.std().item(), 1.290994, **TOL)
    ks = standardized_moments([W1, W2])
    np.testing.assert_allclose(ks, [[0.9225, 0.0], [1.3125, 0.75]], **TOL)
    np.testing.assert_allclose(0.015 * (ks[0, 0].item() - 1.8) ** 2, 0.0115501, **TOL)
    w0 = torch.randn(10, dtype=torch.float64)  # dropped (the first layer)
    np.testing.assert_allclose(wdr_loss([w0, W1, W2]).item(), 0.288807, **TOL)
    np.testing.assert_allclose(wdr_loss([W1, W2], skip_first=False).item(), 0.288807, **TOL)
    with pytest.raises(ValueError):
        wdr_loss([W1])


def naive(ws, kr=0.015, sr=1.0):
    ks, ss = [], []
    for w in ws:
        z = (w - w.mean()) / w.std()
        ks.append((z**4).mean())
        ss.append((z**3).mean())
    return kr * ((torch.stack(ks) - 1.8) ** 2).mean() + sr * (torch.stack(ss) ** 2).mean()


def _shapes():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, generator=gen, dtype=torch.float64) ** 3,
            torch.rand(11, generator=gen, dtype=torch.float64)]


def test_wdr_gradient_matches_naive_autograd():
    ws = [w.clone().requires_grad_() for w in _shapes()]
    refs = [w.clone().requires_grad_() for w in _shapes()]
    loss = wdr_loss(ws, skip_first=False)
    want = naive(refs)
    np.testing.assert_allclose(loss.item(), want.item(), rtol=1e-12)
    loss.backward()
    want.backward()
    for w, r in zip(ws, refs):
        np.testing.assert_allclose(w.grad, r.grad, rtol=1e-9, atol=1e-12)


def _wdr_rank(comm, cuts):
    r = comm.rank
    local = [w.reshape(-1)[c[r]:c[r + 1]].clone().requires_grad_() for w, c in zip(_shapes(), cuts)]
    loss = wdr_loss(local, kurt_rate=0.5, skip_first=False, comm=comm)
    loss.backward()
    return loss.item(), [w.grad for w in local]


def test_wdr_sharded_equals_whole():
    res = run_threads(_wdr_rank, 3, [[0, 7, 7, 12], [0, 1, 6, 11]])
    refs = [w.clone().requires_grad_() for w in _shapes()]
    want = wdr_loss(refs, kurt_rate=0.5, skip_first=False)
    want.backward()
    for r in res:
        np.testing.assert_allclose(r[0], want.item(), rtol=1e-12)
    for i, ref in enumerate(refs):
        np.testing.assert_allclose(torch.cat([r[1][i] for r in res]), ref.grad.reshape(-1), rtol=1e-9, atol=1e-12)
