"""ShardedSampleStore (spec regularizers.md P4) and ELR / PS-KD math (§3, §4): spec vectors,
store semantics, and two-epoch rank invariance over thread ranks."""
from __future__ import annotations

import math

import pytest
import torch

from distreg.reweighting import (
    ELR_PRESETS,
    ShardedSampleStore,
    elr_loss,
    elr_step,
    pskd_alpha,
    pskd_loss,
    pskd_step,
    pskd_targets,
)
from tests.reweighting.scenarios import assert_epochs_match, assert_store_ok, close, run_epochs, store_checks
from tests.reweighting.threadcomm import run_threads


# ----------------------------------------------------------------------------- store
def test_store_single_process_basics():
    st = ShardedSampleStore(6, 2, fill=-1.0)
    assert st.local_range == (0, 6) and st.table.shape == (6, 2)
    close(st.read(torch.tensor([5, 0])), [[-1, -1], [-1, -1]])
    st.write(torch.tensor([1, 4, 1]), torch.tensor([[1.0, 1.0], [4.0, 4.0], [9.0, 9.0]]))  # last dup wins
    close(st.read(torch.tensor([1, 4, 1])), [[9, 9], [4, 4], [9, 9]])
    assert st.read(torch.zeros(0, dtype=torch.long)).shape == (0, 2)
    st.write(torch.tensor([2]), torch.tensor([[7.0, 7.0]]), valid_mask=torch.tensor([False]))
    close(st.read(torch.tensor([2])), [[-1, -1]])
    with pytest.raises(IndexError):
        st.read(torch.tensor([6]))
    with pytest.raises(IndexError):
        st.write(torch.tensor([-1]), torch.zeros(1, 2))
    with pytest.raises(ValueError):
        st.write(torch.tensor([0, 1]), torch.zeros(2, 3))
    sd = st.state_dict()
    other = ShardedSampleStore(6, 2)
    other.load_state_dict(sd)
    assert torch.equal(other.table, st.table)
    sd["table"][0, 0] = 123.0  # the state dict is a copy
    assert st.table[0, 0] != 123.0
    with pytest.raises(ValueError):
        ShardedSampleStore(7, 2).load_state_dict(st.state_dict())
    with pytest.raises(ValueError):  # a shard that does not cover this rank's rows
        other.load_state_dict({**st.state_dict(), "start": 0, "stop": 3, "table": st.table[:3]})


@pytest.mark.parametrize("world", [2, 3, 4])
def test_store_any_rank_threads(world):
    """Writes into other ranks' rows, rank-specific (empty, duplicate) reads, duplicate rule,
    masked writes, state_dict round trip and re-shard to 1 rank, bf16 storage."""
    assert_store_ok(run_threads(store_checks, world))


def test_store_sharding_layout_and_reshard():
    """N=5 over 4 ranks: ceil(5/4)=2 rows each, the last rank owns nothing; a 4-rank
    checkpoint restores into 3 ranks."""

    def fill(comm):
        st = ShardedSampleStore(5, 1, comm)
        st.write(torch.arange(5) if comm.rank == 3 else torch.zeros(0, dtype=torch.long),
                 torch.arange(5.0).view(-1, 1) if comm.rank == 3 else torch.zeros(0, 1))
        return st.local_range, st.state_dict()

    res = run_threads(fill, 4)
    assert [r[0] for r in res] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    sds = [r[1] for r in res]

    def restore(comm):
        st = ShardedSampleStore(5, 1, comm)
        st.load_state_dict(sds)
        return st.read(torch.arange(5)).view(-1)

    for out in run_threads(restore, 3):
        close(out, [0, 1, 2, 3, 4], rtol=0, atol=0)


def test_store_out_of_range_raises_on_every_rank():
    def body(comm):
        st = ShardedSampleStore(4, 1, comm)
        try:
            st.read(torch.tensor([9]) if comm.rank == 1 else torch.tensor([0]))
        except IndexError:
            return "raised"
        return "no error"

    assert run_threads(body, 2) == ["raised", "raised"]


