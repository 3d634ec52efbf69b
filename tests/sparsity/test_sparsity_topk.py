"""Exact bottom-k selection (spec S1): hand-computed cases, a brute-force reference
(stable sort over the concatenation = canonical tie-break), sharding invariance on
in-process thread ranks, torch.prune equivalence, and one real 2-rank gloo run."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from distreg.runtime.comm import Comm
from distreg.sparsity import (
    ShardScores,
    global_unstructured_masks,
    iss_select,
    magnitude_masks,
    select_bottom_k,
    select_bottom_k_per_layer,
)
from distreg.sparsity.topk import select_bottom_k_columns
from distreg.testing import run_distributed
from tests.sparsity.threadcomm import NoComm, run_threads

# --------------------------------------------------------------------------- helpers


def ref_keep(fulls, k, eligs=None, by_abs=False):
    """Brute force: prune the k smallest eligible scores of the concatenation, ties by
    position in the concatenation, i.e. by (param index, flat index)."""
    flat = torch.cat([f.reshape(-1).float() for f in fulls])
    elig = torch.ones_like(flat, dtype=torch.bool) if eligs is None else torch.cat(
        [torch.ones(f.numel(), dtype=torch.bool) if e is None else e.reshape(-1) for f, e in zip(fulls, eligs)])
    idx = elig.nonzero().view(-1)
    vals = flat[idx].abs() if by_abs else flat[idx]
    keep = elig.clone()
    keep[idx[torch.sort(vals, stable=True).indices[:k]]] = False
    return list(keep.split([f.numel() for f in fulls]))


def ref_keep_per_layer(fulls, ks, eligs=None, by_abs=False):
    eligs = eligs or [None] * len(fulls)
    return [ref_keep([f], k, [e], by_abs)[0] for f, k, e in zip(fulls, ks, eligs)]


def local_shards(fulls, cuts, rank, eligs=None):
    """Rank `rank`'s contiguous slice of every param; cuts[p] = W+1 boundaries."""
    out = []
    for p, f in enumerate(fulls):
        a, b = cuts[p][rank], cuts[p][rank + 1]
        e = None if eligs is None or eligs[p] is None else eligs[p].reshape(-1)[a:b]
        out.append(ShardScores(f.reshape(-1)[a:b], flat_start=a, name=f"p{p}", eligible=e))
    return out


def assemble(per_rank_masks, n_params):
    """Full masks from per-rank lists of local masks (rank order = flat order)."""
    return [torch.cat([masks[p] for masks in per_rank_masks]) for p in range(n_params)]


def random_cuts(numels, world, gen):
    """Random rank-ordered contiguous splits, empty slices included."""
    cuts = []
    for n in numels:
        inner = sorted(torch.randint(0, n + 1, (world - 1,), generator=gen).tolist())
        cuts.append([0, *inner, n])
    return cuts


def tie_heavy(numels, gen):
    return [(torch.randint(0, 5, (n,), generator=gen).float() - 2) * 0.25 for n in numels]


# --------------------------------------------------------------------------- hand-computed


def test_ties_canonical_lowest_index():
    s = [ShardScores(torch.tensor([0.1, 0.2, 0.1, 0.3]))]
    assert select_bottom_k(s, 1).keep[0].tolist() == [False, True, True, True]  # spec 3.5
    assert select_bottom_k(s, 2).keep[0].tolist() == [False, True, False, True]
    sel = select_bottom_k(s, 3)
    assert sel.keep[0].tolist() == [False, False, False, True]
    assert sel.threshold == [pytest.approx(0.2)] and sel.k == [3] and sel.eligible == [4]
    # ties across parameters: the lower parameter index goes first
    two = [ShardScores(torch.tensor([1.0, 5.0])), ShardScores(torch.tensor([1.0, 1.0, 0.5]))]
    keep = select_bottom_k(two, 3).keep
    assert keep[0].tolist() == [False, True] and keep[1].tolist() == [False, True, False]


