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

import torch
from torch.utils.data import DataLoader

from distreg.data.position import epoch_permutation, rank_slices, step_start
from distreg.data.tarshards import ShardIndex
from distreg.data.errors import DataError
from distreg.data.transforms import apply_seeded, decode, sample_seed, train_transform, val_transform

log = logging.getLogger("distreg.data")


class ImageSamples:
    """Map-style dataset over one split: `__getitems__([(epoch, index), ...])` returns
    a collated batch {"input", "target", "index", "skipped"} (decode + transform)."""

    def __init__(self, url: str, image_size: int = 224, train: bool = True, seed: int = 0,
                 skip_corrupt: bool = False):
        self.index = ShardIndex(url)
        self.url, self.image_size, self.train, self.seed = url, image_size, train, seed
        self.skip_corrupt = skip_corrupt
        self.transform = train_transform(image_size) if train else val_transform(image_size)

    def __len__(self) -> int:
        return len(self.index)

    def load(self, epoch: int, i: int) -> tuple[torch.Tensor, int]:
        """(image [3, S, S] float, label) of sample i; DataError names shard and member."""
        sample = self.index.read(i)
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
        try:
            image = decode(sample["jpg"])
        except RuntimeError as e:
            raise DataError(f"shard {shard}: member '{key}.jpg' (sample at byte offset {start}): "
                            f"undecodable image ({str(e).splitlines()[0][:200]})") from None
        seed = sample_seed(self.seed, epoch, i) if self.train else 0
        return apply_seeded(self.transform, image, seed), label

    def __getitems__(self, items: list[tuple[int, int]]) -> dict:
        images, labels, indices, skipped = [], [], [], []
        for epoch, i in items:
            try:
                image, label = self.load(epoch, i)
            except DataError as e:
                if not self.skip_corrupt:
                    raise
                log.warning("data.skip_corrupt: skipping sample %d: %s", i, e)
                skipped.append(f"sample {i}: {e}")
                continue
            images.append(image)
            labels.append(label)
            indices.append(i)
        s = self.image_size
        return {"input": torch.stack(images) if images else torch.zeros(0, 3, s, s),
                "target": torch.tensor(labels, dtype=torch.long), "index": torch.tensor(indices, dtype=torch.long),
                "skipped": skipped}


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
                 seed: int, shuffle: bool = True, num_workers: int = 0, prefetch: int = 2, comm=None):
        if global_batch > len(samples):
            raise DataError(f"train.global_batch_size={global_batch} exceeds the {len(samples)} samples in {samples.url}")
        self.samples, self.global_batch, self.grad_accum = samples, global_batch, grad_accum
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.num_workers, self.prefetch, self.comm = num_workers, prefetch, comm
        self.epoch, self.consumed = 0, 0
        self.skipped = 0  # corrupt samples skipped so far, all ranks together
        self.skipped_local: list[str] = []  # this rank's, with shard and member
        self._it = None

    def _iterator(self):
        sampler = _RankSampler(len(self.samples), self.global_batch, self.grad_accum, self.rank, self.world_size,
                               self.seed, self.shuffle, self.epoch, self.consumed)
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