# ------------------------------------------------------------------------ ELR / PS-KD
def test_elr_spec_vectors():
    z, y = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0])
    loss, t1, parts = elr_loss(z, y, torch.zeros(1, 3), beta=0.7, lam=3.0)
    close(t1, [[0.199572, 0.073419, 0.027009]])
    assert abs(parts["reg"].item() / 3 - (-0.166247)) < 1e-6
    assert abs(parts["ce"].item() - 0.407606) < 1e-6 and abs(loss.item() - (-0.091135)) < 1e-6
    loss, t2, parts = elr_loss(z, y, torch.tensor([[0.5, 0.3, 0.2]]), beta=0.7, lam=3.0)
    close(t2, [[0.549572, 0.283419, 0.167009]])
    assert abs(parts["reg"].item() / 3 - (-0.597827)) < 1e-6 and abs(loss.item() - (-1.385875)) < 1e-6
    _, t3, parts = elr_loss(torch.tensor([[0.0, 3.0, 0.0]]), y, t2, beta=0.7, lam=3.0)
    close(t3, [[0.398284, 0.471226, 0.130490]])
    assert abs(parts["reg"].item() / 3 - (-0.602385)) < 1e-6
    assert ELR_PRESETS["cifar100"] == {"beta": 0.9, "lam": 7.0}


def test_elr_hand_formula_and_gradient():
    """R by hand for one sample: p = clamp(softmax), t = (1-β)p̂, R = log(1 - <t,p>);
    the gradient flows through p only (t constant)."""
    z = torch.tensor([[0.3, -1.2, 2.0]], requires_grad=True)
    loss, t, parts = elr_loss(z, torch.tensor([2]), torch.zeros(1, 3), beta=0.9, lam=7.0)
    e = [math.exp(v) for v in (0.3, -1.2, 2.0)]
    p = [v / sum(e) for v in e]
    tt = [0.1 * v for v in p]  # clamp inactive here, p̂ = p
    reg = 7.0 * math.log(1 - sum(a * b for a, b in zip(tt, p)))
    ce = -math.log(p[2])
    assert abs(parts["reg"].item() - reg) < 1e-6 and abs(loss.item() - (ce + reg)) < 1e-6
    loss.backward()
    zz = z.detach().clone().requires_grad_()
    pp = torch.softmax(zz, -1)
    ref = torch.nn.functional.cross_entropy(zz, torch.tensor([2])) + 7.0 * torch.log(1 - (t * pp).sum())
    ref.backward()
    close(z.grad, zz.grad)


def test_pskd_spec_vectors():
    assert abs(pskd_alpha(0, 300) - 0.0026667) < 1e-7
    assert abs(pskd_alpha(149, 300) - 0.4) < 1e-12 and abs(pskd_alpha(299, 300) - 0.8) < 1e-12
    tgt = pskd_targets(torch.tensor([1]), torch.tensor([[0.2, 0.5, 0.3]]), 0.4)
    close(tgt, [[0.08, 0.80, 0.12]])
    assert abs(pskd_loss(torch.tensor([[1.0, 2.0, 0.0]]), tgt).item() - 0.727606) < 1e-6
    close(pskd_targets(torch.tensor([2, 0]), None, 0.4, 3), [[0, 0, 1], [1, 0, 0]])
    # the row written back is softmax of this step's logits; epoch 0 targets are one-hot
    st = ShardedSampleStore(3, 3)
    loss, tgt0 = pskd_step(st, torch.tensor([2]), torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([1]), 0, 300)
    close(tgt0, [[0, 1, 0]])
    close(st.read(torch.tensor([2])), [[0.244728, 0.665241, 0.090031]])


def test_elr_step_writes_targets():
    st = ShardedSampleStore(4, 3)
    z = torch.tensor([[2.0, 1.0, 0.0]])
    elr_step(st, torch.tensor([3]), z, torch.tensor([0]), beta=0.7, lam=3.0)
    close(st.read(torch.tensor([3, 0])), [[0.199572, 0.073419, 0.027009], [0, 0, 0]])


@pytest.mark.parametrize("world", [2, 3])
def test_elr_pskd_two_epochs_threads(world):
    """Two epochs, uneven (and empty) rank slices, a padded duplicate: rank-averaged losses
    and gradients, targets and final tables equal the 1-rank run and the numpy reference."""
    single = run_threads(run_epochs, 1)[0]
    assert_epochs_match(run_threads(run_epochs, world), single)
