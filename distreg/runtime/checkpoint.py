"""Checkpoint layout, atomic completion and discovery.

  <checkpoint.dir>/step_00000010/
      model/            the strategy's own sharded format (DCP or DeepSpeed)
      trainer.pt        step, data position, scheduler-independent trainer state (rank 0)
      rank_00000.pt     per-rank state: RNG streams, hook state
      COMPLETE          written last, by rank 0, after a barrier

A checkpoint counts only once COMPLETE exists, so a crash mid-write leaves the previous
one usable (object stores have no atomic directory rename; a marker works everywhere).
"""
from __future__ import annotations

import io
import pickle
import posixpath
import re
import warnings

import fsspec
import torch

from distreg.runtime.comm import Comm

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"step_(\d{8})$")


def step_path(root: str, step: int) -> str:
    return posixpath.join(root.rstrip("/"), f"step_{step:08d}")


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write via a temporary name and a rename (atomic on local filesystems)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def save_torch(url: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(url, buf.getvalue())


# Checkpoints are data, not code: anyone who can write to the bucket must not be able
# to run code on every worker of the next resume. `weights_only=True` unpickles only
# tensors, containers and primitives plus the types allow-listed here (none needed so far:
# trainer, data and hook state are plain dicts of tensors and numbers).
SAFE_GLOBALS: list = []


def load_torch(url: str):
    """Load a trainer/rank state file: tensors on the CPU (state saved on `cuda:3` loads on
    any GPU layout), nothing executable. A planted pickle raises `UnpicklingError`."""
    fs, path = fsspec.core.url_to_fs(url)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(io.BytesIO(fs.cat_file(path)), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{url}: refused to load (not plain checkpoint data): {e}") from None


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        m = _STEP_DIR.search(entry.rstrip("/"))
        if m and fs.exists(posixpath.join(entry, MARKER)):
            found.append((int(m.group(1)), step_path(root, int(m.group(1)))))
    return sorted(found)


def latest_checkpoint(root: str) -> tuple[int, str] | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: str, step: int, strategy, trainer_state: dict, rank_state: dict, comm: Comm,
                    keep_last: int, keep_best=None) -> str:
    """Collective. Writes the strategy state, then trainer/rank state, then the marker."""
    path = step_path(root, step)
    strategy.save(posixpath.join(path, "model"))
    save_torch(posixpath.join(path, f"rank_{comm.rank:05d}.pt"), rank_state)
    if comm.rank == 0:
        save_torch(posixpath.join(path, "trainer.pt"), trainer_state)
    comm.barrier()
    if comm.rank == 0:
        write_bytes_atomic(posixpath.join(path, MARKER), f"{step}\n".encode())
        _prune(root, keep_last, best_checkpoint(root, keep_best) if keep_best is not None else None)
    comm.barrier()
    return path


def best_checkpoint(root: str, keep_best) -> str | None:
    """The complete checkpoint whose held-out metrics (`trainer.pt`'s "eval", written
    when an evaluation ran at its step) are best by `keep_best` (`metric`, `mode`: min
    or max; ties: the earliest). Checkpoints without that metric are not candidates."""
    scored = []
    for step, path in complete_checkpoints(root):
        try:
            value = (load_torch(posixpath.join(path, "trainer.pt")).get("eval") or {}).get(keep_best.metric)
        except (OSError, EOFError, RuntimeError):
            continue
        if value is not None and value == value:  # not NaN
            scored.append((value if keep_best.mode == "min" else -value, step, path))
    return min(scored)[2] if scored else None


def _prune(root: str, keep_last: int, keep: str | None = None) -> None:
    """Remove complete checkpoints older than the last `keep_last`, except `keep` (the
    best one, `checkpoint.keep_best`)."""
    fs, _ = fsspec.core.url_to_fs(root)
    for _, old in complete_checkpoints(root)[:-keep_last]:
        if old == keep:
            continue
        try:
            # Remove the marker first: a half-deleted checkpoint must not look complete.
            fs.rm(fsspec.core.url_to_fs(posixpath.join(old, MARKER))[1])
            fs.rm(fsspec.core.url_to_fs(old)[1], recursive=True)
        except OSError as e:  # pruning is housekeeping; never fail the run for it
            warnings.warn(f"could not remove old checkpoint {old}: {e}")


def load_checkpoint(path: str, strategy, comm: Comm) -> tuple[dict, dict]:
    """Collective. Restores the strategy state; returns (trainer_state, rank_state)."""
    strategy.load(posixpath.join(path, "model"))
    trainer_state = load_torch(posixpath.join(path, "trainer.pt"))
    saved_world = trainer_state["world_size"]
    rank_file = posixpath.join(path, f"rank_{comm.rank % saved_world:05d}.pt")
    if saved_world != comm.world_size and comm.rank == 0:
        warnings.warn(f"resuming a {saved_world}-rank checkpoint on {comm.world_size} ranks: "
                      "per-rank RNG and hook state are taken from rank (r mod saved world size)")
    return trainer_state, load_torch(rank_file)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
