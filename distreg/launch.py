"""Run a config on Ray: start (or join) a cluster and run N TorchTrainer workers.

`distreg train` joins an existing cluster when `RAY_ADDRESS` is set (as it is inside a
`ray job submit` job) and otherwise starts a local one. Paths in the config are made
absolute here, in the driver, because Ray workers run in their own directories.

Before Ray starts: preflight checks (runs/preflight.py), the run_dir lock
(runs/lock.py) and the run's identity (runs/identity.py: fresh, or the resumed run).
The driver owns the MLflow run (created or reopened here, closed FINISHED / FAILED /
KILLED here). Where the worker group starts is decided once (rank 0, broadcast); saved
checkpoints are reported to Ray Train in place, so its automatic restarts resume them.
"""
from __future__ import annotations

import os
import posixpath
import signal
import sys
import threading
from pathlib import Path

from distreg.config import RunConfig
from distreg.runtime import storage

_is_url = storage.is_url


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Absolute local paths and an explicit tracking URI, decided once in the driver."""
    from distreg.tracking.mlflow_tracker import default_tracking_uri

    cfg = cfg.model_copy(deep=True)
    if not _is_url(cfg.run_dir):
        cfg.run_dir = str(Path(cfg.run_dir).resolve())
    if not _is_url(cfg.data.path):
        cfg.data.path = str(Path(cfg.data.path.removeprefix("file://")).resolve())
    if cfg.eval.path and not _is_url(cfg.eval.path):
        cfg.eval.path = _absolute(cfg.eval.path)
    if cfg.checkpoint.dir and not _is_url(cfg.checkpoint.dir):
        cfg.checkpoint.dir = str(Path(cfg.checkpoint.dir).resolve())
    cfg.tracking.uri = cfg.tracking.uri or default_tracking_uri(cfg.run_dir)
    cfg.hooks = [_hook_paths(spec) for spec in cfg.hooks]
    return cfg


def _hook_paths(spec):
    """A hook entry with the local paths its hook declares made absolute."""
    from distreg.hooks.registry import hook_class

    cls = hook_class(spec.name)
    params = cls.resolve_paths(dict(spec.model_extra or {}), _absolute)
    return type(spec).model_validate({"name": spec.name, **params})


def _absolute(path: str) -> str:
    return path if _is_url(path) else str(Path(path.removeprefix("file://")).resolve())


def _worker_env(cfg: RunConfig) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(max(1, int(cfg.scaling.cpus_per_worker)))}
    env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    return env


def _ray_train_loop(loop_config: dict) -> dict | None:
    """Runs on every Ray Train worker (process group already initialised by Ray)."""
    import torch

    from distreg.runtime.trainer import JobLink, train_worker

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = loop_config["config"]
    ckpt_dir = cfg["checkpoint"]["dir"] or storage.join(cfg["run_dir"], "checkpoints")
    from distreg.runtime.comm import Comm

    start = decide_start(Comm(), lambda: _start_checkpoint(ckpt_dir, loop_config["start_checkpoint"],
                                                               loop_config["run"]["run_id"]))
    job = JobLink(run=loop_config["run"], start_checkpoint=start,
                  on_checkpoint=lambda path, step: _report_checkpoint(path, step))
    result = train_worker(cfg, job=job)
    # Rank 0's return value reaches the driver as Result.return_value: the driver never
    # reads a file that rank 0 wrote on another node.
    return {"summary": result.summary, "checkpoint": result.checkpoint, "step": result.final_step,
            "mlflow_run_id": result.mlflow_run_id, "run_id": loop_config["run"]["run_id"]} if result.summary else None


def decide_start(comm, choose) -> str | None:
    """Where this worker group starts, decided once: `choose()` runs on rank 0 only and
    its answer is broadcast, so every rank takes the same branch whatever each rank's
    view of the storage would be (a straggler, a node with a stale listing cache)."""
    import torch.distributed as dist

    box = [choose() if comm.rank == 0 else None]
    if comm.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _start_checkpoint(ckpt_dir: str, driver_choice: str | None, run_id: str) -> str | None:
    """Rank 0's choice: the newest of the driver's start point (a --resume), the latest
    checkpoint Ray Train registered (after an automatic restart) and the latest complete
    checkpoint of this run on storage (Ray registers reports asynchronously: a group
    that died right after a save may have saved more than Ray knows). The old group is
    gone when a new one starts, so nothing writes checkpoints while this looks."""
    import ray.train

    from distreg.runs.identity import checkpoint_lineage
    from distreg.runtime import checkpoint as ckpt

    candidates = [driver_choice]
    reported = ray.train.get_checkpoint()
    if reported is not None:
        candidates.append(storage.join(ckpt_dir, posixpath.basename(reported.path.rstrip("/"))))
    found = ckpt.latest_checkpoint(ckpt_dir)
    if found and (checkpoint_lineage(found[1]) or {}).get("run_id") == run_id:
        candidates.append(found[1])
    candidates = [c for c in candidates if c]
    return max(candidates, key=lambda c: posixpath.basename(c.rstrip("/"))) if candidates else None


def _report_checkpoint(path: str, step: int) -> None:
    """Tell Ray Train about a complete checkpoint (every rank calls; rank 0 attaches it).
    The experiment directory is checkpoint.dir itself, so the checkpoint is already where
    Ray keeps checkpoints: NO_UPLOAD, nothing copied."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    checkpoint = None
    if ray.train.get_context().get_world_rank() == 0:
        store = ray.train.get_context().get_storage()
        checkpoint = Checkpoint(posixpath.join(store.experiment_fs_path, posixpath.basename(path)),
                                filesystem=store.storage_filesystem)
    ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=posixpath.basename(path),
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def check_resources(cfg: RunConfig) -> None:
    """Fail fast, with the numbers, when the cluster cannot host the workers."""
    import ray

    s = cfg.scaling
    have = ray.cluster_resources()
    need = {"CPU": s.num_workers * s.cpus_per_worker}
    if s.use_gpu:
        need["GPU"] = s.num_workers * max(s.gpus_per_worker, 1)
    for key, amount in s.resources_per_worker.items():
        need[key] = need.get(key, 0) + s.num_workers * amount
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if short:
        detail = ", ".join(f"{k}: need {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
        raise SystemExit(f"scaling: the Ray cluster lacks resources for {s.num_workers} workers ({detail})")


def _ray_storage(checkpoint_dir: str) -> dict:
    """Ray Train's experiment directory = checkpoint.dir, so reported checkpoints are
    'managed' where they lie (NO_UPLOAD) and Ray's restarts find them."""
    if not storage.is_url(checkpoint_dir):
        return {"storage_path": os.path.dirname(checkpoint_dir), "name": os.path.basename(checkpoint_dir)}
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(checkpoint_dir)
    return {"storage_path": posixpath.dirname(path.rstrip("/")), "name": posixpath.basename(path.rstrip("/")),
            "storage_filesystem": PyFileSystem(FSSpecHandler(fs))}


def _drop_ray_snapshot(checkpoint_dir: str) -> None:
    """Ray Train restores the checkpoint list of an earlier job from its snapshot in the
    experiment directory and refuses to start if one of them was pruned since. Where a job
    starts is decided by distreg (the lineage in the checkpoints); Ray's record is only
    for restarts within this job, so an earlier job's snapshot is removed (the run_dir
    lock guarantees that job is gone)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    storage.remove(storage.join(checkpoint_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME))


def worker_nodes() -> int:
    """Alive nodes that can host a worker (a head with num-cpus 0 does not count)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)


