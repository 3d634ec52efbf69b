"""ER / ERK densities (spec section 2 vectors), index-keyed random masks (S6), the cubic
schedule (spec section 3 vectors) and the ISS-P core (spec section 1 vectors)."""
from __future__ import annotations

import math

import pytest
import torch

from distreg.sparsity import (
    ShardScores,
    index_uniform,
    is_pruning_step,
    iss_count,
    iss_select,
    iss_shrink,
    layer_densities,
    nm_select,
    random_keep_mask,
    sparsity_at,
)
from tests.sparsity.threadcomm import run_threads

SHAPES = {"A": (64, 3, 3, 3), "B": (64, 64, 3, 3), "C": (10, 64)}
NUMEL = {k: math.prod(v) for k, v in SHAPES.items()}


def overall(d):
    return sum(d[k] * NUMEL[k] for k in d) / sum(NUMEL.values())


# --------------------------------------------------------------------------- ER / ERK


def test_erk_er_uniform_spec_vectors():
    erk = layer_densities(SHAPES, 0.1, "erk")
    assert erk["A"] == pytest.approx(0.670048, abs=1e-6) and erk["B"] == pytest.approx(0.057654, abs=1e-6)
    assert erk["C"] == 1.0 and overall(erk) == pytest.approx(0.1, rel=1e-12)
    assert erk["B"] / ((64 + 64 + 3 + 3) / NUMEL["B"]) == pytest.approx(3283.2 / 207, rel=1e-12)  # second-pass eps
    er = layer_densities(SHAPES, 0.1, "er")
    assert [er[k] for k in "ABC"] == pytest.approx([0.748515, 0.067031, 0.248015], abs=1e-6)
    assert er["A"] / ((64 + 3) / (64 * 3)) == pytest.approx(2.144997, abs=1e-6) and overall(er) == pytest.approx(0.1)
    half = layer_densities(SHAPES, 0.5, "erk")
    assert half["A"] == 1.0 and half["C"] == 1.0 and half["B"] == pytest.approx(0.467882, abs=1e-6)
    assert half["B"] / (134 / NUMEL["B"]) == pytest.approx(128.716418, abs=1e-6)
    assert layer_densities(SHAPES, 0.3, "uniform") == {"A": 0.3, "B": 0.3, "C": 0.3}


def test_erk_ties_and_guards():
    # two identical small layers share the maximum score: both become dense together
    d = layer_densities({"s1": (4, 4), "s2": (4, 4), "big": (256, 256)}, 0.2)
    assert d["s1"] == d["s2"] == 1.0
    assert d["big"] == pytest.approx((0.2 * (32 + 65536) - 32) / 65536, rel=1e-12)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError):
            layer_densities(SHAPES, bad)
    with pytest.raises(ValueError):
        layer_densities(SHAPES, 0.1, "erk_plus")


# --------------------------------------------------------------------------- indexed randomness


def _py_fmix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_index_uniform_matches_python_integer_reference():
    from distreg.sparsity.masks import _key_words

    k0, k1, k2, k3 = _key_words(17, "layer.weight")
    start = 2**32 - 3  # crosses the 32-bit boundary of the flat index
    got = index_uniform(17, "layer.weight", start, 6)
    for j, u in zip(range(start, start + 6), got.tolist()):
        h = _py_fmix32((j & 0xFFFFFFFF) ^ k0)
        h = _py_fmix32(h ^ (j >> 32) ^ k1)
        h = _py_fmix32((h + k2) & 0xFFFFFFFF) ^ k3
        assert u == h / 2**32


def test_random_erk_masks_identical_for_any_sharding():
    dens = layer_densities(SHAPES, 0.1, "erk")
    full = {k: random_keep_mask(17, k, 0, NUMEL[k], dens[k]) for k in SHAPES}
    gen = torch.Generator().manual_seed(0)
    for world in (2, 3, 4):
        for name, n in NUMEL.items():
            cuts = [0, *sorted(torch.randint(0, n + 1, (world - 1,), generator=gen).tolist()), n]
            pieces = [random_keep_mask(17, name, a, b - a, dens[name]) for a, b in zip(cuts, cuts[1:])]
            assert torch.equal(torch.cat(pieces), full[name])
    d = dens["B"]
    sigma = math.sqrt(d * (1 - d) / NUMEL["B"])
    assert abs(full["B"].float().mean().item() - d) < 4 * sigma
    assert full["C"].all()  # density 1
    # the key matters: another seed or another name gives an unrelated mask
    other = random_keep_mask(18, "B", 0, NUMEL["B"], d)
    renamed = random_keep_mask(17, "B2", 0, NUMEL["B"], d)
    for m in (other, renamed):
        overlap = (m & full["B"]).float().mean().item()
        assert abs(overlap - d * d) < 4 * math.sqrt(d * d * (1 - d * d) / NUMEL["B"])


def test_index_uniform_looks_uniform():
    u = index_uniform(0, "w", 0, 1 << 16)
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u.float(), bins=16, min=0, max=1)
    expected = (1 << 16) / 16
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 50  # 15 dof: p ~ 1e-5
    lag = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].abs().item()
    assert lag < 0.02


