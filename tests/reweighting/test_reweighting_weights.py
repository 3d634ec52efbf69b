"""Sample-weight strategies (spec sparsity-reweighting-ot.md §8, §9): hand-computed vectors,
float64 numpy references from the formulas, and rank invariance over thread ranks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distreg.reweighting import (
    DEFAULTS,
    STRATEGIES,
    kl_dro_normalizer_update,
    kl_dro_objective,
    kl_dro_weights,
    reweighted_loss,
    sample_weights,
    temperature_schedule,
    weight_stats,
)
from tests.reweighting.scenarios import (
    WEIGHT_SPLITS,
    assert_weights_match,
    close,
    np_dro,
    np_loss_based,
    weights_checks,
)
from tests.reweighting.threadcomm import run_threads

L4 = torch.tensor([1.0, 2.0, 3.0, 4.0])


# ----------------------------------------------------------------- hand-computed vectors
def test_hand_computed_closed_forms():
    """Closed forms worked out by hand for losses [1,2,3,4], δ=1: h = [-1, -1/3, 1/3, 1]."""
    e = math.exp
    # LinUpper: f = [0, 2/3, 1, 1]
    z = [e(0), e(2 / 3), e(1), e(1)]
    close(sample_weights("linupper", L4, r=1.0), [x / sum(z) for x in z])
    # Quadratic: f = [0, 8/9, 8/9, 0]
    z = [1, e(8 / 9), e(8 / 9), 1]
    close(sample_weights("quadratic", L4, r=1.0), [x / sum(z) for x in z])
    # Extremes, r = 0.4: f/r = [2.5, 5/6, 5/6, 2.5]
    z = [e(2.5), e(5 / 6), e(5 / 6), e(2.5)]
    close(sample_weights("extremes", L4, r=0.4), [x / sum(z) for x in z])
    # ICLR linear: f = [0, 1/3, 2/3, 1]
    z = [e(0), e(1 / 3), e(2 / 3), e(1)]
    close(sample_weights("linear", L4, r=1.0), [x / sum(z) for x in z])
    close(sample_weights("uniform", L4), [0.25] * 4)
    # DRO [0.5, 1, 2], r = 0.5: softmax([1, 2, 4])
    z = [e(1), e(2), e(4)]
    close(kl_dro_weights(torch.tensor([0.5, 1.0, 2.0]), r=0.5), [x / sum(z) for x in z])


@pytest.mark.parametrize(
    "name,r,expected",
    [
        ("linupper", 1.0, [0.119271, 0.232307, 0.324211, 0.324211]),
        ("linupper", 0.4, [0.032616, 0.172687, 0.397348, 0.397348]),
        ("quadratic", 1.0, [0.145670, 0.354330, 0.354330, 0.145670]),
        ("quadratic", 0.4, [0.048886, 0.451114, 0.451114, 0.048886]),
        ("extremes", 1.0, [0.330378, 0.169622, 0.169622, 0.330378]),
        ("extremes", 0.4, [0.420565, 0.079435, 0.079435, 0.420565]),
        ("linear", 1.0, [0.141610, 0.197633, 0.275819, 0.384937]),
    ],
)
def test_spec_vectors(name, r, expected):
    w = sample_weights(name, L4, r=r)
    close(w, expected, atol=2e-6)  # spec prints 6 decimals
    close(w, np_loss_based(name, L4.numpy(), r=r))
    assert w.dtype == torch.float32 and abs(float(w.sum()) - 1) < 1e-6


def test_dro_spec_vectors_and_objective():
    l = torch.tensor([0.5, 1.0, 2.0])
    for r, w_exp, obj in [(1.0, [0.140244, 0.231224, 0.628532], 1.365756),
                          (0.5, [0.042010, 0.114195, 0.843795], 1.535617),
                          (10.0, [0.311225, 0.327182, 0.361592], 1.186256)]:
        close(kl_dro_weights(l, r=r), w_exp, atol=2e-6)
        close(kl_dro_weights(l, r=r), np_dro(l.numpy(), r=r))
        lg = l.clone().requires_grad_()
        o = kl_dro_objective(lg, r=r)
        o.backward()
        assert abs(o.item() - obj) < 2e-6
        assert abs(o.item() - r * math.log(np.mean(np.exp(l.numpy().astype(np.float64) / r)))) < 1e-6
        close(lg.grad, np_dro(l.numpy(), r=r))  # Danskin: ∂obj/∂ℓ_i = w_i


def test_equal_losses_masks_and_edge_cases():
    for name in ["linupper", "quadratic", "extremes", "linear", "uniform"]:
        close(sample_weights(name, torch.tensor([2.0, 2.0, 2.0])), [1 / 3] * 3)
    # tiny r on all-equal losses must not underflow to NaN (max-shift)
    close(sample_weights("extremes", torch.tensor([2.0, 2.0]), r=1e-4), [0.5, 0.5])
    # padded samples: weight 0, excluded from min/max/normaliser, garbage values ignored
    l = torch.tensor([1.0, float("nan"), 2.0, 3.0, float("inf"), 4.0])
    v = torch.tensor([True, False, True, True, False, True])
    for name in ["linupper", "quadratic", "extremes", "linear", "uniform"]:
        w = sample_weights(name, l, v)
        assert torch.isfinite(w).all() and w[~v].eq(0).all()
        close(w[v], np_loss_based(name, [1, 2, 3, 4]))
    w = kl_dro_weights(l, v, r=0.7)
    close(w, np_dro([1, 0, 2, 3, 0, 4], v.numpy(), r=0.7))
    # no valid sample at all / empty batch
    assert sample_weights("linupper", l, torch.zeros(6, dtype=torch.bool)).eq(0).all()
    assert sample_weights("quadratic", torch.zeros(0)).numel() == 0
    # r = inf: uniform; r <= 0 rejected; float64 in -> float64 out
    close(sample_weights("linupper", L4, r=math.inf), [0.25] * 4)
    with pytest.raises(ValueError):
        sample_weights("linupper", L4, r=0.0)
    assert sample_weights("quadratic", L4.double()).dtype == torch.float64
    with pytest.raises(KeyError):
        sample_weights("upper", L4)  # ambiguous between the two reference repos
    with pytest.raises(ValueError):
        sample_weights("linupper", L4, mode="bogus")


def test_registry_defaults_and_schedule():
    assert set(STRATEGIES) >= {"uniform", "linupper", "quadratic", "mid", "extremes", "linear", "kl_dro"}
    assert STRATEGIES["mid"] is STRATEGIES["quadratic"]
    assert DEFAULTS["linupper"] == {"r": 1.0, "delta": 1.0}
    close(sample_weights("mid", L4), sample_weights("quadratic", L4, r=1.0, delta=1.0))
    close(sample_weights("linupper", L4, delta=2.0), np_loss_based("linupper", L4.numpy(), delta=2.0))
    assert temperature_schedule(999, 0.4, warmup_steps=1000) == math.inf
    assert temperature_schedule(1000, 0.4, warmup_steps=1000) == 0.4
    assert temperature_schedule(5, 1.0, warmup_steps=2000, warmup_r=100.0) == 100.0


def test_reweighted_loss_and_stats_single_process():
    w = sample_weights("linupper", L4, r=1.0)
    lg = L4.clone().requires_grad_()
    loss = reweighted_loss(lg, w)
    loss.backward()
    assert abs(loss.item() - 2.853363) < 1e-5  # spec §8 rank-split vector
    close(lg.grad, w)
    # NaN loss on a zero-weight (padded) sample neither poisons the value nor the gradient
    lp = torch.tensor([1.0, float("nan"), 2.0]).requires_grad_()
    wp = sample_weights("quadratic", lp.detach(), torch.tensor([True, False, True]))
    out = reweighted_loss(lp, wp)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(lp.grad).all()

    s = weight_stats(w, L4)
    wn = np_loss_based("linupper", [1, 2, 3, 4])
    assert s["n"] == 4 and abs(s["sum"] - 1) < 1e-6
    assert abs(s["mean"] - 0.25) < 1e-7 and abs(s["std"] - wn.std()) < 1e-6
    assert abs(s["min"] - wn.min()) < 1e-6 and abs(s["max"] - wn.max()) < 1e-6
    assert abs(s["ess"] - wn.sum() ** 2 / (wn**2).sum()) < 1e-5
    assert s["frac_downweighted"] == 0.5  # samples 1 and 2 are below 1/4
    assert abs(s["loss_weighted"] - 2.853363) < 1e-5 and s["loss_mean"] == 2.5
    u = weight_stats(sample_weights("uniform", L4), L4)
    assert abs(u["ess"] - 4) < 1e-5 and u["frac_downweighted"] == 0.0 and u["std"] < 1e-7


def test_dro_ema_normalizer():
    l = torch.tensor([0.5, 1.0, 2.0])
    lme = math.log(np.mean(np.exp(np.array([0.5, 1.0, 2.0]) / 0.5)))
    z0 = kl_dro_normalizer_update(None, l, r=0.5)
    assert abs(z0 - lme) < 1e-12
    z1 = kl_dro_normalizer_update(1.0, l, r=0.5, beta=0.25)
    assert abs(z1 - math.log(0.75 * math.e + 0.25 * math.exp(lme))) < 1e-12
    w = kl_dro_weights(l, r=0.5, log_normalizer=z1)
    close(w, np.exp(np.array([0.5, 1.0, 2.0]) / 0.5 - z1) / 3)
    # with the batch's own log-mean-exp as normaliser the EMA weights equal the batch weights
    close(kl_dro_weights(l, r=0.5, log_normalizer=z0), kl_dro_weights(l, r=0.5))


# ------------------------------------------------------------ rank invariance (threads)
@pytest.mark.parametrize("mode", ["allreduce", "allgather"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_rank_invariance_threads(world, mode):
    """Uneven and empty local batches, padded samples with NaN losses (scenarios.py)."""
    ref = run_threads(weights_checks, 1, WEIGHT_SPLITS[1], mode)[0]
    ranks = run_threads(weights_checks, world, WEIGHT_SPLITS[world], mode)
    assert_weights_match(ref, ranks, mode)


def test_collective_count_allreduce_mode():
    """The scalar S4 variant: 2 collective rounds per loss-based strategy, 1 for DRO."""

    def body(comm):
        l = torch.rand(3, dtype=torch.float64)
        c0 = comm.calls
        sample_weights("linupper", l, None, comm)
        c1 = comm.calls
        kl_dro_weights(l, None, comm)
        return c1 - c0, comm.calls - c1

    assert run_threads(body, 2) == [(2, 1), (2, 1)]
