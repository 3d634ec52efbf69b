"""HPM core (distreg.regularizers.hpm) and the MAE pieces it builds on (distreg.models.mae):
hand-computed vectors for the ranking loss and accuracy, the schedules, the easy-to-hard
mask selection, per-patch losses; keyed masks independent of the batch a sample is in;
the MAE property that masked pixels reach nothing but their own patch's loss."""
from __future__ import annotations

import math

import pytest
import torch

from distreg.config import MaeConfig
from distreg.models.mae import (build_mae, num_visible, patch_losses, patchify, per_sample_mim_loss,
                                random_visible)
from distreg.regularizers.hpm import (ema_decay, hard_fraction, masked_values, num_hard, ranking_counts,
                                      ranking_loss, select_visible)


def nll(x: float) -> float:  # -log(x + 1e-6), the reference's guarded log
    return -math.log(x + 1e-6)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_ranking_loss_by_hand():
    # pairs (i, j): t = [1, 2, 2]: (0,1), (0,2) positive, (1,0), (2,0) negative, (1,2), (2,1) tied (left out)
    pred = torch.tensor([[0.0, 1.0, 3.0]], requires_grad=True)
    target = torch.tensor([[1.0, 2.0, 2.0]])
    want = (nll(sig(1)) + nll(sig(3)) + nll(1 - sig(-1)) + nll(1 - sig(-3))) / 4
    got = ranking_loss(pred, target)
    assert got.shape == (1,) and float(got.detach()) == pytest.approx(want, rel=1e-6)
    got.sum().backward()  # differentiable in the prediction, and pulls p_1, p_2 above p_0
    assert pred.grad[0, 0] > 0 and pred.grad[0, 1] < 0 and pred.grad[0, 2] < 0
    # wrong order costs more; all tied: 0 (no valid pair)
    assert float(ranking_loss(torch.tensor([[3.0, 1.0, 0.0]]), target)) > 1.0
    assert float(ranking_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[5.0, 5.0]]))) == 0.0


def test_ranking_loss_equals_the_reference_batch_form_without_ties():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 6, generator=g), torch.rand(3, 6, generator=g)
    pos = target.unsqueeze(1) > target.unsqueeze(2)
    neg = target.unsqueeze(1) < target.unsqueeze(2)
    d = pred.unsqueeze(1) - pred.unsqueeze(2)
    ref = (-pos.int() * torch.log(torch.sigmoid(d) + 1e-6) - neg.int() * torch.log(1 - torch.sigmoid(d) + 1e-6))
    ref = ref.sum() / (pos + neg).sum()  # models_mae_learn_loss.forward_learning_loss(relative=True)
    torch.testing.assert_close(ranking_loss(pred, target).mean(), ref)


def test_ranking_counts_by_hand():
    t = torch.tensor([[1.0, 2.0, 2.0], [1.0, 2.0, 2.0], [3.0, 2.0, 1.0]])
    p = torch.tensor([[0.0, 1.0, 3.0], [3.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    correct, pairs = ranking_counts(p, t)
    # row 2: pairs (0,1) tied prediction -> wrong (both orders), (0,2) and (1,2) right (both orders)
    assert correct.tolist() == [4, 0, 4] and pairs.tolist() == [4, 4, 6]


def test_schedules_by_hand():
    assert hard_fraction(0, 10) == pytest.approx(0.05) and hard_fraction(9, 10) == 0.5
    assert hard_fraction(99, 10) == 0.5 and hard_fraction(4, 10, max_fraction=1.0) == 0.5
    assert [num_hard(12, f) for f in (0.05, 0.25, 0.5)] == [0, 3, 6]
    assert ema_decay(0, 0.999, 0.9999, 100) == 0.999
    assert ema_decay(50, 0.999, 0.9999, 100) == pytest.approx(0.99945)
    assert ema_decay(500, 0.999, 0.9999, 100) == pytest.approx(0.9999)
    assert num_visible(16, 0.75) == 4 and num_visible(64, 0.75) == 16


def test_select_visible_masks_the_predicted_hardest_and_keeps_random_others():
    pred = torch.tensor([[0.1, 0.9, 0.5, 0.8, 0.2, 0.7, 0.3, 0.4]])  # hardest three: 1, 3, 5
    u = torch.tensor([[0.6, 0.0, 0.3, 0.1, 0.9, 0.2, 0.05, 0.4]])
    # without hard patches: the two lowest uniforms (1 and 6)
    assert select_visible(pred, u, 2, 0).tolist() == [[1, 6]]
    # 1, 3, 5 masked for sure; among the others the lowest uniforms are 6 (0.05) and 2 (0.3)
    assert select_visible(pred, u, 2, 3).tolist() == [[2, 6]]
    assert select_visible(pred, u, 5, 3).tolist() == [[0, 2, 4, 6, 7]]


def test_keyed_masks_do_not_depend_on_the_batch():
    both = random_visible(7, 3, torch.tensor([11, 5]), 16, 0.75)
    alone = random_visible(7, 3, torch.tensor([5]), 16, 0.75)
    assert both.shape == (2, 4) and torch.equal(both[1:], alone)
    assert (both.diff(dim=1) > 0).all()  # sorted, distinct
    assert not torch.equal(random_visible(7, 4, torch.tensor([5]), 16, 0.75), alone)  # another step
    assert not torch.equal(random_visible(8, 3, torch.tensor([5]), 16, 0.75), alone)  # another seed


def test_patch_losses_and_masked_mean_by_hand():
    img = torch.arange(16.0).view(1, 1, 4, 4)  # 1 channel, patch 2: 4 patches
    p = patchify(img, 2)
    assert p[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    raw = patch_losses(torch.zeros(1, 4, 4), p, norm_pix=False)
    assert raw[0, 0] == pytest.approx((0 + 1 + 16 + 25) / 4)
    # normalised target (unbiased var of [0,1,4,5] = 13/3), prediction 0: mean of z^2 = 3/4 * var / (var + 1e-6)
    norm = patch_losses(torch.zeros(1, 4, 4), p, norm_pix=True)
    assert norm[0, 0] == pytest.approx(0.75 * (13 / 3) / (13 / 3 + 1e-6), rel=1e-6)
    out = {"patch_loss": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "mask": torch.tensor([[1.0, 0.0, 1.0, 0.0]])}
    assert per_sample_mim_loss(out).tolist() == [2.0]
    assert masked_values(out["patch_loss"], out["mask"], 2).tolist() == [[1.0, 3.0]]


def test_masked_pixels_reach_only_their_own_patch_loss():
    model = build_mae(MaeConfig(image_size=16, patch_size=4, dim=32, heads=4, decoder_dim=16), seed=0)
    model.add_loss_predictor(1)
    x = torch.randn(2, 3, 16, 16)
    visible = random_visible(0, 0, torch.tensor([0, 1]), 16, 0.75)
    out = model(x, visible)
    assert out["mask"].sum(dim=1).tolist() == [12, 12] and out["loss_pred"].shape == (2, 16)
    hidden = int(out["mask"][0].nonzero()[0])  # a masked patch of sample 0
    r, c = divmod(hidden, 4)
    y = x.clone()
    y[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 1.0
    out2 = model(y, visible)
    changed = (out2["patch_loss"] != out["patch_loss"]).nonzero().tolist()
    assert changed == [[0, hidden]]
    assert torch.equal(out2["loss_pred"], out["loss_pred"])  # the predictor never sees masked pixels
