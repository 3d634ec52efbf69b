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

import hashlib
import json
import logging
import os
import posixpath
from collections import deque
from dataclasses import dataclass

import fsspec
import numpy as np
import torch

# DataError and the format's writers live in torch-free modules; re-exported here.
from distreg.data.errors import DataError  # noqa: F401
from distreg.data.position import epoch_permutation, rank_slices, step_start
from distreg.data.remote import RangeReader, is_remote
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
    sha256: str | None = None


def missing_data_hint(url: str) -> str:
    """What to do about a missing dataset, for the place the reader runs in. Inside a
    Ray job `--working-dir` uploads the code, not `data/` (gitignored, and Ray's upload
    limit is small): data must be on storage every node reads."""
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "working_dir_files" in os.getcwd()
    if in_job and "://" not in url:
        return (f"this runs inside a Ray job: `ray job submit --working-dir` uploads the code, not the data "
                f"(data/ is gitignored), so a relative or node-local {url!r} is not there. Put the dataset on "
                f"storage every node reads (e.g. `distreg data synth-tokens s3://BUCKET/tokens`, or a shared "
                f"volume mounted at the same absolute path) and set data.path to it")
    return f"create one with `distreg data synth-tokens {url}`"


def incomplete_message(url: str, index: dict, fs, root: str, index_path: str) -> str:
    """A dataset whose manifest says incomplete: the shards still missing, checked
    against the conversion's task records (the manifest's list is from the run's start)."""
    missing = list(index.get("missing", []))
    done = set()
    try:
        for p in fs.glob(posixpath.join(root, "_parts", "task_*.json")):
            done.add(f"shard_{posixpath.basename(p)[5:10]}_*.bin")
    except (FileNotFoundError, OSError):
        pass
    still = [m for m in missing if m not in done] or missing
    shown = ", ".join(still[:10]) + (f" and {len(still) - 10} more" if len(still) > 10 else "")
    return (f"data.path: {url!r} is an incomplete dataset ({index_path} has complete=false): "
            f"{len(still)} shard group(s) missing: {shown}; re-run the conversion (`distreg data tokenize ...` "
            f"with the same arguments) to finish it")


class TokenDataset:
    """Random access to the windows of a token dataset, through fsspec.

    A shard whose size disagrees with `index.json` (truncated, missing) is an error
    naming it; with `skip_corrupt=True` it is left out instead and listed in
    `self.skipped`, which the data source reports as a metric. A dataset whose index is
    marked incomplete (a conversion still running or killed) is refused.

    Local shards are memory-mapped; on first read each is checked once (sha256 against
    the index, token ids < vocab_size, vectorised) so corrupt data is named by shard and
    offset before a token reaches the embedding. Remote shards (object stores, http) are
    read by ranges, a window at a time, through a `RangeReader` (bounded in-flight
    requests, optional disk cache); each fetched window's ids are range-checked (a
    vectorised comparison on the host, no device sync)."""

    def __init__(self, url: str, seq_len: int, skip_corrupt: bool = False, verify: bool = True,
                 max_in_flight: int = 8, cache_dir: str | None = None, cache_bytes: int = 0):
        self.url, self.seq_len, self.verify = url, seq_len, verify
        self.skipped: list[str] = []
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")
        index_path = posixpath.join(self.root, "index.json")
        try:
            index = json.loads(self.fs.cat_file(index_path))
        except FileNotFoundError:
            raise DataError(f"data.path: no token dataset at {url!r} (missing {index_path}); "
                            f"{missing_data_hint(url)}") from None
        if index.get("format") != FORMAT or index.get("dtype") not in _DTYPES:
            raise DataError(f"{index_path}: not a {FORMAT} index (format={index.get('format')!r}, dtype={index.get('dtype')!r})")
        if index.get("complete") is False:
            raise DataError(incomplete_message(url, index, self.fs, self.root, index_path))
        self.dtype = _DTYPES[index["dtype"]]
        self.vocab_size = int(index["vocab_size"])
        try:  # one listing instead of a request per shard
            sizes = {posixpath.basename(e["name"]): e["size"] for e in self.fs.ls(self.root, detail=True)}
        except (FileNotFoundError, OSError):
            sizes = {}
        self.shards: list[_Shard] = []
        first = 0
        for entry in index["shards"]:
            path = posixpath.join(self.root, entry["file"])
            expected = entry["num_tokens"] * self.dtype.itemsize
            actual = sizes.get(entry["file"])
            if actual is None and self.fs.exists(path):
                actual = self.fs.size(path)
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
            self.shards.append(_Shard(path, entry["num_tokens"], first, n, entry.get("sha256")))
            first += n
        self.num_samples = first
        if self.num_samples == 0:
            raise DataError(f"data.path: {url!r} holds no window of seq_len+1={seq_len + 1} tokens")
        self._starts = np.array([s.first_sample for s in self.shards])
        self._cache: dict[str, np.ndarray] = {}
        self.remote = is_remote(self.fs)
        self.reader = RangeReader(self.fs, max_in_flight, cache_dir, cache_bytes) if self.remote else None

    def _check_ids(self, tokens: np.ndarray, shard: _Shard, offset: int) -> None:
        """Token ids outside the vocabulary, named by shard and token offset (vectorised:
        one comparison over the array; the offset is searched only on failure)."""
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            bad = int(np.flatnonzero(tokens >= self.vocab_size)[0])
            raise DataError(f"shard {shard.path}: token id {int(tokens[bad])} at token offset {offset + bad} is "
                            f">= vocab_size {self.vocab_size} (corrupt shard or wrong tokenizer)")

    def _tokens(self, shard: _Shard) -> np.ndarray:
        """A local shard, memory-mapped and verified on first use in this process."""
        arr = self._cache.get(shard.path)
        if arr is None:
            arr = np.memmap(shard.path, dtype=self.dtype, mode="r")
            if self.verify:
                if shard.sha256 and hashlib.sha256(arr).hexdigest() != shard.sha256:
                    raise DataError(f"shard {shard.path}: sha256 does not match index.json (corrupt shard: same "
                                    f"size, different bytes)")
                self._check_ids(arr, shard, 0)
            self._cache[shard.path] = arr
        return arr

    def __len__(self) -> int:
        return self.num_samples

    def _locate(self, index: int) -> tuple[_Shard, int]:
        s = self.shards[int(np.searchsorted(self._starts, index, side="right")) - 1]
        return s, (index - s.first_sample) * self.seq_len

    def prefetch(self, indices) -> list | None:
        """Start fetching the windows of `indices` (remote shards); pass the result to
        `batch`. None for local shards (memory-mapped: nothing to fetch)."""
        if not self.remote:
            return None
        out = []
        for i in indices:
            s, start = self._locate(int(i))
            size = self.dtype.itemsize
            out.append(self.reader.submit(s.path, start * size, (start + self.seq_len + 1) * size))
        return out

    def window(self, index: int, fetched=None) -> np.ndarray:
        s, start = self._locate(index)
        if not self.remote:
            return self._tokens(s)[start : start + self.seq_len + 1]
        size = self.dtype.itemsize
        data = fetched.result() if fetched is not None else self.reader.read(
            s.path, start * size, (start + self.seq_len + 1) * size)
        arr = np.frombuffer(data, dtype=self.dtype)
        if arr.size != self.seq_len + 1:
            raise DataError(f"shard {s.path}: window at token offset {start}: read {arr.size} of "
                            f"{self.seq_len + 1} tokens (shard truncated?)")
        self._check_ids(arr, s, start)
        return arr

    def close(self) -> None:
        """Stop the read-ahead (queued requests dropped, running ones awaited)."""
        if self.reader is not None:
            self.reader.close()

    def batch(self, indices: torch.Tensor, fetched: list | None = None) -> dict[str, torch.Tensor]:
        idx = indices.tolist()
        windows = np.stack([self.window(i, fetched[k] if fetched else None) for k, i in enumerate(idx)]).astype(np.int64)
        w = torch.from_numpy(windows)
        return {"input": w[:, :-1], "target": w[:, 1:], "index": indices.clone()}


