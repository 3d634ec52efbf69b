"""`checkpoint.async: true`: checkpoints that do not stall the step.

Same layout and completion rule as `distreg.runtime.checkpoint` (a checkpoint counts only
once its `COMPLETE` marker exists); what changes is who waits for the write:

* ddp / fsdp2: `torch.distributed.checkpoint.async_save`. The call copies this rank's
  shards (model, optimizer, scheduler) into CPU memory - the only part the step waits
  for - and writes them from a background thread; its planning and commit collectives
  run on a dedicated gloo process group, so they never interleave with the training
  step's collectives on the default group.
* deepspeed: a staged copy. The engine saves synchronously into a rank-local staging
  directory on local disk (under `<run_dir>/.checkpoint_stage/`, each rank its own), and a
  background thread uploads that directory to `checkpoint.dir` and deletes it (for a local
  `checkpoint.dir` the step still waits for the local write: the stage is what the
  step waits for, the upload is what it does not).

Completion: a save's background thread waits for this rank's upload, then all ranks meet
in one barrier on the dedicated group (every rank's files are written), then rank 0
writes `COMPLETE` and prunes old checkpoints (`keep_last`, and the `keep_best` one by the
same `checkpoint.best_checkpoint` rule as synchronous saves, decided once this save is
complete so it is a candidate). So the marker exists only when every
rank's upload has finished. At most one save is in flight: a new save - and the end of
training (`wait()`) - first waits for the previous one, and re-raises its error, if any,
on every rank. The small per-rank and trainer files are serialised at save time (their
values are those of the step) and uploaded with the rest.
"""
from __future__ import annotations

import io
import os
import posixpath
import shutil
import tempfile
import threading

import fsspec
import torch
import torch.distributed as dist

from distreg.runtime import checkpoint as ckpt
from distreg.runtime.comm import Comm


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class AsyncCheckpointer:
    """One per Trainer; `save` returns as soon as the step may go on."""

    def __init__(self, comm: Comm, stage_root: str | None = None):
        self.comm = comm
        self.stage_root = stage_root
        self._group = None  # dedicated gloo group for the background collectives
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.in_flight: str | None = None  # path of the save being written

    def _pg(self):
        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # collective: every rank, same order
        return self._group

    # -- the two phases --------------------------------------------------------------
    def save(self, root: str, step: int, strategy, trainer_state: dict, rank_state: dict, keep_last: int,
             keep_best=None) -> str:
        """Collective. Stage this rank's state and start writing it; returns the path."""
        self.wait()
        group = self._pg()
        path = ckpt.step_path(root, step)
        small = {posixpath.join(path, f"rank_{self.comm.rank:05d}.pt"): _bytes(rank_state)}
        if self.comm.rank == 0:
            small[posixpath.join(path, "trainer.pt")] = _bytes(trainer_state)
        model_path = posixpath.join(path, "model")
        if strategy.name == "deepspeed":
            upload = self._stage_deepspeed(strategy, model_path, step)
        else:
            upload = self._stage_dcp(strategy, model_path, group)

        def finish():
            try:
                upload()
                for url, data in small.items():
                    ckpt.write_bytes_atomic(url, data)
                if group is not None:
                    dist.barrier(group=group)  # every rank's files are written
                if self.comm.rank == 0:
                    ckpt.write_bytes_atomic(posixpath.join(path, ckpt.MARKER), f"{step}\n".encode())
                    best = ckpt.best_checkpoint(root, keep_best) if keep_best is not None else None
                    ckpt._prune(root, keep_last, best)
            except BaseException as e:  # re-raised on the main thread by wait()
                self._error = e

        self.in_flight = path
        self._thread = threading.Thread(target=finish, name=f"distreg-checkpoint-{step}", daemon=True)
        self._thread.start()
        return path

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread, self.in_flight = None, None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"asynchronous checkpoint failed on rank {self.comm.rank}: {err}") from err

    # -- strategies --------------------------------------------------------------------
    @staticmethod
    def _stage_dcp(strategy, model_path: str, group):
        """DDP / FSDP2: DCP's async save (the CPU copy happens here, the write later)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from distreg.runtime.strategies.torch_native import _storage

        model_sd, optim_sd = get_state_dict(strategy.module, strategy.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": strategy.scheduler.state_dict()}
        kw = {"process_group": group} if group is not None else {"no_dist": True}
        future = dcp.async_save(state, storage_writer=_storage(model_path, True), **kw)
        return future.result

    def _stage_deepspeed(self, strategy, model_path: str, step: int):
        """ZeRO: the engine's own save into a rank-local stage, uploaded in the background."""
        base = self.stage_root or tempfile.gettempdir()
        stage = os.path.join(base, f"rank_{self.comm.rank:05d}", f"step_{step:08d}")
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage)
        strategy.save(stage)  # collective; this rank writes only its own files there

        def upload():
            fs, dest = fsspec.core.url_to_fs(model_path)
            for dirpath, _, files in os.walk(stage):
                rel = os.path.relpath(dirpath, stage)
                target = dest if rel == "." else posixpath.join(dest, *rel.split(os.sep))
                fs.makedirs(target, exist_ok=True)
                for f in files:
                    fs.put_file(os.path.join(dirpath, f), posixpath.join(target, f))
            shutil.rmtree(stage, ignore_errors=True)

        return upload
