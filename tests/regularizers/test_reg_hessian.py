"""Hutchinson trace monitor with index-keyed probes (spec regularizers.md section 15)."""
from __future__ import annotations

import numpy as np
import torch

from distreg.regularizers import (
    hutchinson_trace,
    hvp,
    rademacher,
    stability_ratio,
    vhv_from_gradients,
    vhv_from_losses,
)
from tests.regularizers._threads import run_threads

H = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)


def quad(theta, h=H):
    return 0.5 * theta @ h @ theta


def test_spec_vectors():
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(quad(theta), [theta], create_graph=True)
    vals = []
    for v in ([1.0, 1.0], [1.0, -1.0]):
        vt = torch.tensor(v, dtype=torch.float64)
        vals.append(torch.dot(hvp(grads, [theta], [vt])[0], vt).item())
    np.testing.assert_allclose(vals, [7.0, 3.0], rtol=1e-12)
    np.testing.assert_allclose(np.mean(vals), 5.0, rtol=1e-12)
    v, eps = torch.tensor([1.0, -1.0], dtype=torch.float64), 1e-3
    th = theta.detach()
    gp, gm = H @ (th + eps * v), H @ (th - eps * v)
    np.testing.assert_allclose((gp - gm) / (2 * eps), [1.0, -2.0], rtol=1e-9)
    np.testing.assert_allclose(vhv_from_gradients([v], [gp], [gm], eps).item(), 3.0, rtol=1e-9)
    lp, l0, lm = (quad(th + eps * v).item(), quad(th).item(), quad(th - eps * v).item())
    np.testing.assert_allclose(vhv_from_losses(lp, l0, lm, eps), 3.0, rtol=1e-6)
    assert stability_ratio(5.0, 0.5) == 1.25


def test_rademacher_is_keyed_by_global_offset():
    full = rademacher(1, 7, 0, "w", 0, 1000)
    assert set(full.tolist()) == {-1.0, 1.0} and abs(full.mean().item()) < 0.1
    assert torch.equal(torch.cat([rademacher(1, 7, 0, "w", a, b - a) for a, b in ((0, 300), (300, 300), (300, 1000))]),
                       full)
    assert not torch.equal(rademacher(1, 7, 1, "w", 0, 1000), full)
    assert not torch.equal(rademacher(1, 8, 0, "w", 0, 1000), full)


def np_stop(samples, tol):
    """PyHessian's rule on a stream of samples: the number of probes used."""
    mean = 0.0
    for m in range(1, len(samples) + 1):
        new = np.mean(samples[:m])
        if abs(new - mean) / (abs(mean) + 1e-6) < tol:
            return m
        mean = new
    return len(samples)


def test_hutchinson_on_quadratic():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    h = torch.tensor(a + a.T)
    theta = torch.tensor(rng.normal(size=6), requires_grad=True)
    est = hutchinson_trace(quad(theta, h), [theta], seed=3, step=11, max_probes=40, tol=1e-2)
    vs = [rademacher(3, 11, t, "p0", 0, 6, torch.float64).numpy() for t in range(est.num_probes)]
    np.testing.assert_allclose(est.samples, [v @ h.numpy() @ v for v in vs], rtol=1e-12)
    np.testing.assert_allclose(est.trace, np.mean(est.samples), rtol=1e-12)
    np.testing.assert_allclose(est.stderr, np.std(est.samples, ddof=1) / np.sqrt(est.num_probes), rtol=1e-9)
    full = [v @ h.numpy() @ v for v in (rademacher(3, 11, t, "p0", 0, 6, torch.float64).numpy() for t in range(40))]
    assert est.num_probes == np_stop(full, 1e-2)
    diag = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))  # every probe gives tr exactly
    th = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    est = hutchinson_trace(quad(th, diag), [th], seed=0, step=0)
    assert est.num_probes == 2 and est.trace == 7.0 and est.stderr == 0.0


def _hutch_rank(comm, x, cuts, n):
    r = comm.rank if comm is not None else 0
    a, b = cuts[r], cuts[r + 1]
    w = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64, requires_grad=True)
    loss = (torch.tanh(x[a:b] @ w) ** 2).sum() / n  # this rank's share of the probe-batch mean
    return hutchinson_trace(loss, [w], seed=2, step=5, names=["w"], max_probes=6, tol=0.0, comm=comm)


def test_hutchinson_data_parallel_equals_single_process():
    x = torch.tensor(np.random.default_rng(1).normal(size=(7, 3)))
    res = run_threads(_hutch_rank, 2, x, [0, 2, 7], 7)
    single = _hutch_rank(None, x, [0, 7], 7)
    assert single.num_probes == 6
    for r in res:
        np.testing.assert_allclose(r.samples, single.samples, rtol=1e-12)
        assert r.num_probes == single.num_probes
