"""Core of `layer_adaptive` (distreg.sparsity.layer_adaptive): the DP allocator against
hand-computed cases and brute force, the budget rule, the level grid and counts, and the
distortion reductions on 1 vs 2 / 3 thread ranks."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from distreg.sparsity.layer_adaptive import (
    allocate,
    check_levels,
    distortion_from_sums,
    level_counts,
    level_grid,
    local_distortion,
    monotone_envelope,
    sample_sq_errors,
)
from tests.threadcomm import run_threads


def brute_force(table, counts_n, levels, target, unit=1):
    """All S^L allocations: (distortion, total count, level vector) of the best one under
    the budget rule, summing distortions in layer order like the DP."""
    counts = level_counts(counts_n, levels)
    need = -(-target // unit)
    best = None
    for combo in itertools.product(range(len(levels)), repeat=len(counts_n)):
        if sum(counts[l][j] // unit for l, j in enumerate(combo)) < need:
            continue
        d = 0.0
        for l, j in enumerate(combo):
            d = d + float(table[l][j])
        key = (d, sum(counts[l][j] for l, j in enumerate(combo)))
        if best is None or key < best[:2]:
            best = (*key, list(combo))
    return best


# --------------------------------------------------------------------------- hand-computed


def test_two_layers_by_hand():
    # n = (10, 20), levels (0, .5, 1): counts layer 0 = (0, 5, 10), layer 1 = (0, 10, 20).
    # Distortions layer 0 = (0, 1, 4), layer 1 = (0, 3, 3.5). Feasible pairs for target 15:
    # (.5,.5) 15 -> 4; (0,1) 20 -> 3.5; (.5,1) 25 -> 4.5; (1,.5) 20 -> 7; (1,1) 30 -> 7.5.
    # Best: layer 0 dense, layer 1 fully pruned (uniform 50 % would cost 4).
    table = [[0.0, 1.0, 4.0], [0.0, 3.0, 3.5]]
    a = allocate(table, [10, 20], [0.0, 0.5, 1.0], 15)
    assert (a.level_index, a.pruned, a.total_pruned, a.distortion) == ([0, 2], [0, 20], 20, 3.5)
    # target 21: (0,1) has 20 < 21 and drops out; (.5,1) 25 -> 4.5 beats (1,1) 30 -> 7.5
    a = allocate(table, [10, 20], [0.0, 0.5, 1.0], 21)
    assert (a.level_index, a.total_pruned, a.distortion) == ([1, 2], 25, 4.5)
    # target 5: (.5, 0) -> 1 is cheapest; target 0: nothing pruned; target 30: everything
    assert allocate(table, [10, 20], [0.0, 0.5, 1.0], 5).level_index == [1, 0]
    assert allocate(table, [10, 20], [0.0, 0.5, 1.0], 0).level_index == [0, 0]
    assert allocate(table, [10, 20], [0.0, 0.5, 1.0], 30).level_index == [2, 2]


def test_three_layers_by_hand_and_tie_breaks():
    # n = (4, 8, 12), levels (0, .25, .5): counts (0,1,2), (0,2,4), (0,3,6); target 6.
    # Distortions: layer 0 (0, .5, 2), layer 1 (0, .1, .3), layer 2 (0, .2, 1).
    # Candidates with >= 6 pruned: (0,2,1)=7 -> .5; (1,1,1)=6 -> .8; (0,1,2)=8 -> 1.1;
    # (2,2,0)=6 -> 2.3; (0,2,2)=10 -> 1.3; (1,2,1)=8 -> 1.0. Best (0, .5, .25): 7 pruned, .5.
    table = [[0.0, 0.5, 2.0], [0.0, 0.1, 0.3], [0.0, 0.2, 1.0]]
    a = allocate(table, [4, 8, 12], [0.0, 0.25, 0.5], 6)
    assert (a.level_index, a.pruned, a.total_pruned) == ([0, 2, 1], [0, 4, 3], 7)
    assert a.distortion == pytest.approx(0.5)
    # equal distortion: the smaller total count wins ((.5, 0) prunes 5, (1, 0) prunes 10),
    # then at equal counts the lower level of the later layer ((.5, 0) over (0, .5))
    a = allocate([[0.0, 1.0, 1.0], [0.0, 1.0, 5.0]], [10, 10], [0.0, 0.5, 1.0], 5)
    assert (a.level_index, a.total_pruned, a.distortion) == ([1, 0], 5, 1.0)


def test_level_grid_counts_and_envelope():
    assert level_grid(20, 0.95) == pytest.approx([0.05 * j for j in range(20)])
    assert level_grid(2, 1.0) == [0.0, 1.0]
    # round half to even, the magnitude_masks rule: .5 * 5 = 2.5 -> 2, .5 * 7 = 3.5 -> 4
    assert level_counts([5, 7, 100], [0.0, 0.5, 0.95]) == [[0, 2, 5], [0, 4, 7], [0, 50, 95]]
    env = monotone_envelope(torch.tensor([[0.0, 2.0, 1.0, 3.0], [0.0, 0.0, -1.0, 0.5]]))
    assert env.tolist() == [[0.0, 2.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.5]]
    for bad in ([0.5], [0.0, 0.5, 0.5], [0.0, 1.5], [0.3, 0.1]):
        with pytest.raises(ValueError, match="levels"):
            check_levels(bad)
    with pytest.raises(ValueError, match="num_levels"):
        level_grid(1, 0.5)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="outside what the levels reach"):
        allocate([[0.0, 1.0]], [10], [0.0, 0.5], 6)  # at most 5 prunable
    with pytest.raises(ValueError, match="NaN"):
        allocate([[0.0, math.nan]], [10], [0.0, 0.5], 5)
    with pytest.raises(ValueError, match="must be \\[layers=2, levels=2\\]"):
        allocate([[0.0, 1.0]], [10, 10], [0.0, 0.5], 5)
    with pytest.raises(ValueError, match="budget unit"):
        allocate([[0.0, 1.0], [0.0, 1.0]], [3, 3], [0.0, 1.0], 6, unit=4)  # 3 // 4 = 0 units per layer


# --------------------------------------------------------------------------- brute force


def random_instance(rng: random.Random, integer: bool):
    n_layers, n_levels = rng.randint(1, 4), rng.randint(2, 5)
    levels = sorted(rng.sample([i / 20 for i in range(21)], n_levels))
    sizes = [rng.randint(1, 40) for _ in range(n_layers)]
    table = [[float(rng.randint(0, 4)) if integer else rng.random() for _ in levels] for _ in sizes]
    most = sum(row[-1] for row in level_counts(sizes, levels))
    return table, sizes, levels, rng.randint(0, most)


@pytest.mark.parametrize("integer", [False, True])
def test_dp_equals_brute_force(integer):
    rng = random.Random(1 if integer else 0)
    for _ in range(150):
        table, sizes, levels, target = random_instance(rng, integer)
        a = allocate(table, sizes, levels, target)
        d, count, combo = brute_force(table, sizes, levels, target)
        assert (a.distortion, a.total_pruned) == (d, count)
        assert a.total_pruned >= target and a.pruned == [level_counts(sizes, levels)[l][j]
                                                         for l, j in enumerate(a.level_index)]
        if not integer:  # continuous distortions: the optimum is unique
            assert a.level_index == combo


def test_dp_with_budget_unit_equals_brute_force_of_the_quantised_problem():
    rng = random.Random(2)
    for _ in range(100):
        table, sizes, levels, target = random_instance(rng, False)
        unit = rng.randint(2, 5)
        try:
            a = allocate(table, sizes, levels, target, unit=unit)
        except ValueError as e:
            assert "budget unit" in str(e)
            assert brute_force(table, sizes, levels, target, unit) is None
            continue
        d, count, combo = brute_force(table, sizes, levels, target, unit)
        assert a.level_index == combo and a.distortion == d
        assert a.total_pruned >= target  # the floor costs never undercount


def test_monotone_curves_overshoot_less_than_one_level_step():
    # Budget rule, documented: with non-decreasing curves no pruned layer can step down one
    # level and still meet the target, so the overshoot is below every such step.
    rng = random.Random(3)
    for _ in range(150):
        table, sizes, levels, target = random_instance(rng, rng.random() < 0.5)
        table = monotone_envelope(torch.tensor(table)).tolist()
        a = allocate(table, sizes, levels, target)
        counts = level_counts(sizes, levels)
        for l, j in enumerate(a.level_index):
            if j > 0 and counts[l][j] > counts[l][j - 1]:
                assert a.total_pruned - (counts[l][j] - counts[l][j - 1]) < target


# --------------------------------------------------------------------------- distortion


def test_sample_sq_errors_by_hand():
    out = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]])
    ref = torch.zeros(3, 2)
    sq, n = sample_sq_errors(out, ref, torch.tensor([True, True, False]))
    assert sq.tolist() == [5.0, 25.0, 0.0] and n.tolist() == [2.0, 2.0, 0.0]
    assert float(local_distortion(sq, n, "mse")) == 30.0  # / 4 values globally
    assert float(local_distortion(sq, n, "worst_case")) == 12.5  # sample 1: 25 / 2
    # language model logits [B, T, V]: sample 0 has positions 0, 1 valid, sample 1 only 1
    out = torch.arange(12.0).view(2, 3, 2)
    sq, n = sample_sq_errors(out, torch.zeros(2, 3, 2), torch.tensor([[True, True, False], [False, True, False]]))
    # sample 0: 0+1 + 4+9 = 14 over 4 values; sample 1: 64+81 = 145 over 2
    assert sq.tolist() == [14.0, 145.0] and n.tolist() == [4.0, 2.0]
    with pytest.raises(ValueError, match="differs from the dense"):
        sample_sq_errors(out, torch.zeros(2, 3, 3))


@pytest.mark.parametrize("kind", ["mse", "worst_case"])
def test_distortion_and_allocation_rank_invariant_on_thread_ranks(kind):
    """A [layers, levels] table of distortions from per-sample errors split over 1, 2, 3
    ranks (one all-reduce) equals the whole-batch value; the allocation is the same on
    every rank."""
    torch.manual_seed(0)
    outs = torch.randn(3, 4, 7, 5)  # [layer, level, sample, channel]
    outs[:, 0] = 0  # level 0: the dense output
    ref = torch.zeros(7, 5)
    valid = torch.tensor([True, True, False, True, True, True, True])

    def whole():
        t = torch.zeros(3, 4, dtype=torch.float64)
        for l, j in itertools.product(range(3), range(4)):
            sq, n = sample_sq_errors(outs[l, j], ref, valid)
            t[l, j] = sq.sum() / n.sum() if kind == "mse" else (sq[n > 0] / n[n > 0]).max()
        return t

    def body(comm):
        rows = torch.tensor_split(torch.arange(7), comm.world_size)[comm.rank]
        local = torch.zeros(3, 4, dtype=torch.float64)
        values = 0.0
        for l, j in itertools.product(range(3), range(4)):
            sq, n = sample_sq_errors(outs[l, j][rows], ref[rows], valid[rows])
            local[l, j] = local_distortion(sq, n, kind)
            values = float(n.sum())
        if kind == "mse":
            red = comm.all_reduce(torch.cat([local.reshape(-1), torch.tensor([values], dtype=torch.float64)]))
            table = distortion_from_sums(red[:-1], float(red[-1]), kind).view(3, 4)
        else:
            table = distortion_from_sums(comm.all_reduce(local, op="max"), 0.0, kind)
        return table, allocate(monotone_envelope(table), [30, 50, 20], [0.0, 0.3, 0.6, 0.9], 45).level_index

    expect = whole()
    for world in (1, 2, 3):
        res = run_threads(body, world)
        for table, picked in res:
            torch.testing.assert_close(table, expect, rtol=1e-12, atol=0)
            assert picked == res[0][1] == allocate(monotone_envelope(expect), [30, 50, 20],
                                                   [0.0, 0.3, 0.6, 0.9], 45).level_index