# --------------------------------------------------------------------------- cubic schedule


def test_cubic_schedule_spec_vectors():
    got = [sparsity_at(t, 0, 400, 100, 0.0, 0.8) for t in (0, 100, 200, 300, 400, 500)]
    assert got == pytest.approx([0.0, 0.4625, 0.7, 0.7875, 0.8, 0.8], abs=1e-12)
    assert sparsity_at(5, 0, 10, 1, 0.0, 0.9) == pytest.approx(0.7875, abs=1e-12)
    assert sparsity_at(150, 0, 400, 100, 0.0, 0.8) == pytest.approx(0.4625)  # held between points
    assert sparsity_at(-5, 0, 400, 100, 0.1, 0.8) == 0.1
    assert sparsity_at(1000, 1000, 1200, 50, 0.2, 0.6) == pytest.approx(0.2)
    assert [t for t in range(0, 500) if is_pruning_step(t, 0, 250, 100)] == [0, 100, 200, 250]
    assert sparsity_at(250, 0, 250, 100, 0.0, 0.8) == 0.8
    with pytest.raises(ValueError):
        sparsity_at(0, 0, 10, 0, 0.0, 0.5)


# --------------------------------------------------------------------------- ISS-P

W1 = torch.tensor([0.5, -0.1, 0.02, -0.8, 0.3, 0.05, -0.2, 0.9, 0.01, -0.4])
SHRUNK1 = [0.5, -0.095, 0.019, -0.8, 0.3, 0.0475, -0.19, 0.9, 0.0095, -0.4]


def test_iss_vector_one_layer_and_second_shrink():
    keep = iss_select([ShardScores(W1)], [0.5])[0]
    assert (~keep).nonzero().view(-1).tolist() == [1, 2, 5, 6, 8]
    w = iss_shrink(W1, keep, 0.95)
    assert w.tolist() == pytest.approx(SHRUNK1, rel=1e-6)
    keep2 = iss_select([ShardScores(w)], [0.5])[0]
    assert torch.equal(keep2, keep)
    assert iss_shrink(w, keep2, 0.95).tolist() == pytest.approx(
        [x * (0.9025 if i in (1, 2, 5, 6, 8) else 1.0) for i, x in enumerate(W1.tolist())], rel=1e-6)


def _iss_sharded(comm, cuts):
    a, b = cuts[comm.rank], cuts[comm.rank + 1]
    keep = iss_select([ShardScores(W1[a:b], flat_start=a)], [0.5], comm)[0]
    return iss_shrink(W1[a:b], keep, 0.95)


@pytest.mark.parametrize("cuts", [[0, 5, 10], [0, 4, 7, 10]])
def test_iss_vector_sharded(cuts):
    res = run_threads(_iss_sharded, len(cuts) - 1, cuts)
    assert torch.cat(res).tolist() == pytest.approx(SHRUNK1, rel=1e-6)


def test_iss_count_rule():
    assert iss_count(0.07, 100, "float_ceil") == 8 and iss_count(0.07, 100) == 7
    assert [iss_count(p, 100, "float_ceil") for p in (0.14, 0.28, 0.55)] == [15, 29, 56]
    assert [iss_count(p, 100) for p in (0.14, 0.28, 0.55)] == [14, 28, 55]
    assert iss_count(1.0, 10) == 9 and iss_count(1.0, 10, "float_ceil") == 9  # floor(0.995 n) cap
    assert iss_count(0.95, 1000) == 950


def test_nm_selection_vector():
    keep = nm_select(torch.tensor([0.1, -0.5, 0.2, 0.05, 0.3, 0.4, -0.01, 0.9]), 2, 4)
    assert sorted((~keep).nonzero().view(-1).tolist()) == [0, 3, 4, 6]
    assert nm_select(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2, 4).tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="straddle"):
        nm_select(torch.ones(6), 2, 4, flat_start=2)


def test_iss_iht_phase_switch_and_finetune():
    gen = torch.Generator().manual_seed(2)
    layers = [torch.randn(40, generator=gen), torch.randn(8, 5, generator=gen)]
    ratios = [0.5, 0.95]
    for _ in range(3):  # pruning phase with alpha = 0 (IHT)
        keep = iss_select([ShardScores(w) for w in layers], ratios)
        layers = [iss_shrink(w, m, 0.0) for w, m in zip(layers, keep)]
    masks = iss_select([ShardScores(w) for w in layers], ratios)  # frozen at the end of the phase
    assert [int((~m).sum()) for m in masks] == [20, 38]
    layers = [w * m.view(w.shape) for w, m in zip(layers, masks)]
    for _ in range(2):  # fine-tune: any update, then re-mask
        layers = [(w + torch.randn(w.shape, generator=gen)) * m.view(w.shape) for w, m in zip(layers, masks)]
    assert all((w.reshape(-1)[~m] == 0).all() for w, m in zip(layers, masks))