def test_signed_scores_zero_signs_and_abs():
    x = torch.tensor([0.0, -0.0, -1.5, 2.0, -3.0, 1e-30, -1e-30])
    # signed order: -3, -1.5, -1e-30, then +0 == -0 (tie, index order), 1e-30, 2
    assert select_bottom_k([ShardScores(x)], 4).keep[0].tolist() == [False, True, False, True, False, True, False]
    assert select_bottom_k([ShardScores(x)], 2).threshold == [-1.5]
    assert select_bottom_k([ShardScores(x)], 3).threshold == [pytest.approx(-1e-30, rel=1e-6)]
    # by |x|: 0, 0, 1e-30, 1e-30 (ties by index), then 1.5
    sel = select_bottom_k([ShardScores(x)], 5, by_abs=True)
    assert sel.keep[0].tolist() == [False, False, False, True, True, False, False]
    assert sel.threshold == [1.5]


def test_edge_counts_and_errors():
    x = torch.tensor([3.0, 1.0, 2.0])
    assert select_bottom_k([ShardScores(x)], 0).keep[0].all()
    assert not select_bottom_k([ShardScores(x)], 3).keep[0].any()
    with pytest.raises(ValueError, match="cannot select 4 of 3"):
        select_bottom_k([ShardScores(x)], 4)
    e = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="cannot select 3 of 2"):
        select_bottom_k([ShardScores(x, eligible=e)], 3)
    # ineligible entries are never selected and stay pruned; their scores may be NaN
    y = torch.tensor([3.0, float("nan"), 2.0])
    assert select_bottom_k([ShardScores(y, name="w", eligible=e)], 1).keep[0].tolist() == [True, False, False]
    for bad in (float("nan"), -float("nan"), float("inf"), -float("inf")):
        for by_abs in (False, True):
            with pytest.raises(ValueError, match=r"layers\.1\.weight"):
                select_bottom_k([ShardScores(x, name="layers.0.weight"),
                                 ShardScores(torch.tensor([1.0, bad]), name="layers.1.weight")], 1, by_abs=by_abs)


