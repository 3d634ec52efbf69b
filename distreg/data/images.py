"""Image classification from webdataset tar shards: the `imagenet` data source.

`ImageBatches` follows the `TokenBatches` design: the global batch of step s is
entries [s*G, (s+1)*G) of the epoch's permutation of all samples, each rank takes a
fixed slice of it per micro-batch, and the position (epoch, consumed, seed) is world
size independent. Decoding runs in a torch DataLoader whose batch sampler yields this
rank's micro-batches from the current position; the DataLoader splits them over its
workers and returns them in order, so the number of workers never changes what a step
sees.

Why not torchdata's StatefulDataLoader state: its state is per rank and per worker
count, and a resume on another world size or worker count must continue the same
global sample sequence. Our position is three integers, and prefetched but unconsumed
batches are simply fetched again after a resume.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode

from distreg.data.position import epoch_permutation, rank_slices, step_start
from distreg.data.tarshards import ShardIndex
from distreg.data.errors import DataError
from distreg.data.transforms import apply_seeded, decode, sample_seed, train_transform, val_transform

log = logging.getLogger("distreg.data")


class ImageSamples:
    """Map-style dataset over one split: `__getitems__([(epoch, index), ...])` returns
    a collated batch {"input", "target", "index", "skipped"} (fetch + decode + transform).

    Fetching: each sample is one ranged read (`ShardIndex.read`); the samples of a batch
    are fetched concurrently, at most `max_in_flight` requests at once (a thread pool per
    process), so per-request latency of an object store is paid once per batch, not per
    image. Decoding: on the CPU per sample, or with `decode_device="cuda"` batched on the
    GPU (nvjpeg through `torchvision.io.decode_jpeg`), falling back to the CPU when no
    GPU is present; transforms then run where the pixels are (their random parameters
    come from the seeded CPU generator either way)."""

    def __init__(self, url: str, image_size: int = 224, train: bool = True, seed: int = 0,
                 skip_corrupt: bool = False, max_in_flight: int = 8, decode_device: str = "cpu",
                 verify: bool = True):
        self.index = ShardIndex(url, verify)
        self.url, self.image_size, self.train, self.seed = url, image_size, train, seed
        self.skip_corrupt = skip_corrupt
        self.transform = train_transform(image_size) if train else val_transform(image_size)
        self.max_in_flight = max_in_flight
        if decode_device == "cuda" and not torch.cuda.is_available():
            log.warning("data.decode_device=cuda but no CUDA device is visible: decoding on the CPU")
            decode_device = "cpu"
        self.decode_device = decode_device
        self.raw_only = False  # set by ImageBatches: workers fetch, the main process decodes (CUDA)
        self._pool, self._pid = None, None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None  # threads do not travel to dataloader workers
        return state

    def close(self) -> None:
        """Drop queued fetches and wait for the running ones."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def submit(self, i: int) -> Future:
        """Start fetching sample i's bytes (thread pool of `max_in_flight`, per process)."""
        if self._pool is None or self._pid != os.getpid():
            self._pool, self._pid = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="distreg-img"), os.getpid()
        return self._pool.submit(self.index.read, i)

    def _parsed(self, i: int, sample: dict) -> tuple[bytes, int]:
        """(jpg bytes, label) of fetched sample i; DataError names shard and member."""
        j, start, _ = self.index.locate(i)
        shard, key = self.index.shards[j], sample.get("__key__")
        for ext in ("jpg", "cls"):
            if ext not in sample:
                raise DataError(f"shard {shard}: sample {key!r} at byte offset {start} has no .{ext} member")
        try:
            label = int(sample["cls"])
        except ValueError:
            raise DataError(f"shard {shard}: member '{key}.cls' at byte offset {start}: not a class index "
                            f"({sample['cls'][:20]!r})") from None
        return sample["jpg"], label

    def _undecodable(self, i: int, e: Exception) -> DataError:
        j, start, _ = self.index.locate(i)
        key = self.index.read(i).get("__key__")
        return DataError(f"shard {self.index.shards[j]}: member '{key}.jpg' (sample at byte offset {start}): "
                         f"undecodable image ({str(e).splitlines()[0][:200]})")

    def load(self, epoch: int, i: int) -> tuple[torch.Tensor, int]:
        """(image [3, S, S] uint8, label) of sample i (CPU decode); DataError names shard and member.
        `transforms.normalize_on_device` turns it into the model's float input."""
        jpg, label = self._parsed(i, self.index.read(i))
        try:
            image = decode(jpg)
        except RuntimeError as e:
            raise self._undecodable(i, e) from None
        return self._transformed(image, epoch, i), label

    def _transformed(self, image: torch.Tensor, epoch: int, i: int) -> torch.Tensor:
        seed = sample_seed(self.seed, epoch, i) if self.train else 0
        return apply_seeded(self.transform, image, seed)

    def fetch_batch(self, items: list[tuple[int, int]], futures: list[Future] | None = None) -> list:
        """[(epoch, i, sample dict or the DataError of its read)], fetched concurrently."""
        futures = futures if futures is not None else [self.submit(i) for _, i in items]
        out = []
        for (epoch, i), f in zip(items, futures):
            try:
                out.append((epoch, i, f.result()))
            except DataError as e:
                out.append((epoch, i, e))
        return out

    def decode_batch(self, fetched: list) -> dict:
        """Decode, transform and collate fetched samples (see `fetch_batch`)."""
        images, labels, indices, skipped, todo = [], [], [], [], []

        def bad(i: int, e: DataError) -> None:
            if not self.skip_corrupt:
                raise e
            log.warning("data.skip_corrupt: skipping sample %d: %s", i, e)
            skipped.append(f"sample {i}: {e}")

        for epoch, i, sample in fetched:
            try:
                if isinstance(sample, DataError):
                    raise sample
                todo.append((epoch, i, *self._parsed(i, sample)))
            except DataError as e:
                bad(i, e)
        decoded = decode_on_gpu([jpg for _, _, jpg, _ in todo]) if self.decode_device == "cuda" and todo else None
        for k, (epoch, i, jpg, label) in enumerate(todo):
            try:
                try:
                    image = decoded[k] if decoded is not None else decode(jpg)
                except RuntimeError as e:
                    raise self._undecodable(i, e) from None
            except DataError as e:
                bad(i, e)
                continue
            images.append(self._transformed(image, epoch, i))
            labels.append(label)
            indices.append(i)
        s = self.image_size
        return {"input": torch.stack(images) if images else torch.zeros(0, 3, s, s, dtype=torch.uint8),
                "target": torch.tensor(labels, dtype=torch.long), "index": torch.tensor(indices, dtype=torch.long),
                "skipped": skipped}

    def __getitems__(self, items: list[tuple[int, int]]) -> dict:
        fetched = self.fetch_batch(items)
        return {"raw": fetched} if self.raw_only else self.decode_batch(fetched)


