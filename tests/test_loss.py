"""Per-sample losses and the global loss denominator (no per-rank normalisation)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distreg.runtime.comm import Comm
from distreg.runtime.loss import IGNORE_INDEX, per_sample_loss, reduction_weights, step_counts
from distreg.testing import run_distributed


def test_per_sample_loss_hand_computed():
    # Two sequences of 2 tokens over a vocabulary of 2; the second has one ignored token.
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 2.0], [3.0, 3.0]]])
    target = torch.tensor([[0, 0], [1, IGNORE_INDEX]])
    l_a = (math.log(2) + (math.log(math.e + 1) - 1)) / 2  # mean of the two token losses
    l_b = math.log(1 + math.exp(2)) - 2  # only the first token counts
    torch.testing.assert_close(per_sample_loss(logits, target), torch.tensor([l_a, l_b]))
    # Classification: one loss per sample.
    cls = per_sample_loss(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, IGNORE_INDEX]))
    torch.testing.assert_close(cls, torch.tensor([math.log(1 + math.exp(-2)), 0.0]))


def test_token_weights_hand_computed():
    target = torch.tensor([[1, 1, IGNORE_INDEX], [2, 2, 2]])
    counts = step_counts([{"target": target}], Comm())
    assert (counts.tokens, counts.samples) == (5, 2)
    torch.testing.assert_close(reduction_weights(target, "token", 5.0), torch.tensor([0.4, 0.6]))
    torch.testing.assert_close(reduction_weights(target, "sample", 2.0), torch.tensor([0.5, 0.5]))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (4, 6), generator=g)
    targets = torch.randint(0, 11, (4, 6), generator=g)
    targets[:2, 1:] = IGNORE_INDEX  # rank 0's samples have 1 valid token each, rank 1's have 6
    return [tokens, targets]


def ddp_gradient(reduction: str) -> list[torch.Tensor]:
    comm = Comm()
    model = torch.nn.parallel.DistributedDataParallel(_model())
    tokens, targets = (t[2 * comm.rank : 2 * comm.rank + 2] for t in _batches())
    counts = step_counts([{"target": targets}], comm)
    w = reduction_weights(targets, reduction, counts.denominator(reduction))
    (comm.world_size * (w * per_sample_loss(model(tokens), targets)).sum()).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_ddp_gradient_equals_single_process_with_uneven_token_counts():
    tokens, targets = _batches()
    single = _model()
    F.cross_entropy(single(tokens).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX).backward()
    token_ref = [p.grad.clone() for p in single.parameters()]
    single.zero_grad()
    per_sample_loss(single(tokens), targets).mean().backward()
    sample_ref = [p.grad.clone() for p in single.parameters()]

    token_ranks, sample_ranks = zip(*run_distributed(_both, 2))
    for got in token_ranks:
        for g, r in zip(got, token_ref):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    for got in sample_ranks:
        for g, r in zip(got, sample_ref):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    # The per-rank normalisation bug (each rank takes its own token mean, DDP averages
    # the two) weights rank 0's 2 tokens like rank 1's 12: the test data tells it apart.
    single.zero_grad()
    halves = [F.cross_entropy(single(tokens[i : i + 2]).flatten(0, 1), targets[i : i + 2].flatten(),
                              ignore_index=IGNORE_INDEX) for i in (0, 2)]
    (sum(halves) / 2).backward()
    assert not torch.allclose(single[1].weight.grad, token_ref[1], atol=1e-4)


def _both():
    return ddp_gradient("token"), ddp_gradient("sample")
