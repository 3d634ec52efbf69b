"""Run a config on Ray: start (or join) a cluster and run N TorchTrainer workers.

`distreg train` joins an existing cluster when `RAY_ADDRESS` is set (as it is inside a
`ray job submit` job) and otherwise starts a local one. Paths in the config are made
absolute here, in the driver, because Ray workers run in their own directories.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from distreg.config import RunConfig
from distreg.runtime.checkpoint import latest_checkpoint


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


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

    from distreg.runtime.trainer import train_worker

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = loop_config["config"]
    # Ray Train restarts the whole worker group after a failure and calls this function
    # again: a launch marker left by an earlier attempt means "resume from the latest".
    marker = Path(cfg["run_dir"]) / f".launch-{loop_config['launch_id']}"
    restarted = marker.exists()
    if int(os.environ.get("RANK", "0")) == 0 and not _is_url(cfg["run_dir"]):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    result = train_worker(cfg, resume=loop_config["resume"] or restarted)
    # Rank 0's return value reaches the driver through Ray (`Result.return_value`): the
    # summary comes back without reading a file rank 0 wrote on another node.
    if int(os.environ.get("RANK", "0")) == 0:
        from distreg.config import RunConfig as _RunConfig
        from distreg.runtime.trainer import summary_dict

        return summary_dict(result, _RunConfig.model_validate(cfg), int(os.environ.get("WORLD_SIZE", "1")))
    return None


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


def launch(cfg: RunConfig, resume: bool = False) -> dict:
    """Train `cfg` on Ray; returns where the MLflow run and the checkpoint are."""
    import ray
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = resolve_paths(cfg)
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # Worker environment travels in the TorchTrainer's worker_runtime_env, not here:
        # inside a `ray job submit` job the job's runtime_env must not be overridden.
        # No RAY_ADDRESS: a fresh local cluster ("local"), never a stray one found on
        # this machine.
        ray.init(address=address or "local", log_to_driver=True)
    check_resources(cfg)
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = max(s.gpus_per_worker, 1)
    backend = cfg.strategy.backend if cfg.strategy.backend != "auto" else ("nccl" if s.use_gpu else "gloo")
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "resume": resume, "launch_id": uuid.uuid4().hex},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RayRunConfig(
            name=Path(cfg.run_dir).name + "-" + uuid.uuid4().hex[:6],
            storage_path=str(Path(cfg.run_dir).resolve() / "ray") if not _is_url(cfg.run_dir) else None,
            failure_config=FailureConfig(max_failures=s.max_failures),
            worker_runtime_env={"env_vars": _worker_env(cfg)},
        ),
    )
    result = trainer.fit()
    return {**summary(cfg), "summary": result.return_value}


def summary(cfg: RunConfig) -> dict:
    run_id_file = Path(cfg.run_dir) / "mlflow_run_id"
    found = latest_checkpoint(cfg.checkpoint_dir)
    return {
        "tracking_uri": cfg.tracking.uri,
        "mlflow_run_id": run_id_file.read_text().strip() if run_id_file.exists() else None,
        "checkpoint": found[1] if found else None,
        "step": found[0] if found else None,
    }


def print_summary(info: dict, out=sys.stdout) -> None:
    print("distreg: training finished", file=out)
    print(f"  MLflow run:  {info['mlflow_run_id']}  (tracking URI {info['tracking_uri']})", file=out)
    if info["tracking_uri"] and info["tracking_uri"].startswith("sqlite:"):
        print(f"  browse with: mlflow ui --backend-store-uri {info['tracking_uri']}", file=out)
    print(f"  checkpoint:  {info['checkpoint']}  (step {info['step']})", file=out)
