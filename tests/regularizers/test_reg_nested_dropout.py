"""Nested dropout with a half-Gaussian keep distribution (spec regularizers.md section 9)."""
from __future__ import annotations

import numpy as np
import torch

from distreg.regularizers import nested_dropout, nested_dropout_keep, nested_dropout_probs


def test_probs_spec_vectors():
    np.testing.assert_allclose(nested_dropout_probs(4, 2.0), [0.613038, 0.289579, 0.082966, 0.014417],
                               rtol=1e-5, atol=1e-6)
    p = nested_dropout_probs(512, 10.0)
    np.testing.assert_allclose([p[:10].sum(), p[:20].sum()], [0.854558, 0.996065], rtol=1e-5, atol=1e-6)
    j = np.arange(1, 513)
    w = np.exp(-(((j - 3.0) / 7.0) ** 2))
    np.testing.assert_allclose(nested_dropout_probs(512, 7.0, mu=3.0), w / w.sum(), rtol=1e-12)


def test_keep_is_step_keyed_and_follows_the_distribution():
    draws = [nested_dropout_keep(seed=5, step=s, dim=4, sigma=2.0) for s in range(2000)]
    assert draws[:200] == [nested_dropout_keep(5, s, 4, 2.0) for s in range(200)]  # every rank / a resumed run agrees
    assert draws[:200] != [nested_dropout_keep(6, s, 4, 2.0) for s in range(200)]
    freq = np.bincount(draws, minlength=5)[1:] / len(draws)
    p = nested_dropout_probs(4, 2.0).numpy()
    assert set(draws) <= {1, 2, 3, 4}
    np.testing.assert_array_less(np.abs(freq - p), 4 * np.sqrt(p * (1 - p) / len(draws)))


def test_mask_zeroes_trailing_features_without_rescaling():
    h = torch.arange(1.0, 13.0).reshape(2, 6).requires_grad_()
    out = nested_dropout(h, 2)
    assert out.tolist() == [[1, 2, 0, 0, 0, 0], [7, 8, 0, 0, 0, 0]]
    out.sum().backward()
    assert h.grad.tolist() == [[1, 1, 0, 0, 0, 0]] * 2
    assert torch.equal(nested_dropout(h, 6), h)
