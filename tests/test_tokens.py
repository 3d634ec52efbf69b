"""Token shards: windows, rank split, world-size-independent position, bad shards."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distreg.data.tokens import DataError, TokenBatches, TokenDataset, write_token_shards


@pytest.fixture
def counting(tmp_path):
    # Shard 0 holds 0..20, shard 1 holds 100..110: windows of seq_len 4 never straddle.
    url = str(tmp_path / "count")
    write_token_shards(url, [np.arange(21), np.arange(100, 111)], vocab_size=200)
    return url


def test_windows_are_packed_per_shard(counting):
    ds = TokenDataset(counting, seq_len=4)
    assert len(ds) == 5 + 2  # (21-1)//4 + (11-1)//4
    assert ds.window(1).tolist() == [4, 5, 6, 7, 8]
    assert ds.window(5).tolist() == [100, 101, 102, 103, 104]
    batch = ds.batch(torch.tensor([6]))
    assert batch["input"].tolist() == [[104, 105, 106, 107]] and batch["target"].tolist() == [[105, 106, 107, 108]]


def test_step_batches_do_not_depend_on_world_size(counting):
    ds = TokenDataset(counting, seq_len=4)

    def samples(world: int, accum: int, steps: int) -> list[list[int]]:
        streams = [TokenBatches(ds, 4, accum, r, world, seed=3) for r in range(world)]
        out = []
        for _ in range(steps):
            step = [int(i) for s in streams for mb in s.next_step() for i in mb["index"]]
            assert len(step) == len(set(step)) == 4  # disjoint across ranks and micro-batches
            out.append(sorted(step))
        return out

    one = samples(1, 1, 5)
    assert samples(2, 1, 5) == one == samples(2, 2, 5) == samples(4, 1, 5)
    # 7 samples, 4 per step: every step starts a new epoch (the tail of 3 is dropped)
    # with its own permutation, so not all five steps see the same four samples.
    assert len({tuple(s) for s in one}) > 1


def test_position_resumes_exactly_even_on_another_world_size(counting):
    ds = TokenDataset(counting, seq_len=4)
    straight = TokenBatches(ds, 2, 1, 0, 1, seed=1)
    seen = [straight.next_step()[0]["index"].tolist() for _ in range(9)]
    first = TokenBatches(ds, 2, 1, 0, 1, seed=1)
    for _ in range(4):
        first.next_step()
    state = first.state_dict()
    resumed = [TokenBatches(ds, 2, 1, r, 2, seed=1) for r in range(2)]
    for r in resumed:
        r.load_state_dict(state)
    for step in range(4, 9):
        got = [i for r in resumed for i in r.next_step()[0]["index"].tolist()]
        assert got == seen[step]


def test_truncated_shard_is_named(counting, tmp_path):
    shard = tmp_path / "count" / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"shard .*shard_00001\.bin: index\.json says 11 tokens"):
        TokenDataset(counting, seq_len=4)


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(DataError, match=f"no token dataset at '{tmp_path}/absent'"):
        TokenDataset(str(tmp_path / "absent"), seq_len=4)


def test_fsspec_memory_filesystem():
    write_token_shards("memory://distreg-test/tokens", [np.arange(50)], vocab_size=64)
    ds = TokenDataset("memory://distreg-test/tokens", seq_len=8)
    assert ds.window(2).tolist() == list(range(16, 25))
