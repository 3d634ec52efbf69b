"""Held-out (evaluation) data: a sequential, exact sharding of a token dataset, a set
of token datasets (a mixture's domains) or an ImageNet split over the ranks.

Unlike the training sources nothing is shuffled or dropped: the held-out set is
samples 0..N-1 (windows of a token dataset in file order, images of a split in
manifest order, optionally the first `max_samples`), rank r takes the contiguous block
[r*ceil(N/W), (r+1)*ceil(N/W)) and every rank runs the same number of forwards of
`batch_size` samples. Where a rank's block is shorter (N not divisible by W, or the
last batch), the batch is filled with padding rows whose targets are IGNORE_INDEX:
they carry zero weight in every sum, so each sample is counted exactly once whatever
the world size. The equal number of forwards matters: sharded models (FSDP2, ZeRO-3)
and expert parallelism run collectives inside the forward.

Every batch also carries `source` (the domain of each row, -1 for padding) and
`index` (the sample's position in the held-out set, -1 for padding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from distreg.config import RunConfig
from distreg.data.errors import DataError
from distreg.runtime.loss import IGNORE_INDEX


@dataclass
class HeldOut:
    """The held-out set of one rank: `batches()` yields this rank's padded batches."""

    sources: list[str]  # domain names (one, "all", unless a mixture)
    sizes: list[int]  # samples per source
    unit: str  # "tok" or "img"
    rank: int
    world_size: int
    batch_size: int
    _fetch: object  # (list of global sample numbers) -> {"input", "target"} rows

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    def rank_range(self, rank: int | None = None) -> tuple[int, int]:
        """[lo, hi) of the global sample numbers this rank evaluates."""
        r = self.rank if rank is None else rank
        share = math.ceil(self.num_samples / self.world_size)
        return min(r * share, self.num_samples), min((r + 1) * share, self.num_samples)

    @property
    def num_batches(self) -> int:
        """Forwards per rank: the same on every rank."""
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def source_of(self, numbers: torch.Tensor) -> torch.Tensor:
        bounds = torch.tensor([0, *torch.tensor(self.sizes).cumsum(0).tolist()])
        return torch.searchsorted(bounds, numbers, right=True) - 1

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        lo, hi = self.rank_range()
        for b in range(self.num_batches):
            start = lo + b * self.batch_size
            numbers = torch.arange(start, max(start, min(start + self.batch_size, hi)), dtype=torch.long)
            pad = self.batch_size - len(numbers)
            # Padding rows repeat a real sample's input (any valid input keeps the model's
            # arithmetic ordinary) with every target ignored.
            rows = self._fetch(torch.cat([numbers, torch.zeros(pad, dtype=torch.long)]))
            if pad:
                rows["target"][len(numbers):] = IGNORE_INDEX
            rows["source"] = torch.cat([self.source_of(numbers), torch.full((pad,), -1, dtype=torch.long)])
            rows["index"] = torch.cat([numbers, torch.full((pad,), -1, dtype=torch.long)])
            yield rows


def _token_fetch(datasets, sizes):
    """Global sample number -> (dataset, window) over the concatenated sources."""
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])

    def fetch(numbers: torch.Tensor) -> dict[str, torch.Tensor]:
        which = torch.searchsorted(offsets, numbers, right=True) - 1
        windows = [torch.from_numpy(datasets[int(d)].window(int(n - offsets[d])).astype("int64"))
                   for n, d in zip(numbers.tolist(), which.tolist())]
        w = torch.stack(windows)
        return {"input": w[:, :-1].contiguous(), "target": w[:, 1:].contiguous()}

    return fetch


def _image_fetch(samples):
    def fetch(numbers: torch.Tensor) -> dict[str, torch.Tensor]:
        images, labels = zip(*(samples.load(0, int(n)) for n in numbers.tolist()))
        return {"input": torch.stack(images), "target": torch.tensor(labels, dtype=torch.long)}

    return fetch


def build_heldout(cfg: RunConfig, rank: int, world_size: int) -> HeldOut:
    """The `eval:` held-out set of `cfg` for one rank (DataError names a bad path)."""
    e = cfg.eval
    if not e.enabled:
        raise DataError("eval: no held-out data configured (set eval.path, or eval.sources for a mixture)")
    kind = e.kind or cfg.data.kind
    limit = e.max_samples
    if kind == "imagenet":
        from distreg.data.images import ImageSamples

        samples = ImageSamples(e.path, cfg.data.image_size, train=False, seed=0, skip_corrupt=False)
        n = min(len(samples), limit or len(samples))
        return HeldOut(["all"], [n], "img", rank, world_size, e.batch_size, _image_fetch(samples))
    from distreg.data.tokens import TokenDataset

    named = [(s.name, s.path) for s in e.sources] if kind == "mixture" else [("all", e.path)]
    datasets = [TokenDataset(path, cfg.data.seq_len) for _, path in named]
    vocab = {d.vocab_size for d in datasets}
    if len(vocab) > 1:
        raise DataError(f"eval.sources: the held-out datasets have different vocabularies ({sorted(vocab)})")
    sizes = [min(len(d), limit or len(d)) for d in datasets]
    return HeldOut([name for name, _ in named], sizes, "tok", rank, world_size, e.batch_size,
                   _token_fetch(datasets, sizes))