def prepare(cfg: RunConfig) -> RunConfig:
    """Before Ray: paths decided (a relative run_dir inside a job, absolute local paths)
    and every config check that needs no cluster (runs/preflight.py)."""
    from distreg.config import ConfigError
    from distreg.runs.preflight import job_run_dir, preflight

    cfg = cfg.model_copy(deep=True)
    cfg.run_dir = job_run_dir(cfg.run_dir)
    if cfg.checkpoint.dir:
        cfg.checkpoint.dir = job_run_dir(cfg.checkpoint.dir)
    try:
        cfg = resolve_paths(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    preflight(cfg)
    return cfg


def claim(cfg: RunConfig, resume: bool) -> tuple["RunIdentity", "RunLock"]:
    """The run_dir lock, then the run's identity (fresh, or the resumed run). Raises
    ConfigError with one clear line when another job holds the run_dir or a plain run
    would reuse a used one."""
    from distreg.config import ConfigError
    from distreg.runs.identity import RunDirInUse, open_run
    from distreg.runs.lock import RunDirLocked, RunLock

    lock = RunLock(cfg.run_dir)
    try:
        lock.acquire()
    except RunDirLocked as e:
        raise ConfigError(f"run_dir: {e}") from None
    try:
        return open_run(cfg.run_dir, cfg.checkpoint_dir, resume), lock
    except RunDirInUse as e:
        lock.release()
        raise ConfigError(str(e)) from None
    except BaseException:
        lock.release()
        raise


def launch(cfg: RunConfig, resume: bool = False) -> dict:
    """Train `cfg` on Ray as one run; returns the run id, MLflow run, last checkpoint and
    rank 0's summary (through Ray, not through a file)."""
    cfg = prepare(cfg)
    _connect_ray()
    check_resources(cfg)
    from distreg.runs.preflight import check_shared_run_dir

    check_shared_run_dir(cfg, worker_nodes())
    identity, lock = claim(cfg, resume)
    closer = _RunCloser(cfg, identity, lock)
    try:
        closer.install()
        result = _fit(cfg, identity)
        closer.close("FINISHED")
    finally:
        closer.close("FAILED")  # no-op when already closed (FINISHED, or KILLED by a signal)
    info = dict(result.return_value or {})
    return {"tracking_uri": cfg.tracking.uri, "mlflow_run_id": identity.mlflow_run_id, "run_id": identity.run_id,
            "checkpoint": info.get("checkpoint"), "step": info.get("step"), "summary": info.get("summary"),
            "run_dir": cfg.run_dir}


def _connect_ray() -> None:
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # Worker environment travels in the TorchTrainer's worker_runtime_env, not here:
        # inside a `ray job submit` job the job's runtime_env must not be overridden.
        # No RAY_ADDRESS: a fresh local cluster ("local"), never a stray one found on
        # this machine.
        ray.init(address=address or "local", log_to_driver=True)


class _RunCloser:
    """Sets the MLflow run's terminal status exactly once and releases the run_dir lock.
    SIGTERM (`ray job stop`, Kubernetes) and SIGINT close it KILLED at once: Ray's job
    supervisor SIGKILLs the driver 3 s later, and the workers go with it."""

    def __init__(self, cfg: RunConfig, identity, lock):
        self.cfg, self.identity, self.lock = cfg, identity, lock
        self.closed = False

    def close(self, status: str) -> None:
        if self.closed:
            return
        self.closed = True
        from distreg.tracking.mlflow_tracker import close_run

        try:
            close_run(self.cfg.tracking.uri, self.identity.mlflow_run_id, status, self.cfg.run_dir)
        finally:
            self.lock.release()

    def on_signal(self, signum, frame) -> None:
        self.close("KILLED")
        signal.signal(signum, signal.SIG_DFL)
        raise KeyboardInterrupt(f"distreg: stopped by {signal.Signals(signum).name}; MLflow run marked KILLED")

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self.on_signal)


