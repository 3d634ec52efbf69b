"""AdvStyle core (distreg.regularizers.adv_style): hand-computed statistics, re-styling,
initial scales and ascent step; the keyed noise is a function of (sample, channel) only."""
from __future__ import annotations

import math

import pytest
import torch

from distreg.regularizers.adv_style import ascent, channel_stats, init_scales, keyed_normal, moment_sums, perturb


def test_channel_stats_unbiased_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 2, 2)
    mu, sig = channel_stats(x, eps=0.0)
    assert mu.item() == 2.5
    assert sig.item() == pytest.approx(math.sqrt(5 / 3), rel=1e-12)  # (2.25+.25+.25+2.25)/3
    _, sig_eps = channel_stats(x, eps=1e-6)
    assert sig_eps.item() == pytest.approx(math.sqrt(5 / 3 + 1e-6), rel=1e-12)
    with pytest.raises(ValueError, match="1x1 feature map"):
        channel_stats(torch.ones(2, 3, 1, 1))


def test_perturb_by_hand():
    # mu = 2.5, sig = sqrt(5/3); s_mu = .5, e_mu = 2 -> mu~ = 3.5; s_sig = 2, e_sig = .5 -> sig~ = sig + 1
    # out = (x - 2.5) * (1 + 1/sqrt(5/3)) + 3.5, 1/sqrt(5/3) = 0.7745966692...
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 2, 2)
    out = perturb(x, torch.tensor([0.5], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64),
                  torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[0.5]], dtype=torch.float64), eps=0.0)
    want = torch.tensor([0.8381049961, 2.6127016654, 4.3872983346, 6.1618950039], dtype=torch.float64)
    torch.testing.assert_close(out.flatten(), want, atol=1e-9, rtol=0)
    # zero noise: the identity (up to round-off), gradients still reach x
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    same = perturb(x, torch.ones(4), torch.ones(4), torch.zeros(3, 4), torch.zeros(3, 4))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=1e-5)


def test_init_scales_by_hand_and_from_split_sums():
    # one channel, three samples [m-d, m+d, m-d, m+d]: mu = m, sig = 2d/sqrt(3)
    ms, sigs = [1.0, 3.0, 8.0], [1.0, 2.0, 4.0]
    x = torch.stack([torch.tensor([m - s * math.sqrt(3) / 2, m + s * math.sqrt(3) / 2] * 2, dtype=torch.float64)
                     for m, s in zip(ms, sigs)]).view(3, 1, 2, 2)
    s = init_scales(moment_sums(x, eps=0.0), eps=0.0)
    # var(1, 3, 8) = 26/2 = 13; var(1, 2, 4) = (16+1+25)/9/2 = 7/3 (unbiased, over samples)
    assert s[0].item() == pytest.approx(math.sqrt(13), rel=1e-6)
    assert s[1].item() == pytest.approx(math.sqrt(7 / 3), rel=1e-6)
    # the reference's direct form (mu.var(0), sig.var(0)) on random maps; sums split in two add up
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * torch.rand(6, 1, 1, 1, dtype=torch.float64) * 3
    mu, sig = channel_stats(x)
    ref = torch.stack([(mu.var(0) + 1e-6).sqrt().flatten(), (sig.var(0) + 1e-6).sqrt().flatten()]).float()
    torch.testing.assert_close(init_scales(moment_sums(x)), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(init_scales(moment_sums(x[:2]) + moment_sums(x[2:])), ref, atol=1e-6, rtol=1e-6)


def test_ascent_step_by_hand():
    got = ascent(torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), lr=0.1, adv_weight=10.0)
    torch.testing.assert_close(got, torch.tensor([1.5, 1.0]))


def test_keyed_normal_depends_on_sample_and_channel_only():
    a = keyed_normal(7, "k", torch.tensor([3, 11]), 5)
    b = keyed_normal(7, "k", torch.tensor([11, 3, 4]), 5)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    assert not torch.equal(a, keyed_normal(7, "other", torch.tensor([3, 11]), 5))
    z = keyed_normal(0, "stats", torch.arange(4000), 8)
    assert abs(z.mean().item()) < 0.03 and z.std().item() == pytest.approx(1.0, abs=0.03)
