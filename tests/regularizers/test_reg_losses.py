"""Losses: StableMax CE, the two z-losses, normalized softmax, TCM, CS-IB (spec regularizers.md
sections 2.1, 5, 11, 12, 16). Expected numbers are the spec's vectors or recomputed here from
the formulas with numpy (float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distreg.regularizers import (
    cs_divergence,
    cs_ib_loss,
    cs_qmi,
    cs_qmi_normalized,
    normalized_softmax_logits,
    normalized_softmax_loss,
    normsoftmax_embedding,
    stablemax,
    stablemax_cross_entropy,
    tcm_loss,
    z_loss_logit,
    z_loss_spherical,
)
from tests.regularizers._threads import run_threads, split_rows

TOL = dict(rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- StableMax


def test_stablemax_spec_vectors():
    x = torch.tensor([[2.0, -1.0, 0.0]])
    np.testing.assert_allclose(stablemax(x)[0], [0.666667, 0.111111, 0.222222], **TOL)
    np.testing.assert_allclose(stablemax_cross_entropy(x, torch.tensor([0])).item(), 0.405465, **TOL)
    xb = torch.tensor([[0.0, -3.0, 5.0], [1.0, 1.0, 1.0]])
    per = stablemax_cross_entropy(xb, torch.tensor([2, 0]), reduction="none")
    assert per.dtype == torch.float64
    np.testing.assert_allclose(per, [0.189242, 1.098612], **TOL)
    np.testing.assert_allclose(stablemax_cross_entropy(xb, torch.tensor([2, 0])).item(), 0.643927, **TOL)
    np.testing.assert_allclose(stablemax_cross_entropy(xb, torch.tensor([2, 0]), "sum").item(), 1.287854, **TOL)


def test_stablemax_value_and_gradient_match_formula():
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(5, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 7, (5,), generator=gen)
    stablemax_cross_entropy(x, y, "sum").backward()
    xn, yn = x.detach().numpy(), y.numpy()
    s = np.where(xn >= 0, xn + 1, 1 / (1 - xn))
    ds = np.where(xn >= 0, 1.0, 1 / (1 - xn) ** 2)
    rows = np.arange(5)
    loss = np.log(s.sum(1)) - np.log(s[rows, yn])
    grad = ds / s.sum(1, keepdims=True)
    grad[rows, yn] -= ds[rows, yn] / s[rows, yn]
    np.testing.assert_allclose(stablemax_cross_entropy(x, y, "none").detach(), loss, rtol=1e-12)
    np.testing.assert_allclose(x.grad, grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- z-losses


def test_spherical_z_loss_spec_vectors_and_invariance():
    o, c = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([3])
    np.testing.assert_allclose(z_loss_spherical(o, c, a=1, b=1).item(), 0.536846, **TOL)
    with pytest.warns(UserWarning, match="sqrt"):  # b = 10 > sqrt(3): the spec's own vector
        np.testing.assert_allclose(z_loss_spherical(o, c, a=0.1, b=10).item(), 12.169854, **TOL)
    np.testing.assert_allclose(z_loss_spherical(3 * o + 7, c, 1, 1).item(), 0.536846, **TOL)  # shift/scale
    flat = torch.zeros(1, 4, requires_grad=True)  # all-equal logits: z = 0, finite gradient
    loss = z_loss_spherical(flat, c, 1.0, 0.0)
    loss.backward()
    np.testing.assert_allclose(loss.item(), np.log(2), **TOL)
    assert torch.isfinite(flat.grad).all()


def test_spherical_z_loss_gradient_matches_spec_formula():
    gen = torch.Generator().manual_seed(1)
    o = torch.randn(3, 6, generator=gen, dtype=torch.float64).requires_grad_()
    c = torch.tensor([0, 4, 5])
    a, b = 2.0, 0.5
    z_loss_spherical(o, c, a, b, reduction="sum").backward()
    on = o.detach().numpy()
    d = on.shape[1]
    mu, sig = on.mean(1, keepdims=True), on.std(1, keepdims=True)  # population std
    z = (on - mu) / sig
    for i, ci in enumerate(c.tolist()):
        dl_dz = -1 / (1 + np.exp(-a * (b - z[i, ci])))
        dz_do = ((np.arange(d) == ci) - 1 / d - z[i, ci] * z[i] / d) / sig[i]
        np.testing.assert_allclose(o.grad[i].numpy(), dl_dz * dz_do, rtol=1e-9, atol=1e-12)


def test_palm_z_loss_spec_vectors_mask_and_gradient():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    np.testing.assert_allclose(z_loss_logit(logits[:1]).item(), 0.00197153, rtol=1e-5)
    np.testing.assert_allclose(z_loss_logit(logits).item(), 0.00108185, rtol=1e-5)
    valid = torch.tensor([True, False])
    np.testing.assert_allclose(z_loss_logit(logits, valid=valid).item(), 0.00197153, rtol=1e-5)
    np.testing.assert_allclose(z_loss_logit(logits, valid=valid, reduction="none").detach(), [0.00197153, 0.0],
                               rtol=1e-5)
    z_loss_logit(logits, kappa=1.0, reduction="sum").backward()
    ln = logits.detach().numpy().astype(np.float64)
    log_z = np.log(np.exp(ln).sum(1, keepdims=True))
    np.testing.assert_allclose(logits.grad, 2 * log_z * np.exp(ln - log_z), rtol=1e-5)


# --------------------------------------------------------------------------- normalized softmax


def test_normalized_softmax_spec_vectors():
    e = torch.nn.functional.normalize(torch.tensor([[3.0, 4.0]]), dim=-1)
    np.testing.assert_allclose(e[0], [0.6, 0.8], **TOL)
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    np.testing.assert_allclose(normalized_softmax_logits(e, w)[0], [12.0, 16.0, -19.798990], **TOL)
    np.testing.assert_allclose(normalized_softmax_loss(e, w, torch.tensor([1])).item(), 0.018150, **TOL)
    np.testing.assert_allclose(normsoftmax_embedding(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))[0],
                               [-0.534522, -0.267261, 0.0, 0.801784], **TOL)
    remap = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]])  # keeps features 0 and 3 of the LayerNorm output
    np.testing.assert_allclose(normsoftmax_embedding(torch.tensor([[1.0, 2.0, 3.0, 6.0]]), remap)[0],
                               np.array([-2.0, 3.0]) / np.sqrt(13), **TOL)


# --------------------------------------------------------------------------- TCM

TCM_EMB = torch.tensor([[0.0, 1.0], [0.43, 0.9], [1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
TCM_LAB = torch.tensor([0, 0, 1, 1])


def tcm_reference(emb, lab, mp=0.9, mn=0.5):
    """Plain all-pairs TCM with full autograd (no detaching), for gradients."""
    e = torch.nn.functional.normalize(emb, dim=-1)
    s = e @ e.t()
    off = ~torch.eye(len(lab), dtype=torch.bool)
    same = lab[:, None] == lab[None, :]
    pos, neg = same & off & (s <= mp), ~same & off & (s >= mn)
    lp = (mp - s)[pos].sum() / pos.sum() if pos.any() else s.sum() * 0
    ln = (s - mn)[neg].sum() / neg.sum() if neg.any() else s.sum() * 0
    return lp + ln


def test_tcm_spec_vector_and_gradient():
    emb = TCM_EMB.clone().requires_grad_()
    loss = tcm_loss(emb, TCM_LAB)
    np.testing.assert_allclose(loss.item(), 0.517876, **TOL)
    np.testing.assert_allclose(tcm_loss(emb, TCM_LAB, pos_weight=1.0, neg_weight=0.0).item(), 0.192893, **TOL)
    np.testing.assert_allclose(tcm_loss(emb, TCM_LAB, pos_weight=0.0).item(), 0.324983, **TOL)
    loss.backward()
    ref_emb = TCM_EMB.clone().requires_grad_()
    tcm_reference(ref_emb, TCM_LAB).backward()
    np.testing.assert_allclose(emb.grad, ref_emb.grad, rtol=1e-10, atol=1e-12)
    assert emb.grad.abs().sum() > 0
    assert tcm_loss(TCM_EMB[:2], TCM_LAB[:2]).item() == 0.0  # no qualifying pair: 0, not NaN


def _tcm_rank(comm, embs, labs, parts):
    e = embs[comm.rank].clone().requires_grad_()
    parts_out = [tcm_loss(e, labs[comm.rank], pos_weight=pw, neg_weight=nw, comm=comm).item() for pw, nw in parts]
    loss = tcm_loss(e, labs[comm.rank], comm=comm)
    loss.backward()
    return loss.item(), parts_out, e.grad


@pytest.mark.parametrize("cuts", [[0, 2, 4], [0, 1, 1, 4]])
def test_tcm_split_across_ranks_sums_to_single_process(cuts):
    gen = torch.Generator().manual_seed(3)
    emb = torch.cat([TCM_EMB, torch.randn(5, 2, generator=gen, dtype=torch.float64)])[: cuts[-1] + 5]
    lab = torch.cat([TCM_LAB, torch.tensor([0, 1, 1, 0, 1])])
    cuts = cuts[:-1] + [9]
    res = run_threads(_tcm_rank, len(cuts) - 1, split_rows(emb, cuts), split_rows(lab, cuts), [(1, 0), (0, 1)])
    ref = emb.clone().requires_grad_()
    full = tcm_reference(ref, lab)
    full.backward()
    np.testing.assert_allclose(sum(r[0] for r in res), full.item(), rtol=1e-12)
    np.testing.assert_allclose(torch.cat([r[2] for r in res]), ref.grad, rtol=1e-10, atol=1e-12)


def test_tcm_spec_two_rank_local_sums():
    res = run_threads(_tcm_rank, 2, split_rows(TCM_EMB, [0, 2, 4]), split_rows(TCM_LAB, [0, 2, 4]), [(1, 0), (0, 1)])
    # spec: rank 0 pos (0, 0), neg (0.65, 2); rank 1 pos (0.385786, 2), neg (0.65, 2), global counts 2
    # and 4 (0.65 is rounded: each rank's negative sum is half of 4 * 0.324983)
    np.testing.assert_allclose([r[1] for r in res], [[0.0, 0.649966 / 4], [0.385786 / 2, 0.649966 / 4]], rtol=1e-5)


# --------------------------------------------------------------------------- CS-IB

CS_X = np.array([[0.0], [1.0], [2.0], [3.0]])
CS_Y = np.array([0.0, 1.0, 0.0, 1.0])
CS_YH = np.array([0.1, 0.9, 0.2, 0.8])
CS_T = np.array([[0, 0.5], [1, 0], [0.5, 0.5], [2, 1]])


def np_gram(a, b, sigma=1.0):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))


def np_dcs(x, y, yh, paper=False):
    k = np_gram(x, x)
    d = k.sum(1) ** 2 if paper else (k**2).sum(1)
    t = [((k * kk).sum(1) / d).sum() for kk in (np_gram(y, y), np_gram(yh, yh), np_gram(yh, y))]
    return np.log2(t[0]) + np.log2(t[1]) - 2 * np.log2(t[2])


def np_qmi(x, t):
    n, kx, kt = len(x), np_gram(x, x), np_gram(t, t)
    return (np.log2((kx * kt).sum() / n**2) + np.log2(kx.sum() * kt.sum() / n**4)
            - 2 * np.log2((kx.sum(1) * kt.sum(1)).sum() / n**3))


def test_cs_ib_spec_vectors_and_formula():
    x, y, yh, t = (torch.tensor(a) for a in (CS_X, CS_Y, CS_YH, CS_T))
    np.testing.assert_allclose(cs_divergence(x, y, yh).item(), 0.016148, **TOL)
    np.testing.assert_allclose(cs_divergence(x, y, yh, denominator="sq_sum").item(), 0.016905, **TOL)
    np.testing.assert_allclose(cs_divergence(x, y, y).item(), 0.0, atol=1e-12)
    np.testing.assert_allclose(cs_qmi(x, t).item(), 0.246877, **TOL)
    np.testing.assert_allclose(cs_qmi_normalized(x, t).item(), 0.685023, **TOL)
    np.testing.assert_allclose(cs_ib_loss(x, y, yh, t).item(), 0.022998, **TOL)
    # the same from the formulas (numpy), on random data with 2-D targets
    rng = np.random.default_rng(0)
    xr, yr, yhr, tr = rng.normal(size=(6, 3)), rng.normal(size=(6, 2)), rng.normal(size=(6, 2)), rng.normal(size=(6, 4))
    qmi = np_qmi(xr, tr) / np.sqrt(np_qmi(xr, xr) * np_qmi(tr, tr))
    for paper in (False, True):
        want = np_dcs(xr, yr, yhr, paper) + 0.3 * qmi
        got = cs_ib_loss(*(torch.tensor(a) for a in (xr, yr, yhr, tr)), beta=0.3,
                         denominator="sq_sum" if paper else "sum_sq")
        np.testing.assert_allclose(got.item(), want, rtol=1e-10)


def _cs_rank(comm, xs, ys, yhs, ts):
    r = comm.rank
    yh, t = yhs[r].clone().requires_grad_(), ts[r].clone().requires_grad_()
    loss = cs_ib_loss(xs[r], ys[r], yh, t, beta=0.5, comm=comm)
    loss.backward()
    return loss.item(), yh.grad, t.grad


def test_cs_ib_split_equals_single_process():
    rng = np.random.default_rng(1)
    x, y, yh, t = (torch.tensor(rng.normal(size=s)) for s in ((7, 3), (7,), (7,), (7, 2)))
    cuts = [0, 2, 2, 7]  # uneven, one empty rank
    res = run_threads(_cs_rank, 3, *(split_rows(a, cuts) for a in (x, y, yh, t)))
    yh1, t1 = yh.clone().requires_grad_(), t.clone().requires_grad_()
    full = cs_ib_loss(x, y, yh1, t1, beta=0.5)
    full.backward()
    for r in res:
        np.testing.assert_allclose(r[0], full.item(), rtol=1e-12)  # same global value on every rank
    np.testing.assert_allclose(torch.cat([r[1] for r in res]), yh1.grad, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(torch.cat([r[2] for r in res]), t1.grad, rtol=1e-10, atol=1e-13)
