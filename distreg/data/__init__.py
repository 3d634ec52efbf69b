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

Every path may be an fsspec URL; remote shards are read by ranges with a bounded
read-ahead (`remote.py`, `data.remote`). Conversions (`tokenize`, `imagenet_convert`)
run locally or as Ray tasks (`convert_run.py`) and are restartable.
"""
from __future__ import annotations

from distreg.config import RunConfig


def _rank_cache_dir(cfg: RunConfig, rank: int, name: str) -> str | None:
    """Each rank's own disk-cache folder (ranks never share cache files)."""
    import os

    base = cfg.data.remote.cache_dir
    return os.path.join(base, f"rank{rank}", name) if base else None


def _token_datasets(cfg: RunConfig, rank: int = 0):
    from distreg.data.tokens import TokenDataset

    d, r = cfg.data, cfg.data.remote
    paths = [("data", d.path)] if d.kind == "tokens" else [(s.name, s.path) for s in d.sources]
    return [TokenDataset(path, d.seq_len, d.skip_corrupt, d.verify, r.max_in_flight,
                         _rank_cache_dir(cfg, rank, name), r.cache_bytes) for name, path in paths]


def _image_samples(cfg: RunConfig):
    from distreg.data.errors import DataError
    from distreg.data.images import ImageSamples

    d = cfg.data
    samples = ImageSamples(d.path, d.image_size, d.transform == "train", cfg.train.seed, d.skip_corrupt,
                           max_in_flight=d.remote.max_in_flight, decode_device=d.decode_device, verify=d.verify)
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
                            d.shuffle, d.num_workers, d.prefetch, comm, readahead_steps=d.remote.readahead_steps)
    if d.kind == "mixture":
        from distreg.data.mixture import MixtureBatches

        return MixtureBatches(_token_datasets(cfg, rank), [s.name for s in d.sources], [s.weight for s in d.sources],
                              t.global_batch_size, t.grad_accum_steps, rank, world_size, t.seed, d.shuffle,
                              d.remote.readahead_steps)
    from distreg.data.tokens import TokenBatches

    return TokenBatches(_token_datasets(cfg, rank)[0], t.global_batch_size, t.grad_accum_steps, rank, world_size,
                        t.seed, d.shuffle, d.remote.readahead_steps)


def check_data(cfg: RunConfig) -> None:
    """Open the data in the driver, so a missing, broken or half-converted dataset is
    reported before any worker starts (raises DataError naming the path and the missing
    or damaged shards: manifests marked incomplete, shards absent or of the wrong size)."""
    if cfg.data.kind == "imagenet":
        _image_samples(cfg).index.check_files()
    else:
        _token_datasets(cfg)