def test_matches_brute_force_single_process():
    gen = torch.Generator().manual_seed(0)
    numels = [37, 1, 200, 64]
    for trial in range(6):
        fulls = tie_heavy(numels, gen) if trial % 2 else [torch.randn(n, generator=gen) for n in numels]
        if trial >= 4:
            fulls = [f.to(torch.bfloat16) for f in fulls]  # cast to fp32 exactly, many ties
        eligs = [torch.rand(n, generator=gen) > 0.3 for n in numels] if trial % 3 == 0 else None
        shards = local_shards(fulls, [[0, n] for n in numels], 0, eligs)
        n_elig = sum(int(e.sum()) for e in eligs) if eligs else sum(numels)
        for by_abs in (False, True):
            for k in (0, 1, 17, n_elig // 2, n_elig - 1, n_elig):
                assert [m.tolist() for m in select_bottom_k(shards, k, by_abs=by_abs).keep] == \
                    [m.tolist() for m in ref_keep(fulls, k, eligs, by_abs)], (trial, by_abs, k)
            ks = [0, 1, 100, 30] if eligs is None else [0, int(eligs[1].sum()), 50, 5]
            assert [m.tolist() for m in select_bottom_k_per_layer(shards, ks, by_abs=by_abs).keep] == \
                [m.tolist() for m in ref_keep_per_layer(fulls, ks, eligs, by_abs)]


def test_replicated_needs_no_collectives():
    x = [torch.tensor([0.5, 0.1, 0.3]), torch.tensor([0.2])]
    shards = [ShardScores(t) for t in x]
    assert [m.tolist() for m in select_bottom_k(shards, 2, NoComm(), replicated=True).keep] == \
        [[True, False, True], [False]]
    with pytest.raises(AssertionError, match="unexpected all_reduce"):
        select_bottom_k(shards, 2, NoComm())


# --------------------------------------------------------------------------- sharding invariance


def _thread_select(comm, fulls, cuts, eligs, k, ks, by_abs):
    shards = local_shards(fulls, cuts, comm.rank, eligs)
    g = select_bottom_k(shards, k, comm, by_abs=by_abs).keep
    calls = comm.calls
    p = select_bottom_k_per_layer(shards, ks, comm, by_abs=by_abs).keep
    return g, p, calls, comm.calls - calls


def test_any_sharding_gives_single_process_mask():
    gen = torch.Generator().manual_seed(1)
    numels = [23, 5, 64]
    for world in (2, 3, 4):
        for trial in range(3):
            fulls = tie_heavy(numels, gen) if trial < 2 else [torch.randn(n, generator=gen) for n in numels]
            eligs = [torch.rand(n, generator=gen) > 0.25 for n in numels] if trial == 1 else None
            cuts = random_cuts(numels, world, gen)
            cuts[1] = [0] * world + [numels[1]]  # one param entirely on the last rank
            n_elig = sum(int(e.sum()) for e in eligs) if eligs else sum(numels)
            k = int(torch.randint(1, n_elig + 1, (), generator=gen))
            ks = [5, 0, 40]
            for by_abs in (False, True):
                res = run_threads(_thread_select, world, fulls, cuts, eligs, k, ks, by_abs)
                got_g = assemble([r[0] for r in res], 3)
                got_p = assemble([r[1] for r in res], 3)
                assert [m.tolist() for m in got_g] == [m.tolist() for m in ref_keep(fulls, k, eligs, by_abs)]
                assert [m.tolist() for m in got_p] == [m.tolist() for m in ref_keep_per_layer(fulls, ks, eligs, by_abs)]
                # 4 histogram all-reduces + 1 tie all-gather, per-layer batched into the same count
                assert all(r[2] == 5 and r[3] == 5 for r in res)


def _thread_nan(comm):
    x = torch.tensor([1.0, 2.0, float("nan") if comm.rank == 1 else 3.0])
    return select_bottom_k([ShardScores(x, flat_start=3 * comm.rank, name="blocks.3.w")], 1, comm)


def test_nan_on_one_rank_raises_on_every_rank():
    res = run_threads(_thread_nan, 2)
    assert all(isinstance(r, ValueError) and "blocks.3.w" in str(r) for r in res), res


# --------------------------------------------------------------------------- per-column selection


def ref_columns(x, ks, elig):
    """Brute force per column: the k smallest eligible entries, ties by row."""
    want = torch.zeros_like(x, dtype=torch.bool)
    for j, k in enumerate(ks):
        rows = elig[:, j].nonzero().view(-1)
        order = sorted(rows.tolist(), key=lambda r: (float(x[r, j]), r))
        want[order[:k], j] = True
    return want


def test_columns_hand_case_with_ties_and_signed_zero():
    x = torch.tensor([[3.0, -1.0], [1.0, 0.0], [1.0, -0.0], [2.0, -1.0]])
    # column 0: 2 smallest = rows 1, 2 (tie at 1.0); column 1: 3 smallest = -1 (row 0), -1 (row 3), then
    # the first of the two zeros (-0.0 == +0.0): row 1
    sel = select_bottom_k_columns(x, lambda c: torch.tensor([2, 3]))
    assert sel.tolist() == [[False, True], [True, True], [True, False], [False, True]]
    # eligibility: column 0 only rows 0 and 3 -> the smaller is 2.0 (row 3)
    elig = torch.tensor([[True, True], [False, True], [False, True], [True, True]])
    assert select_bottom_k_columns(x, lambda c: torch.tensor([1, 0]), eligible=elig)[:, 0].tolist() == \
        [False, False, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_columns_match_brute_force(dtype):
    gen = torch.Generator().manual_seed(5)
    for trial in range(40):
        n, m = int(torch.randint(1, 25, (), generator=gen)), int(torch.randint(1, 9, (), generator=gen))
        x = torch.randint(-3, 4, (n, m), generator=gen).double() if trial % 2 else torch.randn(n, m, generator=gen,
                                                                                            dtype=torch.float64)
        if trial % 4 == 1:  # values equal in float32, distinct in float64
            x = x + 1e-12 * torch.arange(n * m, dtype=torch.float64).view(n, m)
        x = x.to(dtype)
        elig = torch.rand(n, m, generator=gen) > 0.3
        ks = [int(torch.randint(0, int(c) + 1, (), generator=gen)) for c in elig.sum(0)]
        want = ref_columns(x.double(), ks, elig)
        for gather_below in (0, 1, 4, 10_000):  # pure radix, and finishing by a gather at any round
            got = select_bottom_k_columns(x, lambda c: torch.tensor(ks), eligible=elig, gather_below=gather_below)
            assert torch.equal(got, want), (trial, gather_below)


def _thread_columns(comm, x, cuts, elig, gather_below=0):
    lo, hi = cuts[comm.rank], cuts[comm.rank + 1]
    calls = comm.calls
    sel = select_bottom_k_columns(x[lo:hi], lambda c: (c - 3).clamp_min(0), comm, eligible=elig[lo:hi],
                                  gather_below=gather_below)
    return sel, comm.calls - calls


def test_columns_any_row_split_gives_the_single_process_selection():
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-4, 5, (17, 6), generator=gen).float()  # many ties
    elig = x > -3
    ref = select_bottom_k_columns(x, lambda c: (c - 3).clamp_min(0), eligible=elig)
    assert torch.equal(ref, ref_columns(x, [max(int(c) - 3, 0) for c in elig.sum(0)], elig))
    for cuts in ([0, 9, 17], [0, 0, 17], [0, 4, 5, 17], [0, 17, 17, 17]):
        res = run_threads(_thread_columns, len(cuts) - 1, x, cuts, elig)
        assert torch.equal(torch.cat([r[0] for r in res]), ref), cuts
        assert all(r[1] == 5 for r in res)  # 4 histogram all-reduces + 1 tie all-gather
        # finishing by a gather of the threshold buckets: same selection, fewer rounds
        res = run_threads(_thread_columns, len(cuts) - 1, x, cuts, elig, 64)
        assert torch.equal(torch.cat([r[0] for r in res]), ref), cuts
        assert all(r[1] == 2 for r in res)  # 1 histogram all-reduce + 1 bucket all-gather


def _thread_columns_nan(comm):
    x = torch.tensor([[1.0], [float("nan") if comm.rank else 2.0]])
    return select_bottom_k_columns(x, lambda c: c * 0 + 1, comm)


def test_columns_nan_on_one_rank_raises_on_every_rank():
    res = run_threads(_thread_columns_nan, 2)
    assert all(isinstance(r, ValueError) and "non-finite" in str(r) for r in res), res


# --------------------------------------------------------------------------- torch.prune


def _two_layers(seed):
    torch.manual_seed(seed)
    layers = [nn.Linear(12, 7), nn.Linear(7, 5)]
    flat = torch.cat([m.weight.detach().abs().reshape(-1) for m in layers])
    assert flat.unique().numel() == flat.numel()  # tie-free: torch.topk's pick is then unique
    return layers


def _our_masks(layers, amounts):
    masks = None
    for amount in amounts:
        shards = [ShardScores(m.weight.detach(), eligible=None if masks is None else masks[i])
                  for i, m in enumerate(layers)]
        masks = global_unstructured_masks(shards, amount)
    return masks


@pytest.mark.parametrize("amounts", [[30], [0.5], [0.5, 0.5], [40, 0.3, 0]])
def test_global_unstructured_equals_torch_prune(amounts):
    layers = _two_layers(3)
    ours = _our_masks(layers, amounts)
    for amount in amounts:
        prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=amount)
    for m, mask in zip(layers, ours):
        assert torch.equal(m.weight_mask.bool().reshape(-1), mask)


