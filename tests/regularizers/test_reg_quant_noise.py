"""QuantNAS quantization noise core: hand-computed steps and quantizers, the noise's law
(uniform noise has the variance of real rounding error), keyed draws."""
import pytest
import torch

from distreg.regularizers.quant_noise import fake_quantize, noise_source, quant_noise, quant_step
from distreg.sparsity.masks import index_uniform_at


def test_step_size_by_hand():
    w = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    assert quant_step(w, 2).item() == pytest.approx(1.0)  # (2 - -1) / (2^2 - 1)
    assert quant_step(w, 8).item() == pytest.approx(3.0 / 255)
    rows = torch.tensor([[0.0, 3.0], [1.0, 2.0]])
    torch.testing.assert_close(quant_step(rows, 2, per_channel=True), torch.tensor([[1.0], [1.0 / 3]]))
    with pytest.raises(ValueError, match="bits"):
        quant_step(w, 0)


def test_fake_quantize_by_hand():
    # grid -1, 0, 1, 2 (Δ = 1): 0.2 -> 0, 0.9 -> 1
    w = torch.tensor([-1.0, 0.2, 0.9, 2.0])
    torch.testing.assert_close(fake_quantize(w, 2), torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    # per channel: row 0 grid 0, 1, 2, 3; row 1 grid 1, 4/3, 5/3, 2
    rows = torch.tensor([[0.0, 1.4, 3.0], [1.0, 1.5, 2.0]])
    torch.testing.assert_close(fake_quantize(rows, 2, per_channel=True),
                               torch.tensor([[0.0, 1.0, 3.0], [1.0, 5.0 / 3, 2.0]]))
    const = torch.full((3,), 0.7)  # Δ = 0: left as is
    assert torch.equal(fake_quantize(const, 4), const)


def test_uniform_noise_is_keyed_bounded_and_has_rounding_variance():
    w = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    noise = quant_noise(w, 2, seed=5, key="k")
    u = index_uniform_at(5, "k", torch.arange(4))
    torch.testing.assert_close(noise, (1.0 * (u - 0.5)).float())  # Δ = 1
    assert not torch.equal(noise, quant_noise(w, 2, seed=5, key="k2"))
    # the law: |noise| <= Δ/2 and var = Δ²/12, the variance of real rounding error
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200_000, generator=g, dtype=torch.float64)
    delta = quant_step(x, 4).item()
    n = quant_noise(x, 4, seed=1, key="law")
    assert n.abs().max().item() <= delta / 2
    assert n.var().item() == pytest.approx(delta**2 / 12, rel=0.02)
    err = fake_quantize(x, 4) - x
    assert err.var().item() == pytest.approx(delta**2 / 12, rel=0.03)
    assert n.mean().item() == pytest.approx(0.0, abs=delta * 0.01)


def test_gaussian_noise_has_the_reference_scale():
    z = noise_source(3, "g", 200_000, "gaussian")
    assert z.mean().item() == pytest.approx(0.0, abs=0.01)
    assert z.std().item() == pytest.approx(0.5, rel=0.02)  # randn / 2
    with pytest.raises(ValueError, match="noise kind"):
        noise_source(3, "g", 4, "laplace")


def test_a_slice_draws_the_same_noise_as_the_full_tensor():
    # element j depends on (seed, key, j) only: a shard holding [a, b) draws its part
    full = noise_source(7, "p", 1000, "uniform")
    part = index_uniform_at(7, "p", torch.arange(300, 700)) - 0.5
    assert torch.equal(full[300:700], part)