class TokenBatches:
    """Deterministic, world-size-independent stream of a rank's micro-batches.

    `next_step()` returns this rank's `grad_accum_steps` micro-batches of the next
    optimizer step. The global batch of step s is entries [s*G, (s+1)*G) of the epoch's
    permutation (G = global batch size); micro-batch m of rank r takes the slice
    [m*W*b + r*b, m*W*b + (r+1)*b) of it (b = per-rank micro-batch size).

    Read-ahead (remote shards): the windows of the next `readahead_steps` steps are
    requested ahead (the order is known from the seeded permutation); the position in
    `state_dict` is the one after the last step *returned*, so read-ahead never shows in
    a checkpoint.
    """

    unit = "tok"  # what throughput counts
    full_windows = True  # packed windows: every target valid (step counts need no collective)

    def __init__(self, dataset: TokenDataset, global_batch: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True, readahead_steps: int = 2):
        if global_batch > len(dataset):
            raise DataError(f"train.global_batch_size={global_batch} exceeds the {len(dataset)} samples in {dataset.url}")
        self.ds, self.global_batch, self.grad_accum = dataset, global_batch, grad_accum
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.micro = global_batch // (grad_accum * world_size)
        self.readahead_steps = readahead_steps
        self.epoch, self.consumed = 0, 0
        self._perm_epoch, self._perm = -1, None
        self._ahead: deque = deque()  # (epoch, consumed after the step, micro-batch indices, fetches)
        self._plan = (0, 0)  # position after the last planned step

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            self._perm = epoch_permutation(len(self.ds), self.seed, epoch, self.shuffle)
            self._perm_epoch = epoch
        return self._perm

    def _plan_step(self) -> None:
        epoch, consumed = step_start(*self._plan, self.global_batch, len(self.ds))
        step_indices = self._permutation(epoch)[consumed : consumed + self.global_batch]
        consumed += self.global_batch
        mbs = rank_slices(step_indices, self.grad_accum, self.rank, self.world_size)
        self._ahead.append((epoch, consumed, mbs, [self.ds.prefetch(mb.tolist()) for mb in mbs]))
        self._plan = (epoch, consumed)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        if not self._ahead:
            self._plan = (self.epoch, self.consumed)
        while len(self._ahead) < 1 + (self.readahead_steps if self.ds.remote else 0):
            self._plan_step()
        self.epoch, self.consumed, mbs, fetches = self._ahead.popleft()
        return [self.ds.batch(mb, f) for mb, f in zip(mbs, fetches)]

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
        self._ahead.clear()

    def close(self) -> None:
        """Stop the read-ahead; the next `next_step` starts it again."""
        self._ahead.clear()
        self.ds.close()
