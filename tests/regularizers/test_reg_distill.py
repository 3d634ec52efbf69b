"""Distillation cores (spec regularizers.md section 13): MEAL V2 ensemble targets, the soft
cross-entropy, the discriminator term, and the soft-hard label adaptation. Expected numbers
are the spec's vectors, worked out by hand in the comments (float64 numpy agrees to 1e-9),
or the reference's own formulation (BCEWithLogits over the stacked 2N x 2 matrix, 1x1 convs)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distreg.regularizers.distill import (
    MealDiscriminator,
    discriminator_loss,
    ensemble_logits,
    ensemble_soft_targets,
    entropy,
    smoothed_onehot,
    soft_cross_entropy,
    soft_hard_adapt,
)

TOL = dict(rtol=1e-5, atol=1e-6)
T1, T2 = [2.0, 1.0, 0.0], [0.0, 2.0, 1.0]  # the spec's two teachers, 3 classes
STUDENT = [1.0, 1.0, 0.0]


def test_meal_v2_spec_vectors():
    # softmax([2,1,0]) = [e^2, e, 1] / (e^2 + e + 1) = [7.389056, 2.718282, 1] / 11.107338
    #                  = [0.665241, 0.244728, 0.090031]
    # softmax([0,2,1]) = [1, e^2, e] / 11.107338 = [0.090031, 0.665241, 0.244728]
    # p_T = mean        = [0.377636, 0.454985, 0.167380];  z_T = [1, 1.5, 0.5]
    teachers = [torch.tensor([T1]), torch.tensor([T2])]
    p_t = ensemble_soft_targets(teachers)
    np.testing.assert_allclose(p_t[0], [0.377636, 0.454985, 0.167380], **TOL)
    np.testing.assert_allclose(ensemble_logits(teachers)[0], [1.0, 1.5, 0.5], **TOL)
    assert ensemble_soft_targets(torch.stack(teachers)).equal(p_t)  # stacked [m, N, C] input
    # log softmax([1,1,0]) = [1, 1, 0] - log(2e + 1) = [1, 1, 0] - 1.861995
    #                      = [-0.861995, -0.861995, -1.861995]
    # L_KD = 0.377636 * 0.861995 + 0.454985 * 0.861995 + 0.167380 * 1.861995 = 1.029374
    ce = soft_cross_entropy(torch.tensor([STUDENT]), p_t)
    np.testing.assert_allclose(ce, [1.029374], **TOL)
    # H(p_T) = -(0.377636 ln 0.377636 + 0.454985 ln 0.454985 + 0.167380 ln 0.167380)
    #        = 0.367738 + 0.358297 + 0.299202 = 1.025237 -> KL part 1.029374 - 1.025237 = 0.004137
    np.testing.assert_allclose(ce - entropy(p_t), [0.004137], rtol=1e-3)
    kl = F.kl_div(F.log_softmax(torch.tensor([STUDENT]), -1), p_t, reduction="sum")
    np.testing.assert_allclose((ce - entropy(p_t)).item(), kl.item(), **TOL)


def test_soft_cross_entropy_rows_gradient_and_token_shape():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)  # [B, T, V]
    teachers = [torch.randn(2, 5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    p_t = ensemble_soft_targets(teachers)
    rows = soft_cross_entropy(student, p_t)
    assert rows.shape == (2, 5) and p_t.dtype == torch.float64
    flat = soft_cross_entropy(student.reshape(10, 7), p_t.reshape(10, 7))  # rows are independent
    torch.testing.assert_close(rows.reshape(10), flat, rtol=0, atol=0)
    # d/dz of -sum t log softmax(z) = softmax(z) - t (t sums to 1)
    (grad,) = torch.autograd.grad(rows.sum(), student)
    torch.testing.assert_close(grad, F.softmax(student, -1) - p_t, rtol=1e-12, atol=1e-12)
    # half precision inputs are computed in float32
    assert soft_cross_entropy(student.detach().bfloat16(), p_t.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="differ"):
        soft_cross_entropy(student, p_t[:, :4])
    with pytest.raises(ValueError, match="differ in shape"):
        ensemble_soft_targets([teachers[0], teachers[1][:, :4]])


def test_discriminator_loss_spec_vector_and_reference_formulation():
    # student row D = [0.5, 0] against [1, 0]; teacher row D = [0, 1] against [0, 1]:
    # softplus(-0.5) + softplus(0) + softplus(0) + softplus(-1)
    #   = 0.474077 + 0.693147 + 0.693147 + 0.313262 = 2.173633, / 4 = 0.543408
    per = discriminator_loss(torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]]))
    np.testing.assert_allclose(per, [0.543408], **TOL)
    # the reference: BCEWithLogits(D(cat(student, teacher)), [[1,0]]*N + [[0,1]]*N), mean of 2N x 2
    g = torch.Generator().manual_seed(1)
    ds, dt = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    ref = F.binary_cross_entropy_with_logits(torch.cat([ds, dt]), torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 6))
    torch.testing.assert_close(discriminator_loss(ds, dt).mean(), ref, **TOL)
    with pytest.raises(ValueError, match=r"\[..., 2\]"):
        discriminator_loss(torch.zeros(3, 3), torch.zeros(3, 3))


def test_meal_discriminator_is_the_reference_1x1_conv_stack():
    torch.manual_seed(0)
    d = MealDiscriminator(256)  # 256 -> 32 -> 4 -> 2 (K = 8, as the reference's 1000 -> 125 -> 15 -> 2)
    assert [tuple(m.weight.shape) for m in (d.fc1, d.fc2, d.fc3)] == [(32, 256), (4, 32), (2, 4)]
    x = torch.randn(5, 256) * 3
    convs = [torch.nn.Conv2d(m.in_features, m.out_features, 1) for m in (d.fc1, d.fc2, d.fc3)]
    for conv, lin in zip(convs, (d.fc1, d.fc2, d.fc3)):
        conv.weight.data.copy_(lin.weight[:, :, None, None])
        conv.bias.data.copy_(lin.bias)
    h = x[:, :, None, None]  # the reference's forward, ReLU after every conv (the last too)
    for conv in convs:
        h = F.relu(conv(h))
    out = d(x)
    torch.testing.assert_close(out, h.view(5, -1), **TOL)
    assert (out >= 0).all()
    assert d(torch.randn(2, 3, 256)).shape == (2, 3, 2)  # token rows
    with pytest.raises(ValueError, match="no hidden units"):
        MealDiscriminator(63)


def test_soft_hard_adaptation_spec_vector():
    # C = 5, y = 3, eps = 0.1: 0.1 / 5 = 0.02 everywhere, 0.9 + 0.02 = 0.92 at the label
    np.testing.assert_allclose(smoothed_onehot(torch.tensor([3]), 5, 0.1)[0], [0.02, 0.02, 0.02, 0.92, 0.02], **TOL)
    soft = torch.tensor([[0.1, 0.2, 0.3, 0.3, 0.1], [0.5, 0.1, 0.1, 0.1, 0.2]])
    out = soft_hard_adapt(soft, torch.tensor([3, 0]), torch.tensor([True, False]), 0.1)
    np.testing.assert_allclose(out[0], [0.02, 0.02, 0.02, 0.92, 0.02], **TOL)  # calibrated row
    assert out[1].equal(soft[1])  # kept row: the teacher's label untouched
    assert math.isclose(float(smoothed_onehot(torch.tensor([1]), 4, 1.0).sum()), 1.0)
    with pytest.raises(ValueError, match="epsilon"):
        smoothed_onehot(torch.tensor([0]), 3, 1.5)
    with pytest.raises(ValueError, match="must match"):
        soft_hard_adapt(soft, torch.tensor([3]), torch.tensor([True]), 0.1)
