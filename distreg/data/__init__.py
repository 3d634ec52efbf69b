"""Data sources. Each kind yields, per optimizer step, this rank's micro-batches
(`{"input", "target", "index"}` tensors; `index` = each sample's stable global index)
and keeps a world-size-independent position for exact resume.

The contract every source implements (see `tokens.TokenBatches`):
  unit: str                         what throughput counts ("tok" or "img")
  next_step() -> list[dict]         grad_accum_steps micro-batches of this rank
  metrics() -> dict[str, float]     data metrics for MLflow (epoch, skipped records...)
  state_dict() / load_state_dict()  the data position
"""
from __future__ import annotations

from distreg.config import RunConfig


def build_data(cfg: RunConfig, rank: int, world_size: int):
    from distreg.data.tokens import TokenBatches, TokenDataset

    dataset = TokenDataset(cfg.data.path, cfg.data.seq_len)
    return TokenBatches(dataset, cfg.train.global_batch_size, cfg.train.grad_accum_steps, rank, world_size,
                        cfg.train.seed, cfg.data.shuffle)


def check_data(cfg: RunConfig) -> None:
    """Open the data in the driver, so a missing or broken path is reported before any
    worker starts (raises DataError naming it)."""
    from distreg.data.tokens import TokenDataset

    TokenDataset(cfg.data.path, cfg.data.seq_len)
