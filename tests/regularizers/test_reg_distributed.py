"""Rank invariance over real gloo ranks: one 2-process spawn runs every sharded form (uneven
row / element / batch splits) and the results are compared with the 1-process values."""
from __future__ import annotations

import numpy as np
import torch

from distreg.regularizers import (
    batch_presence,
    cs_ib_loss,
    dice,
    dice_batch_moments,
    feature_counts,
    group_sq_norms,
    hutchinson_trace,
    low_rank_project,
    low_rank_project_gram,
    mba_l2,
    orthograd,
    softmax_collapse_counts,
    soft_orthogonality,
    tcm_loss,
    wdr_loss,
    wgsef_prox,
)
from distreg.runtime.comm import Comm
from distreg.testing import run_distributed

ROWS = [0, 3, 8]  # rank 0 holds rows 0..2, rank 1 rows 3..7
BATCH = [0, 2, 7]


def _cases() -> dict:
    gen = torch.Generator().manual_seed(11)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "w": randn(8, 5) / 2,  # orthogonality / TRP matrix, split by rows
        "trp": randn(8, 5) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64),
        "ids": torch.randint(0, 12, (7, 4), generator=gen),
        "table": randn(12, 3),
        "v": randn(8, 5),  # WGSEF: groups = columns (input channels), split by the row sharding
        "layers": [randn(8, 5) ** 3, randn(8, 5)],
        "emb": randn(7, 3),
        "labels": torch.tensor([0, 1, 0, 2, 1, 2, 0]),
        "x": randn(7, 2), "y": randn(7), "yh": randn(7), "t": randn(7, 3),
        "g": randn(8, 5),
        "logits": torch.tensor([[0.0, -20, -20], [0, -16, -16], [3, 0, 0], [0, -30, -30],
                                [1, 2, 3], [0, -25, -25], [5, 5, 5]]),
        "targets": torch.tensor([0, 0, 0, 1, 2, 0, 1]),
        "s": randn(7, 4), "alpha": torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64),
    }


