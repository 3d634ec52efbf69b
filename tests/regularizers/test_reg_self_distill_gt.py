"""Self-distillation with ground-truth weighting: hand-computed targets and losses, and the
reference loss form (α·MSE(p, y) + (1-α)·MSE(p, t)) having the mixture's gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

from distreg.regularizers.self_distill_gt import mixed_targets, mse_softmax_rows, soft_ce_rows

# C = 3, label 0, teacher logits [0, ln 2, 0] -> softmax [1/4, 1/2, 1/4]; α = 0.6
LABELS = torch.tensor([0])
TEACHER = torch.tensor([[0.0, math.log(2.0), 0.0]])


def test_targets_losses_by_hand():
    q = mixed_targets(LABELS, TEACHER, 0.6)
    torch.testing.assert_close(q, torch.tensor([[0.7, 0.2, 0.1]]))
    z = torch.zeros(1, 3)  # student softmax 1/3 each
    assert soft_ce_rows(z, q).item() == pytest.approx(math.log(3.0), abs=1e-6)
    # ((1/3 - .7)^2 + (1/3 - .2)^2 + (1/3 - .1)^2) / 3
    assert mse_softmax_rows(z, q).item() == pytest.approx(0.0688889, abs=1e-6)
    torch.testing.assert_close(mixed_targets(LABELS, TEACHER, 1.0), torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(mixed_targets(LABELS, TEACHER, 0.0), torch.tensor([[0.25, 0.5, 0.25]]))
    with pytest.raises(ValueError, match="alpha"):
        mixed_targets(LABELS, TEACHER, 1.5)


def test_reference_loss_has_the_mixture_gradient():
    torch.manual_seed(0)
    z = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 3, 1, 1, 2])
    t = torch.randn(5, 4)
    alpha = 0.35
    p = torch.softmax(z, -1)
    ref = alpha * F.mse_loss(p, F.one_hot(y, 4).float()) + (1 - alpha) * F.mse_loss(p, torch.softmax(t, -1))
    (g_ref,) = torch.autograd.grad(ref, z)
    ours = mse_softmax_rows(z, mixed_targets(y, t, alpha)).mean()
    (g_ours,) = torch.autograd.grad(ours, z)
    torch.testing.assert_close(g_ours, g_ref)
    # and they differ by the constant α(1-α)·mean((onehot - softmax t)²)
    const = alpha * (1 - alpha) * ((F.one_hot(y, 4).float() - torch.softmax(t, -1)) ** 2).mean()
    assert (ref - ours).item() == pytest.approx(const.item(), abs=1e-7)