def decode_on_gpu(jpgs: list[bytes]) -> list[torch.Tensor] | None:
    """Batched nvjpeg decode (uint8 [3, H, W] RGB on the current CUDA device). None when
    the batch cannot be decoded as a whole (a non-JPEG or corrupt member): the caller
    then decodes per sample on the CPU, which names the bad one."""
    from torchvision.io import decode_jpeg

    try:
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpgs]
        return decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
    except RuntimeError:
        return None


class _RankSampler:
    """Batch sampler: this rank's micro-batches of every step from a start position,
    forever (epoch after epoch), as lists of (epoch, global index).

    Holds plain numbers, not the `ImageBatches`: a reference back would make a cycle
    (source -> loader iterator -> sampler -> source) that only the cyclic GC frees, and
    a DataLoader iterator finalised by the GC can lose its queues before telling its
    workers to stop (each then takes 5 s to be killed)."""

    def __init__(self, num_samples: int, global_batch: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, shuffle: bool, epoch: int, consumed: int):
        self.n, self.global_batch, self.grad_accum = num_samples, global_batch, grad_accum
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.consumed = epoch, consumed

    def __iter__(self):
        epoch, consumed, perm_epoch, perm = self.epoch, self.consumed, None, None
        while True:
            epoch, consumed = step_start(epoch, consumed, self.global_batch, self.n)
            if perm_epoch != epoch:
                perm, perm_epoch = epoch_permutation(self.n, self.seed, epoch, self.shuffle), epoch
            step = perm[consumed : consumed + self.global_batch]
            consumed += self.global_batch
            for mb in rank_slices(step, self.grad_accum, self.rank, self.world_size):
                yield [(epoch, int(i)) for i in mb]


def _collated(batch: dict) -> dict:
    return batch  # __getitems__ already collates


