"""Data sources. Each kind yields, per optimizer step, this rank's micro-batches
(`{"input", "target", "index"}` tensors; `index` = each sample's stable global index)
and keeps a world-size-independent position for exact resume.

The contract every source implements (see `tokens.TokenBatches`):
  unit: str                         what throughput counts ("tok" or "img")
  next_step() -> list[dict]         grad_accum_steps micro-batches of this rank
  metrics() -> dict[str, float]     data metrics for MLflow (epoch, skipped records...)
  state_dict() / load_state_dict()  the data position
  num_samples: int                  size of the global index space (per-sample stores)
  epoch: int                        current epoch, where the source has one

Kinds (`data.kind`):
  tokens    `tokens.TokenBatches` over one token dataset
  mixture   `mixture.MixtureBatches`: weighted token datasets (`data.sources`)
  imagenet  `images.ImageBatches`: webdataset tar shards with a manifest
            (`distreg data imagenet-to-shards`), decoded and augmented per sample
"""
from __future__ import annotations

from distreg.config import RunConfig


def _token_datasets(cfg: RunConfig):
    from distreg.data.tokens import TokenDataset

    d = cfg.data
    if d.kind == "tokens":
        return [TokenDataset(d.path, d.seq_len, d.skip_corrupt)]
    return [TokenDataset(s.path, d.seq_len, d.skip_corrupt) for s in d.sources]


def _image_samples(cfg: RunConfig):
    from distreg.data.errors import DataError
    from distreg.data.images import ImageSamples

    d = cfg.data
    samples = ImageSamples(d.path, d.image_size, d.transform == "train", cfg.train.seed, d.skip_corrupt)
    if cfg.model.kind == "torchvision" and cfg.model.num_classes < samples.index.num_classes:
        raise DataError(f"model.num_classes={cfg.model.num_classes} but {d.path} has "
                        f"{samples.index.num_classes} classes")
    return samples


def build_data(cfg: RunConfig, rank: int, world_size: int, comm=None):
    """The data source of `cfg` for one rank. `comm` (optional) lets a source sum its
    counters over ranks (image sources: samples skipped by data.skip_corrupt)."""
    d, t = cfg.data, cfg.train
    if d.kind == "imagenet":
        from distreg.data.images import ImageBatches

        return ImageBatches(_image_samples(cfg), t.global_batch_size, t.grad_accum_steps, rank, world_size, t.seed,
                            d.shuffle, d.num_workers, d.prefetch, comm)
    if d.kind == "mixture":
        from distreg.data.mixture import MixtureBatches

        return MixtureBatches(_token_datasets(cfg), [s.name for s in d.sources], [s.weight for s in d.sources],
                              t.global_batch_size, t.grad_accum_steps, rank, world_size, t.seed, d.shuffle)
    from distreg.data.tokens import TokenBatches

    return TokenBatches(_token_datasets(cfg)[0], t.global_batch_size, t.grad_accum_steps, rank, world_size,
                        t.seed, d.shuffle)


def check_data(cfg: RunConfig) -> None:
    """Open the data in the driver, so a missing or broken path is reported before any
    worker starts (raises DataError naming it)."""
    if cfg.data.kind == "imagenet":
        _image_samples(cfg)
    else:
        _token_datasets(cfg)