def test_spec_global_unstructured_vectors():
    p1 = torch.tensor([0.3, -0.1, 0.5, 0.05])
    p2 = torch.tensor([[-0.2, 0.4], [0.01, -0.6]])
    m = global_unstructured_masks([ShardScores(p1), ShardScores(p2)], 0.5)
    assert m[0].tolist() == [1, 0, 1, 0] and m[1].tolist() == [0, 1, 0, 1]
    m = global_unstructured_masks([ShardScores(p1, eligible=m[0]), ShardScores(p2, eligible=m[1])], 0.5)
    assert m[0].tolist() == [0, 0, 1, 0] and m[1].tolist() == [0, 0, 0, 1]
    ten = [ShardScores(torch.arange(1.0, 11.0))]
    assert (~global_unstructured_masks(ten, 0.25)[0]).sum() == 2  # round(2.5) = 2
    assert (~global_unstructured_masks(ten, 0.35)[0]).sum() == 4  # round(3.5) = 4
    with pytest.raises(ValueError):
        global_unstructured_masks(ten, 11)


def test_magnitude_masks_counts_already_pruned():
    gen = torch.Generator().manual_seed(4)
    fulls = [torch.randn(n, generator=gen) for n in (30, 70)]
    masks = [None, None]
    for s in (0.0, 0.25, 0.5, 0.9, 0.9):
        new = magnitude_masks([ShardScores(f, eligible=m) for f, m in zip(fulls, masks)], s)
        assert sum(int((~m).sum()) for m in new) == round(s * 100)
        assert all(m is None or not (n & ~m).any() for m, n in zip(masks, new))  # monotone
        masks = new
    # layer-wise uniform: each layer gets round(s * n_l), by |w|
    lw = magnitude_masks([ShardScores(f) for f in fulls], 0.5, per_layer=True)
    assert [m.tolist() for m in lw] == [m.tolist() for m in ref_keep_per_layer(fulls, [15, 35], by_abs=True)]


