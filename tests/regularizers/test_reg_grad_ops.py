"""⊥Grad and the Softmax-Collapse counters (spec regularizers.md sections 2.2, 2.3, 2.7)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distreg.regularizers import orthograd, softmax_collapse_counts
from tests.regularizers._threads import run_threads

TOL = dict(rtol=1e-5, atol=1e-6)
T1, G1 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
T2, G2 = torch.tensor([0.0, 2.0]), torch.tensor([1.0, -1.0])


def test_orthograd_spec_vectors():
    np.testing.assert_allclose(orthograd([T1], [G1], renorm=False)[0], [0.0, 1.0], **TOL)
    np.testing.assert_allclose(orthograd([T1], [G1])[0], [0.0, 1.414214], **TOL)
    out = orthograd([T1, T2], [G1, G2], renorm=False)
    np.testing.assert_allclose(torch.cat(out), [0.0, 1.0, 1.0, 0.0], **TOL)
    out = orthograd([T1, T2], [G1, G2])
    np.testing.assert_allclose(torch.cat(out), [0.0, 1.414214, 1.414214, 0.0], **TOL)
    out = orthograd([T1, T2], [G1, G2], scope="model", renorm=False)
    np.testing.assert_allclose(torch.cat(out), [1.2, 1.0, 1.0, -0.6], **TOL)
    with pytest.raises(ValueError):
        orthograd([T1], [G1], scope="layer")


def test_orthograd_formula_random_shapes_dtypes():
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    gs = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen).to(torch.bfloat16)]
    for scope in ("tensor", "model"):
        out = orthograd(ps, gs, scope=scope)
        assert [o.shape for o in out] == [g.shape for g in gs] and [o.dtype for o in out] == [g.dtype for g in gs]
        groups = [[0], [1]] if scope == "tensor" else [[0, 1]]
        for grp in groups:
            th = np.concatenate([ps[i].double().numpy().ravel() for i in grp])
            g = np.concatenate([gs[i].double().numpy().ravel() for i in grp])
            perp = g - th.dot(g) / th.dot(th) * th
            want = perp * np.linalg.norm(g) / np.linalg.norm(perp)
            got = np.concatenate([out[i].double().numpy().ravel() for i in grp])
            tol = 1e-2 if 1 in grp else 1e-5  # bf16 output
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
            assert abs(got.dot(th)) < 5e-2 * np.linalg.norm(th) * np.linalg.norm(g)


def test_orthograd_nearly_parallel_keeps_direction():
    # ||g_perp|| / ||g|| ~ 3e-9: renorm from the three sums alone (||g||^2 - <θ,g>^2/<θ,θ>) would cancel
    th = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    g = 5 * th + torch.tensor([1e-7, 0.0, 0.0], dtype=torch.float64)
    out = orthograd([th], [g])[0].numpy()
    thn, gn = th.numpy(), g.numpy()
    perp = gn - thn.dot(gn) / thn.dot(thn) * thn
    np.testing.assert_allclose(out, perp / np.linalg.norm(perp) * np.linalg.norm(gn), rtol=1e-6)


def _orthograd_rank(comm, ps, gs, cuts, scope):
    r = comm.rank
    locs = [(p.reshape(-1)[c[r]:c[r + 1]], g.reshape(-1)[c[r]:c[r + 1]]) for p, g, c in zip(ps, gs, cuts)]
    return orthograd([a for a, _ in locs], [b for _, b in locs], scope=scope, comm=comm)


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_orthograd_sharded_equals_single_process(scope):
    gen = torch.Generator().manual_seed(2)
    ps = [torch.randn(4, 3, generator=gen), torch.randn(7, generator=gen)]
    gs = [torch.randn(4, 3, generator=gen), torch.randn(7, generator=gen)]
    cuts = [[0, 5, 5, 12], [0, 0, 3, 7]]  # uneven flat partitions, empty slices on some ranks
    res = run_threads(_orthograd_rank, 3, ps, gs, cuts, scope)
    want = orthograd(ps, gs, scope=scope)
    for i in range(2):
        np.testing.assert_allclose(torch.cat([r[i] for r in res]), want[i].reshape(-1), rtol=1e-5, atol=1e-6)


def test_softmax_collapse_spec_vectors():
    def counts(g, dtype):
        return softmax_collapse_counts(torch.tensor([[0.0, -g, -g]], dtype=dtype), torch.tensor([0])).tolist()

    assert counts(16, torch.float32) == [0, 0, 1]
    assert counts(20, torch.float32) == [1, 1, 1]
    assert counts(5, torch.float16) == [0, 0, 1]
    assert counts(10, torch.float16)[0] == 1
    lsm = torch.log_softmax(torch.tensor([0.0, -16.0, -16.0]), -1)[0].item()
    np.testing.assert_allclose(lsm, -2.38e-7, rtol=0.01)
    # a collapsed row whose label is not the max has a nonzero loss; batch of 3, fp64 never collapses here
    x = torch.tensor([[0.0, -20, -20], [0.0, -20, -20], [1.0, 2.0, 3.0]])
    assert softmax_collapse_counts(x, torch.tensor([0, 1, 2])).tolist() == [2, 1, 3]
    assert softmax_collapse_counts(x.double(), torch.tensor([0, 1, 2])).tolist() == [0, 0, 3]
