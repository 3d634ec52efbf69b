"""Token shards on any fsspec filesystem, packed into fixed windows, resumable.

On-disk format of a token dataset directory (local path or fsspec URL):
  index.json           {"format": "distreg-tokens/1", "dtype": "uint16"|"uint32",
                        "vocab_size": V, "shards": [{"file": ..., "num_tokens": N}, ...]}
  shard_00000.bin ...  the shard's tokens as little-endian integers of `dtype`.

Samples are windows of `seq_len + 1` consecutive tokens (input = window[:-1],
target = window[1:]); windows never straddle shards. Sample `i` has a stable global
index (its window number over the concatenated shards), which per-sample hooks key on.

The data position is world-size independent: (epoch, samples of the epoch already
consumed). Each optimizer step consumes the next `global_batch_size` entries of the
epoch's permutation, and each rank takes a fixed slice of them, so a run restarted on
a different number of ranks continues the same sample sequence.
"""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import torch

# DataError and the format's writers live in torch-free modules; re-exported here.
from distreg.data.errors import DataError  # noqa: F401
from distreg.data.token_format import (  # noqa: F401
    _DTYPES, FORMAT, dtype_for_vocab, write_index, write_shard, write_token_shards)


def synth_tokens(url: str, num_tokens: int = 200_000, vocab_size: int = 256, num_shards: int = 4, seed: int = 0) -> None:
    """A small *learnable* corpus: a sparse Markov chain in which each token is followed
    by one of 4 fixed successors (90%) or by a uniformly random token (10%). The
    entropy floor is about 1.9 nats against log(vocab) = 5.5 at the start, and a tiny
    model gets well below 5 within a hundred steps."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab_size, size=(vocab_size, 4))
    choice = rng.integers(0, 4, num_tokens)
    noise = rng.random(num_tokens) < 0.1
    rand = rng.integers(0, vocab_size, num_tokens)
    toks = np.empty(num_tokens, dtype=np.int64)
    toks[0] = rand[0]
    for i in range(1, num_tokens):
        toks[i] = rand[i] if noise[i] else successors[toks[i - 1], choice[i]]
    write_token_shards(url, np.array_split(toks, num_shards), vocab_size)


@dataclass
class _Shard:
    path: str
    num_tokens: int
    first_sample: int
    num_samples: int


class TokenDataset:
    """Random access to the windows of a token dataset, through fsspec.

    A shard whose size disagrees with `index.json` (truncated, missing) is an error
    naming it; with `skip_corrupt=True` it is left out instead and listed in
    `self.skipped`, which the data source reports as a metric."""

    def __init__(self, url: str, seq_len: int, skip_corrupt: bool = False):
        self.url, self.seq_len = url, seq_len
        self.skipped: list[str] = []
        self.fs, self.root = fsspec.core.url_to_fs(url)
        index_path = posixpath.join(self.root, "index.json")
        if not self.fs.exists(index_path):
            raise DataError(f"data.path: no token dataset at {url!r} (missing {index_path}); "
                            f"create one with `distreg data synth-tokens {url}`")
        index = json.loads(self.fs.cat_file(index_path))
        if index.get("format") != FORMAT or index.get("dtype") not in _DTYPES:
            raise DataError(f"{index_path}: not a {FORMAT} index (format={index.get('format')!r}, dtype={index.get('dtype')!r})")
        self.dtype = _DTYPES[index["dtype"]]
        self.vocab_size = int(index["vocab_size"])
        self.shards: list[_Shard] = []
        first = 0
        for entry in index["shards"]:
            path = posixpath.join(self.root, entry["file"])
            expected = entry["num_tokens"] * self.dtype.itemsize
            actual = self.fs.size(path) if self.fs.exists(path) else None
            if actual != expected:
                where = "missing" if actual is None else (f"truncated at byte offset {actual}, token {actual // self.dtype.itemsize}"
                                                          if actual < expected else "longer than indexed")
                msg = (f"shard {path}: index.json says {entry['num_tokens']} tokens ({expected} bytes) "
                       f"but the file has {actual if actual is not None else 'no'} bytes ({where})")
                if not skip_corrupt:
                    raise DataError(msg)
                logging.getLogger("distreg.data").warning("data.skip_corrupt: skipping %s", msg)
                self.skipped.append(msg)
                continue
            n = max(0, (entry["num_tokens"] - 1) // seq_len)
            self.shards.append(_Shard(path, entry["num_tokens"], first, n))
            first += n
        self.num_samples = first
        if self.num_samples == 0:
            raise DataError(f"data.path: {url!r} holds no window of seq_len+1={seq_len + 1} tokens")
        self._starts = np.array([s.first_sample for s in self.shards])
        self._cache: dict[str, np.ndarray] = {}

    def _tokens(self, shard: _Shard) -> np.ndarray:
        # Local files are memory-mapped (no copy); remote shards are fetched once.
        arr = self._cache.get(shard.path)
        if arr is None:
            if isinstance(self.fs, LocalFileSystem):
                arr = np.memmap(shard.path, dtype=self.dtype, mode="r")
            else:
                arr = np.frombuffer(self.fs.cat_file(shard.path), dtype=self.dtype)
            self._cache[shard.path] = arr
        return arr

    def __len__(self) -> int:
        return self.num_samples

    def window(self, index: int) -> np.ndarray:
        s = self.shards[int(np.searchsorted(self._starts, index, side="right")) - 1]
        start = (index - s.first_sample) * self.seq_len
        return self._tokens(s)[start : start + self.seq_len + 1]

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        windows = np.stack([self.window(i) for i in indices.tolist()]).astype(np.int64)
        w = torch.from_numpy(windows)
        return {"input": w[:, :-1], "target": w[:, 1:], "index": indices.clone()}


class TokenBatches:
    """Deterministic, world-size-independent stream of a rank's micro-batches.

    `next_step()` returns this rank's `grad_accum_steps` micro-batches of the next
    optimizer step. The global batch of step s is entries [s*G, (s+1)*G) of the epoch's
    permutation (G = global batch size); micro-batch m of rank r takes the slice
    [m*W*b + r*b, m*W*b + (r+1)*b) of it (b = per-rank micro-batch size).
    """

    unit = "tok"  # what throughput counts
    full_windows = True  # packed windows: every target valid (step counts need no collective)

    def __init__(self, dataset: TokenDataset, global_batch: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True):
        if global_batch > len(dataset):
            raise DataError(f"train.global_batch_size={global_batch} exceeds the {len(dataset)} samples in {dataset.url}")
        self.ds, self.global_batch, self.grad_accum = dataset, global_batch, grad_accum
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.micro = global_batch // (grad_accum * world_size)
        self.epoch, self.consumed = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            n = len(self.ds)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._perm = torch.randperm(n, generator=g)
            else:
                self._perm = torch.arange(n)
            self._perm_epoch = self.epoch
        return self._perm

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        # An epoch ends when fewer than a full global batch remains (the tail is dropped,
        # identically for every world size).
        if self.consumed + self.global_batch > len(self.ds):
            self.epoch, self.consumed = self.epoch + 1, 0
        step_indices = self._permutation()[self.consumed : self.consumed + self.global_batch]
        self.consumed += self.global_batch
        out = []
        for m in range(self.grad_accum):
            lo = m * self.world_size * self.micro + self.rank * self.micro
            out.append(self.ds.batch(step_indices[lo : lo + self.micro]))
        return out

    @property
    def num_samples(self) -> int:
        """Size of the global sample index space (per-sample stores key on `index`)."""
        return len(self.ds)

    def metrics(self) -> dict[str, float]:
        return {"data/epoch": float(self.epoch), "data/skipped_shards": float(len(self.ds.skipped))}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "num_samples": len(self.ds)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != len(self.ds):
            raise DataError(f"checkpoint data position is for {state['num_samples']} samples but "
                            f"{self.ds.url} has {len(self.ds)} (different data or data.seq_len)")
        self.epoch, self.consumed = state["epoch"], state["consumed"]
