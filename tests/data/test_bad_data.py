"""Bad data: every case is an error naming the shard and member/offset, or, with
data.skip_corrupt, skipped, counted and reported in metrics(). Nothing silently dropped."""
from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest

from distreg.data.errors import DataError
from distreg.data.images import ImageBatches, ImageSamples
from distreg.data.tarshards import ShardIndex
from distreg.data.tokens import TokenBatches, TokenDataset, write_token_shards

BLOCK = tarfile.BLOCKSIZE


def _sample_bytes(split: str, index: int) -> tuple[str, int, int]:
    """(shard path, start, end) of a sample."""
    idx = ShardIndex(split)
    j, start, end = idx.locate(index)
    return idx.shards[j], start, end


def _overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _whole_epoch(split: str, skip: bool, workers: int = 0) -> tuple[ImageBatches, list[int]]:
    # verify=False: these tests reach the parser and decoder (with it, the per-sample
    # crc32 names the damaged sample first: test_size_preserving_image_corruption)
    src = ImageBatches(ImageSamples(split, 16, skip_corrupt=skip, verify=False), 8, 1, 0, 1, seed=0,
                       num_workers=workers)
    seen = [i for _ in range(6) for i in src.next_step()[0]["index"].tolist()]
    return src, seen


def test_corrupt_tar_member_header(shard_copy):
    split = os.path.join(shard_copy, "train")
    shard, start, _ = _sample_bytes(split, 13)
    jpg_header = start + 2 * BLOCK  # <key>.cls header + its one data block, then <key>.jpg's header
    _overwrite(shard, jpg_header + 100, b"\xff" * 8)  # inside the header: its checksum no longer matches
    with pytest.raises(DataError, match=rf"shard .*shard-000001\.tar: member at byte offset {jpg_header}: "
                                        r"corrupt tar header \(bad checksum\)"):
        _whole_epoch(split, skip=False)
    src, seen = _whole_epoch(split, skip=True)
    assert sorted(seen) == [i for i in range(48) if i != 13]
    assert src.metrics()["data/skipped_samples"] == 1
    assert "shard-000001.tar" in src.skipped_local[0] and f"byte offset {jpg_header}" in src.skipped_local[0]


def test_undecodable_jpeg(shard_copy):
    split = os.path.join(shard_copy, "train")
    shard, start, end = _sample_bytes(split, 30)
    key = ShardIndex(split).read(30)["__key__"]
    jpg_data = start + 3 * BLOCK  # the .jpg member's data; its tar header stays valid
    _overwrite(shard, jpg_data, b"this is not a jpeg" * 20)
    # The error travels from the decode worker process, type and message intact.
    with pytest.raises(DataError, match=rf"shard .*shard-000003\.tar: member '{key}\.jpg' .*undecodable image"):
        _whole_epoch(split, skip=False, workers=1)
    src, seen = _whole_epoch(split, skip=True, workers=1)
    src.close()
    assert 30 not in seen and len(seen) == 47
    assert src.metrics()["data/skipped_samples"] == 1 and src.state_dict()["skipped"] == 1


def test_truncated_tar_shard(shard_copy):
    split = os.path.join(shard_copy, "train")
    shard, start, _ = _sample_bytes(split, 47)  # the last sample of the last shard
    with open(shard, "r+b") as f:
        f.truncate(start + 700)
    with pytest.raises(DataError, match=rf"shard .*shard-000004\.tar: sample 47 at byte offset {start}: read \d+ of "):
        _whole_epoch(split, skip=False)
    src, seen = _whole_epoch(split, skip=True)
    assert len(seen) == 47 and src.metrics()["data/skipped_samples"] == 1


def test_truncated_token_shard(tmp_path):
    url = str(tmp_path / "tok")
    write_token_shards(url, [np.arange(41), np.arange(41), np.arange(41)], vocab_size=64)
    shard = tmp_path / "tok" / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:50])  # 25 of 41 uint16 tokens
    with pytest.raises(DataError, match=r"shard .*shard_00001\.bin: .*41 tokens .*truncated at byte offset 50, token 25"):
        TokenDataset(url, seq_len=8)
    ds = TokenDataset(url, seq_len=8, skip_corrupt=True)
    assert len(ds) == 10  # shards 0 and 2, 5 windows each
    batches = TokenBatches(ds, 2, 1, 0, 1, seed=0)
    assert batches.metrics()["data/skipped_shards"] == 1
    assert "shard_00001.bin" in ds.skipped[0]


def test_size_preserving_image_corruption_names_shard_and_offset(shard_copy):
    split = os.path.join(shard_copy, "train")
    shard, start, end = _sample_bytes(split, 21)
    _overwrite(shard, end - BLOCK - 64, b"\x00\x01")  # inside the JPEG's bytes: still decodable or not, same size
    with pytest.raises(DataError, match=rf"shard .*shard-000002\.tar: sample 21 at byte offset {start}: "
                                        r"crc32 does not match crc32.npy"):
        _whole_epoch_verified(split)


def _whole_epoch_verified(split: str) -> None:
    src = ImageBatches(ImageSamples(split, 16), 8, 1, 0, 1, seed=0)
    for _ in range(6):
        src.next_step()