class ImageBatches:
    """Deterministic, world-size-independent stream of a rank's image micro-batches
    (see module docstring); the data-source contract of `distreg.data`."""

    unit = "img"

    def __init__(self, samples: ImageSamples, global_batch: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True, num_workers: int = 0, prefetch: int = 2, comm=None,
                 readahead_steps: int = 2):
        if global_batch > len(samples):
            raise DataError(f"train.global_batch_size={global_batch} exceeds the {len(samples)} samples in {samples.url}")
        self.samples, self.global_batch, self.grad_accum = samples, global_batch, grad_accum
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.num_workers, self.prefetch, self.comm = num_workers, prefetch, comm
        self.readahead_steps = readahead_steps
        self.epoch, self.consumed = 0, 0
        self.skipped = 0  # corrupt samples skipped so far, all ranks together
        self.skipped_local: list[str] = []  # this rank's, with shard and member
        self._it = None

    def _readahead(self, sampler):
        """Without decode workers: the bytes of the next `readahead_steps` steps are
        requested ahead (bounded by the fetch pool's `max_in_flight`); decoding happens
        here as each micro-batch is taken."""
        depth = self.readahead_steps * self.grad_accum  # 0: each micro-batch fetched when it is taken
        ahead: deque = deque()
        for items in sampler:
            ahead.append((items, [self.samples.submit(i) for _, i in items]))
            if len(ahead) > depth:
                items0, futures = ahead.popleft()
                yield self.samples.decode_batch(self.samples.fetch_batch(items0, futures))

    def _iterator(self):
        sampler = _RankSampler(len(self.samples), self.global_batch, self.grad_accum, self.rank, self.world_size,
                               self.seed, self.shuffle, self.epoch, self.consumed)
        if self.num_workers == 0:
            return self._readahead(sampler)
        # CUDA decode: workers fetch (and parse) only, this process decodes on the GPU.
        self.samples.raw_only = self.samples.decode_device == "cuda"
        # Decode workers are forked where the platform can (PyTorch's Linux default,
        # made explicit): a process that was itself spawned (torch.multiprocessing, some
        # launchers) inherits "spawn" as its default, and spawned workers re-import torch
        # and torchvision, seconds each, before their first batch.
        context = "fork" if self.num_workers and "fork" in multiprocessing.get_all_start_methods() else None
        loader = DataLoader(self.samples, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=_collated,
                            prefetch_factor=self.prefetch if self.num_workers else None,
                            multiprocessing_context=context)
        return iter(loader)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        if self._it is None:
            self._it = self._iterator()
        out, skipped = [], []
        for _ in range(self.grad_accum):
            try:
                batch = next(self._it)
            except BaseException:
                self.close()  # now: the exception's traceback would keep the workers alive
                raise
            if "raw" in batch:
                batch = self.samples.decode_batch(batch["raw"])
            skipped += batch.pop("skipped")
            out.append(batch)
        self.epoch, self.consumed = step_start(self.epoch, self.consumed, self.global_batch, len(self.samples))
        self.consumed += self.global_batch
        self.skipped_local += skipped
        if self.samples.skip_corrupt:
            # Skips happen on the rank that decodes the sample: sum them, so the metric
            # (logged by rank 0) counts the whole job. Only with skip_corrupt on.
            n = torch.tensor([float(len(skipped))], dtype=torch.float64)
            if self.comm is not None:
                self.comm.all_reduce(n)
            self.skipped += int(n.item())
        return out

    @property
    def num_samples(self) -> int:
        """Size of the global sample index space (per-sample stores key on `index`)."""
        return len(self.samples)

    def metrics(self) -> dict[str, float]:
        return {"data/epoch": float(self.epoch), "data/skipped_samples": float(self.skipped)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "num_samples": len(self.samples),
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != len(self.samples):
            raise DataError(f"checkpoint data position is for {state['num_samples']} samples but "
                            f"{self.samples.url} has {len(self.samples)} (different data)")
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        self.skipped = state.get("skipped", 0)
        self.close()

    def close(self) -> None:
        """Stop the dataloader workers (the next `next_step` starts new ones)."""
        it, self._it = self._it, None
        # What the iterator's __del__ does, but now: an iterator kept alive by a
        # traceback and finalised later by the cyclic GC can lose its queues before it
        # tells its workers to stop (each then takes 5 s to be killed).
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        elif hasattr(it, "close"):
            it.close()  # the read-ahead generator
        self.samples.close()
