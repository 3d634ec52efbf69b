"""Reading shards from remote storage: ranged reads with a bounded read-ahead and a size-
limited disk cache give exactly the local batches; checksums and token ids are verified
on read, naming the shard (and offset)."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from distreg.data.errors import DataError
from distreg.data.images import ImageBatches, ImageSamples
from distreg.data.tokens import TokenBatches, TokenDataset, write_token_shards
from tests.data.httpserver import serve

SEQ = 8


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("remote") / "tok")
    rng = np.random.default_rng(0)
    write_token_shards(root, [rng.integers(0, 300, n) for n in (401, 257, 330)], vocab_size=300)
    return root


def _steps(src, n: int) -> list[list[torch.Tensor]]:
    return [[torch.cat([b["index"][:, None], b["input"]], 1) for b in src.next_step()] for _ in range(n)]


def test_ranged_readahead_equals_local_and_resumes(tokens_dir):
    local = TokenBatches(TokenDataset(tokens_dir, SEQ), 16, 2, 1, 2, seed=3)
    expected = _steps(local, 12)  # 123 windows: crosses an epoch
    with serve(os.path.dirname(tokens_dir)) as base:
        ds = TokenDataset(f"{base}/tok", SEQ, max_in_flight=3)
        remote = TokenBatches(ds, 16, 2, 1, 2, seed=3, readahead_steps=2)
        got = _steps(remote, 5)
        assert len(remote._ahead) == 2  # two steps requested ahead, no more
        for *_, fetches in remote._ahead:
            [f.result() for mb in fetches for f in mb]
        # One ranged request per window: windows of the 5 returned + 2 planned steps (8 per step).
        assert ds.reader.requests == 7 * 8
        state = remote.state_dict()
        assert state["consumed"] == 5 * 16 and state["epoch"] == 0  # read-ahead is not in the position
        resumed = TokenBatches(TokenDataset(f"{base}/tok", SEQ), 16, 2, 1, 2, seed=3, readahead_steps=1)
        resumed.load_state_dict(state)
        got += _steps(resumed, 7)
    assert all(torch.equal(a, b) for sa, sb in zip(got, expected) for a, b in zip(sa, sb))


def test_disk_cache_is_bounded_and_hit(tokens_dir, tmp_path):
    cache = str(tmp_path / "cache")
    with serve(os.path.dirname(tokens_dir)) as base:
        ds = TokenDataset(f"{base}/tok", SEQ, cache_dir=cache, cache_bytes=10**9)
        windows = [ds.window(i).tolist() for i in range(len(ds))]
        first = ds.reader.requests
        assert windows == [ds.window(i).tolist() for i in range(len(ds))] and ds.reader.requests == first
        small = TokenDataset(f"{base}/tok", SEQ, cache_dir=str(tmp_path / "small"), cache_bytes=10 * (SEQ + 1) * 2)
        for i in range(len(small)):
            small.window(i)
        sizes = [os.path.getsize(os.path.join(tmp_path, "small", f)) for f in os.listdir(tmp_path / "small")]
        assert len(sizes) == 10 and sum(sizes) <= 10 * (SEQ + 1) * 2  # least recently used evicted
    local = TokenDataset(tokens_dir, SEQ)
    assert windows == [local.window(i).tolist() for i in range(len(local))]


def _rewrite(root: str, shard: int, tokens: np.ndarray, fix_checksum: bool) -> str:
    """Overwrite a shard with `tokens` (same size); optionally record its new sha256."""
    index = json.load(open(f"{root}/index.json"))
    entry = index["shards"][shard]
    data = tokens.astype("<u2").tobytes()
    assert len(data) == os.path.getsize(f"{root}/{entry['file']}")
    open(f"{root}/{entry['file']}", "wb").write(data)
    if fix_checksum:
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        json.dump(index, open(f"{root}/index.json", "w"))
    return entry["file"]


def test_size_preserving_corruption_names_the_shard(tokens_dir, tmp_path):
    import shutil

    root = str(tmp_path / "tok")
    shutil.copytree(tokens_dir, root)
    toks = np.fromfile(f"{root}/shard_00001.bin", dtype="<u2").copy()
    toks[100] ^= 1  # one flipped bit; still a valid token id
    name = _rewrite(root, 1, toks, fix_checksum=False)
    ds = TokenDataset(root, SEQ)  # opening reads no shard
    ds.window(0)  # shard 0 is fine
    with pytest.raises(DataError, match=rf"shard .*{name}: sha256 does not match index.json"):
        ds.window(60)  # in shard 1 (windows 50-81)


@pytest.mark.parametrize("where", ["local", "remote"])
def test_out_of_range_token_ids_name_shard_and_offset(tokens_dir, tmp_path, where):
    import shutil

    root = str(tmp_path / "tok")
    shutil.copytree(tokens_dir, root)
    toks = np.fromfile(f"{root}/shard_00002.bin", dtype="<u2").copy()
    toks[77] = 301  # >= vocab_size 300 (and the index's checksum agrees: a bad tokenizer, not a bad disk)
    name = _rewrite(root, 2, toks, fix_checksum=True)
    first_of_shard2 = (401 - 1) // SEQ + (257 - 1) // SEQ
    if where == "local":
        ds = TokenDataset(root, SEQ)
        with pytest.raises(DataError, match=rf"shard .*{name}: token id 301 at token offset 77 is >= vocab_size 300"):
            ds.window(first_of_shard2 + 30)  # the whole shard is checked on its first read
        return
    with serve(str(tmp_path)) as base:
        ds = TokenDataset(f"{base}/tok", SEQ)
        ds.window(first_of_shard2 + 30)  # a remote window without the bad id reads fine
        with pytest.raises(DataError, match=rf"shard .*{name}: token id 301 at token offset 77 is"):
            ds.window(first_of_shard2 + 77 // SEQ)


def test_image_readahead_over_http_equals_local(imagenet_shards):
    def run(url: str, **kw) -> list[torch.Tensor]:
        src = ImageBatches(ImageSamples(url, 16, max_in_flight=4), 8, 2, 0, 2, seed=1, **kw)
        return [torch.cat([b["index"].float()[:, None], b["input"].flatten(1)], 1) for _ in range(4)
                for b in src.next_step()]

    expected = run(os.path.join(imagenet_shards, "train"))
    with serve(imagenet_shards) as base:
        got = run(f"{base}/train", readahead_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (data.decode_device: cuda)")
def test_cuda_decode_matches_cpu_decode(imagenet_shards):
    split = os.path.join(imagenet_shards, "val")
    cpu = ImageBatches(ImageSamples(split, 16, train=False), 8, 1, 0, 1, seed=0).next_step()[0]
    gpu = ImageBatches(ImageSamples(split, 16, train=False, decode_device="cuda"), 8, 1, 0, 1, seed=0).next_step()[0]
    assert gpu["input"].is_cuda and torch.equal(cpu["index"], gpu["index"])
    # nvjpeg and libjpeg differ by IDCT rounding: a few levels of 255 at most, after resize
    assert (gpu["input"].cpu() - cpu["input"]).abs().max() < 0.2


def test_cuda_decode_falls_back_to_cpu_without_a_gpu(imagenet_shards, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    samples = ImageSamples(os.path.join(imagenet_shards, "val"), 16, train=False, decode_device="cuda")
    assert samples.decode_device == "cpu"


def test_mixture_sources_in_two_buckets_equal_local(s3, tmp_path):
    """Each source in its own bucket of the S3 server: the same batches as from local disk."""
    import s3fs

    from distreg.config import load_config
    from distreg.data import build_data, check_data
    from tests.data.objectstore import env_set

    local = {}
    for k, name in enumerate(("web", "code")):
        local[name] = str(tmp_path / name)
        write_token_shards(local[name], [100 * k + np.arange(200 + 60 * k) % 100], vocab_size=300)
        s3.fs.mkdir(f"mix-{name}")
        s3.fs.put(local[name] + "/", f"mix-{name}/tok", recursive=True)

    def batches(paths: dict, cache: str | None) -> list[torch.Tensor]:
        sources = [{"name": n, "path": p, "weight": w} for (n, p), w in zip(paths.items(), (0.75, 0.25))]
        cfg = load_config(None, ["data.kind=mixture", f"data.sources={sources}", f"data.seq_len={SEQ}",
                                 "train.global_batch_size=8", "train.grad_accum_steps=2", "scaling.num_workers=2",
                                 f"data.remote.cache_dir={cache}", "data.remote.cache_bytes=100000"])
        check_data(cfg)
        src = build_data(cfg, 1, 2)
        return [torch.cat([b["index"][:, None], b["input"]], 1) for _ in range(6) for b in src.next_step()]

    expected = batches(local, None)
    with env_set(s3.env):
        try:
            got = batches({n: f"s3://mix-{n}/tok" for n in local}, str(tmp_path / "cache"))
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == 12
    assert sorted(os.listdir(tmp_path / "cache" / "rank1")) == ["code", "web"]  # per rank, per source