# --------------------------------------------------------------------------- real gloo ranks

_GLOO_CUTS = [[0, 10, 10], [0, 2, 7], [0, 0, 5]]  # p0 whole on rank 0, p2 whole on rank 1


def _gloo_cases():
    gen = torch.Generator().manual_seed(7)
    ties = tie_heavy([10, 7, 5], gen)
    elig = [None, torch.tensor([True, False, True, True, False, True, True]), None]
    rnd = [torch.randn(n, generator=gen) for n in (10, 7, 5)]
    return ties, elig, rnd


def gloo_worker():
    """Runs on each of 2 gloo ranks: several selections on uneven shards (one empty
    slice per param on one rank), returned as local masks; plus a NaN on rank 1 only."""
    comm = Comm()
    ties, elig, rnd = _gloo_cases()
    r = comm.rank
    out = {
        "global": select_bottom_k(local_shards(ties, _GLOO_CUTS, r, elig), 9, comm, by_abs=True).keep,
        "per_layer": select_bottom_k_per_layer(local_shards(ties, _GLOO_CUTS, r, elig), [4, 3, 0], comm).keep,
        "all_equal": select_bottom_k(local_shards([torch.ones(10), torch.ones(7), torch.ones(5)], _GLOO_CUTS, r),
                                     14, comm).keep,
        "magnitude": magnitude_masks(local_shards(rnd, _GLOO_CUTS, r), 0.5, comm),
        "unstructured": global_unstructured_masks(local_shards(rnd, _GLOO_CUTS, r, elig), 0.3, comm),
        # ISS-P spec vector 2: one layer sharded [5|5]
        "iss": iss_select([ShardScores(torch.tensor([0.5, -0.1, 0.02, -0.8, 0.3, 0.05, -0.2, 0.9, 0.01, -0.4])
                                       [5 * r:5 * r + 5], flat_start=5 * r)], [0.5], comm),
    }
    bad = rnd[2].clone()
    if r == 1:
        bad[3] = float("nan")
    try:
        select_bottom_k(local_shards([rnd[0], bad], [_GLOO_CUTS[0], _GLOO_CUTS[2]], r), 3, comm)
        out["nan"] = "no error"
    except ValueError as e:
        out["nan"] = str(e)
    return out


def test_two_gloo_ranks_match_single_process():
    ranks = run_distributed(gloo_worker, 2)
    ties, elig, rnd = _gloo_cases()

    def full(key, n=3):
        return [m.tolist() for m in assemble([res[key] for res in ranks], n)]

    assert full("global") == [m.tolist() for m in ref_keep(ties, 9, elig, by_abs=True)]
    assert full("per_layer") == [m.tolist() for m in ref_keep_per_layer(ties, [4, 3, 0], elig)]
    assert full("all_equal") == [[False] * 10, [False] * 4 + [True] * 3, [True] * 5]  # crosses p1's rank cut
    assert full("magnitude") == [m.tolist() for m in ref_keep(rnd, 11, by_abs=True)]
    n_elig = 22 - 2
    assert full("unstructured") == [m.tolist() for m in ref_keep(rnd, round(0.3 * n_elig), elig, by_abs=True)]
    assert full("iss", 1) == [[True, False, False, True, True, False, False, True, False, True]]
    assert all("p1" in res["nan"] and "p0" not in res["nan"] for res in ranks), [res["nan"] for res in ranks]
