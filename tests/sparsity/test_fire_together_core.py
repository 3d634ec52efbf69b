"""FTWT core (distreg.sparsity.fire_together) against hand-computed vectors."""
from __future__ import annotations

import math

import pytest
import torch

from distreg.sparsity.fire_together import (conv_macs, flops_reduction, heat_scores, mask_accuracy, mask_bce,
                                            mass_targets, predicted_keep)

T, F_ = True, False


def test_heat_scores_are_the_spatial_max_of_abs():
    act = torch.tensor([[[[1.0, -3.0], [2.0, 0.0]], [[-0.5, 0.25], [0.0, 0.0]]]])
    assert heat_scores(act).tolist() == [[3.0, 0.5]]
    with pytest.raises(ValueError, match="B, C, H, W"):
        heat_scores(torch.zeros(2, 3))


# scores [4, 1, 3, 2] -> mass [.4, .1, .3, .2]; sorted f0 .4, f2 .3, f3 .2, f1 .1;
# cumulative .4, .7, .9, 1.0: keep while cumulative <= r (+1e-5)
@pytest.mark.parametrize("r,keep", [
    (0.3, [F_, F_, F_, F_]),  # the top filter alone holds more than r: nothing kept
    (0.5, [T, F_, F_, F_]),
    (0.7, [T, F_, T, F_]),  # .4 + .3 == .7 within the tolerance
    (0.69, [T, F_, F_, F_]),
    (0.95, [T, F_, T, T]),
    (1.0, [T, T, T, T]),
])
def test_mass_targets_hand_vectors(r, keep):
    assert mass_targets(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), r).tolist() == [keep]


def test_mass_targets_zero_mass_ties_and_all_zero_rows():
    s = torch.tensor([[0.0, 5.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # r = 1: drop the zero-mass filters; an all-zero sample keeps none
    assert mass_targets(s, 1.0).tolist() == [[F_, T, T, F_], [F_, F_, F_, F_]]
    # r = .5: tie .5/.5 -> the lower index first; all-zero sample: cumulative 0 -> all kept
    assert mass_targets(s, 0.5).tolist() == [[F_, T, F_, F_], [T, T, T, T]]
    assert mass_targets(s, 0.99).tolist() == [[F_, T, F_, F_], [T, T, T, T]]
    # per sample: another row in the batch changes nothing
    alone = mass_targets(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 0.7)
    both = mass_targets(torch.tensor([[4.0, 1.0, 3.0, 2.0], [9.0, 0.0, 0.0, 1.0]]), 0.7)
    assert both[:1].tolist() == alone.tolist() and both[1].tolist() == [False, False, False, False]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mass_threshold"):
            mass_targets(s, bad)


def test_bce_accuracy_and_predicted_keep():
    # BCE(0, 1) = ln 2; BCE(ln 3, 0) = -ln(1 - 3/4) = ln 4; summed: ln 8
    got = mask_bce(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[True, False]]))
    assert got.tolist() == pytest.approx([3 * math.log(2.0)], rel=1e-6)
    logits = torch.tensor([[0.0, math.log(3.0), -1.0, 2.0]])
    assert predicted_keep(logits).tolist() == [[F_, T, F_, T]]  # logit 0 -> sigmoid .5, not > .5
    assert mask_accuracy(logits, torch.tensor([[T, F_, F_, T]])).tolist() == [0.5]


def test_conv_macs_and_reduction():
    # 4 of 8 filters on 3 input channels, 5x6 output, 3x3 kernel: 4 * 30 * 3 * 9
    assert conv_macs(3, 4, (5, 6), 9) == 3240
    assert conv_macs(3, 4, (5, 6), 9, groups=3) == 1080
    dense = conv_macs(8, 8, (5, 6), 9)
    assert dense == 17280 and flops_reduction(3240, dense) == pytest.approx(1 - 3240 / 17280)
    kept = conv_macs(torch.tensor([8.0, 8.0]), torch.tensor([2.0, 8.0]), (1, 1), 1)
    assert kept.tolist() == [16.0, 64.0]