def _grad(fn, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    value = fn(*leaves)
    value.backward()
    return value.item(), [leaf.grad for leaf in leaves]


def _hutch(x, a, b, comm):
    w = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    loss = (torch.tanh(x[a:b] @ w) ** 2).sum() / x.shape[0]
    return hutchinson_trace(loss, [w], seed=4, step=9, names=["w"], max_probes=5, tol=0.0, comm=comm).samples


def compute(comm: Comm, rows: tuple[int, int], batch: tuple[int, int]) -> dict:
    """Every sharded form on this rank's rows / batch slice (the whole with comm=None)."""
    c = _cases()
    (r0, r1), (b0, b1) = rows, batch
    out = {}
    for side in ("rows", "cols"):
        out[f"orth_{side}"] = _grad(lambda w: soft_orthogonality(w, side=side, comm=comm), c["w"][r0:r1])
    if comm is None:
        res = low_rank_project(c["trp"])
    else:
        res = low_rank_project_gram(c["trp"][r0:r1], comm)
    out["trp"] = (res.projection[r0:r1] if comm is None else res.projection,
                  res.subgradient[r0:r1] if comm is None else res.subgradient, int(res.rank))
    ids = c["ids"][b0:b1]
    counts = feature_counts(ids, 12, comm)
    lo, hi = (0, 12) if comm is None else ((0, 5), (5, 12))[comm.rank]  # table rows 5 | 7
    present = batch_presence(ids, hi - lo, lo, comm)
    out["mba"] = (counts, present, _grad(lambda t: mba_l2(t, counts[lo:hi], present, 0.2), c["table"][lo:hi]))
    cols = torch.arange(5).repeat(8, 1)  # group = column: every group is split by the row sharding
    out["gnorms"] = group_sq_norms(c["v"][r0:r1], cols[r0:r1], 5, comm)
    out["prox"] = wgsef_prox(c["v"][r0:r1], cols[r0:r1], 5, 0.2, 2, comm=comm)
    out["wdr"] = _grad(lambda a, b: wdr_loss([a, b], skip_first=False, comm=comm), *(w[r0:r1] for w in c["layers"]))
    out["tcm"] = _grad(lambda e: tcm_loss(e, c["labels"][b0:b1], comm=comm), c["emb"][b0:b1])
    out["csib"] = _grad(lambda yh, t: cs_ib_loss(c["x"][b0:b1], c["y"][b0:b1], yh, t, comm=comm),
                        c["yh"][b0:b1], c["t"][b0:b1])
    out["orthograd"] = orthograd([c["w"][r0:r1]], [c["g"][r0:r1]], comm=comm)[0]
    out["sc"] = softmax_collapse_counts(c["logits"][b0:b1], c["targets"][b0:b1], comm)
    out["dice"] = _grad(lambda s: dice(s, c["alpha"], *dice_batch_moments(s, comm)).pow(2).sum(), c["s"][b0:b1])
    out["hutch"] = _hutch(c["x"], b0, b1, comm)
    return out


def gloo_worker() -> dict:
    comm = Comm()
    r = comm.rank
    return compute(comm, (ROWS[r], ROWS[r + 1]), (BATCH[r], BATCH[r + 1]))


def test_two_gloo_ranks_match_single_process():
    ranks = run_distributed(gloo_worker, 2)
    one = compute(None, (0, 8), (0, 7))
    close = dict(rtol=1e-5, atol=1e-7)

    def cat(key, i=None, j=None):
        return torch.cat([(r[key] if i is None else r[key][i] if j is None else r[key][i][j]) for r in ranks])

    # replicated parameter terms: same value on both ranks, gradient slices assemble the full gradient
    for key in ("orth_rows", "orth_cols", "wdr"):
        for r in ranks:
            np.testing.assert_allclose(r[key][0], one[key][0], **close)
        for i in range(len(one[key][1])):
            np.testing.assert_allclose(torch.cat([r[key][1][i] for r in ranks]), one[key][1][i], **close)
    assert one["orth_rows"][0] > 0.1 and one["orth_cols"][0] > 0.1
    # TRP via the Gram all-reduce (fp64, eigh on rank 0, broadcast) == SVD of the whole matrix
    np.testing.assert_allclose(cat("trp", 0), one["trp"][0], **close)
    np.testing.assert_allclose(cat("trp", 1), one["trp"][1], **close)
    assert [r["trp"][2] for r in ranks] == [one["trp"][2]] * 2 and 1 < one["trp"][2] < 5
    # DIN: global counts and presence, row-sharded table: losses and gradients add up
    for r in ranks:
        assert r["mba"][0].tolist() == one["mba"][0].tolist()
    assert torch.cat([r["mba"][1] for r in ranks]).tolist() == one["mba"][1].tolist()
    np.testing.assert_allclose(sum(r["mba"][2][0] for r in ranks), one["mba"][2][0], **close)
    np.testing.assert_allclose(torch.cat([r["mba"][2][1][0] for r in ranks]), one["mba"][2][1][0], **close)
    # WGSEF: group norms of groups split across ranks, and the prox
    for r in ranks:
        np.testing.assert_allclose(r["gnorms"], one["gnorms"], **close)
        np.testing.assert_allclose(r["prox"][1], one["prox"][1], **close)
    np.testing.assert_allclose(cat("prox", 0), one["prox"][0], **close)
    # partial data terms: values and gradients sum over ranks; CS-IB: the global value on every rank
    np.testing.assert_allclose(sum(r["tcm"][0] for r in ranks), one["tcm"][0], **close)
    np.testing.assert_allclose(torch.cat([r["tcm"][1][0] for r in ranks]), one["tcm"][1][0], **close)
    for r in ranks:
        np.testing.assert_allclose(r["csib"][0], one["csib"][0], **close)
    for i in range(2):
        np.testing.assert_allclose(torch.cat([r["csib"][1][i] for r in ranks]), one["csib"][1][i], **close)
    np.testing.assert_allclose(sum(r["dice"][0] for r in ranks), one["dice"][0], **close)
    np.testing.assert_allclose(torch.cat([r["dice"][1][0] for r in ranks]), one["dice"][1][0], **close)
    # gradient transform on row shards, monitors
    np.testing.assert_allclose(cat("orthograd"), one["orthograd"], **close)
    assert one["sc"].tolist() == [3, 2, 7]
    for r in ranks:
        assert r["sc"].tolist() == one["sc"].tolist()
        np.testing.assert_allclose(r["hutch"], one["hutch"], **close)