def _fit(cfg: RunConfig, identity):
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distreg.runs.identity import write_record
    from distreg.tracking.mlflow_tracker import open_run, run_tags

    identity.tracking_uri = cfg.tracking.uri
    identity.mlflow_run_id = open_run(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.run_name, cfg.flat(),
                                      {**run_tags(cfg.strategy.name, cfg.scaling.num_workers),
                                       "distreg.run_id": identity.run_id}, cfg.to_yaml(), identity.mlflow_run_id,
                                      cfg.run_dir)
    write_record(cfg.run_dir, identity)
    if identity.start_checkpoint:
        print(f"distreg: resuming run {identity.run_id} from {identity.start_checkpoint} (step {identity.start_step})")
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = max(s.gpus_per_worker, 1)
    backend = cfg.strategy.backend if cfg.strategy.backend != "auto" else ("nccl" if s.use_gpu else "gloo")
    _drop_ray_snapshot(cfg.checkpoint_dir)
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run": identity.lineage(),
                           "start_checkpoint": identity.start_checkpoint},
        torch_config=TorchConfig(backend=backend, timeout_s=s.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RayRunConfig(
            **_ray_storage(cfg.checkpoint_dir),
            failure_config=FailureConfig(max_failures=s.max_failures),
            # distreg prunes (marker first, by what is complete on storage): Ray registers
            # reports asynchronously and may miss one, so it must not count on its own.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": _worker_env(cfg)},
        ),
    )
    return trainer.fit()


def print_summary(info: dict, out=sys.stdout) -> None:
    print("distreg: training finished", file=out)
    print(f"  run:         {info.get('run_id')}  ({info.get('run_dir')})", file=out)
    print(f"  MLflow run:  {info['mlflow_run_id']}  (tracking URI {info['tracking_uri']})", file=out)
    if info["tracking_uri"] and info["tracking_uri"].startswith("sqlite:"):
        print(f"  browse with: mlflow ui --backend-store-uri {info['tracking_uri']}", file=out)
    print(f"  checkpoint:  {info['checkpoint']}  (step {info['step']})", file=out)
