"""Checks made in the driver before Ray starts: everything that would otherwise fail
inside the workers after compute is spent. Each failure is a ConfigError naming the key
or path."""
from __future__ import annotations

import os
import shutil
import uuid

from distreg.config import ConfigError, RunConfig
from distreg.runtime import storage

# Which data each model kind trains on.
MODEL_DATA = {"llama": ("tokens", "mixture"), "torchvision": ("imagenet",), "mae": ("imagenet",)}


def check_model(cfg: RunConfig) -> dict:
    """Model kind against data kind, preset/arch known; returns distreg.plan's plan."""
    kinds = MODEL_DATA[cfg.model.kind]
    if cfg.data.kind not in kinds:
        raise ConfigError(f"model.kind={cfg.model.kind} trains on data.kind {' or '.join(kinds)}, "
                          f"but data.kind={cfg.data.kind}")
    from distreg.plan import plan

    try:
        return plan(cfg)  # builds the model on the meta device: unknown presets/arches fail here
    except (ValueError, KeyError, AttributeError) as e:
        key = {"llama": "model.preset", "mae": "model.mae"}.get(cfg.model.kind, "model.arch")
        msg = str(e)
        raise ConfigError(msg if msg.startswith("model") else f"{key}: {msg}") from None


def checkpoint_bytes(info: dict) -> int:
    """One checkpoint, all ranks together: fp32 parameters + optimizer moments (the plan's
    per-rank numbers times the world size over-count only replicated DDP state)."""
    b = info["bytes"]
    return int((b["params"] + b["optimizer"]) * (info["world_size"] if info["strategy"] != "ddp" else 1))


def check_writable(key: str, url: str, need_bytes: int) -> None:
    """A test write (and delete) under `url`; for local paths also the free space."""
    probe = storage.join(url, f".distreg-write-test-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_text(probe, "ok\n")
        storage.remove(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write to {url}: {e.strerror or e}") from None
    if storage.is_url(url):
        return  # object stores: no free-space notion
    free = shutil.disk_usage(url.removeprefix("file://")).free
    if free < need_bytes:
        raise ConfigError(f"{key}: {url} has {free / 2**30:.2f} GiB free but one checkpoint needs about "
                          f"{need_bytes / 2**30:.2f} GiB (distreg plan's estimate)")


def preflight(cfg: RunConfig) -> None:
    """Everything checkable about `cfg` (paths already resolved) before Ray starts."""
    info = check_model(cfg)
    check_writable("run_dir", cfg.run_dir, 0)
    key = "checkpoint.dir" if cfg.checkpoint.dir else "run_dir (checkpoints)"
    check_writable(key, cfg.checkpoint_dir, checkpoint_bytes(info))


def check_shared_run_dir(cfg: RunConfig, nodes: int) -> None:
    """A local run_dir on several nodes must be a volume every node mounts."""
    for key, path in (("run_dir", cfg.run_dir), ("checkpoint.dir", cfg.checkpoint_dir)):
        if nodes > 1 and not storage.is_url(path) and not cfg.run_dir_shared:
            raise ConfigError(
                f"{key}: {path} is a local path but the Ray cluster has {nodes} nodes that can run workers: each "
                "node would see its own copy. Use an object-store URL (s3://, gs://) or a volume mounted on every "
                "node and declare it with run_dir_shared: true")


def job_run_dir(run_dir: str) -> str:
    """What a relative run_dir means: relative to the current directory, except inside a
    Ray job, whose current directory is Ray's temporary package folder (deleted after
    the job, different on every node): there it is relative to $DISTREG_RUN_ROOT, and
    refused without it."""
    if storage.is_url(run_dir) or os.path.isabs(run_dir.removeprefix("file://")):
        return run_dir
    from distreg.runs.lock import ray_job_id

    in_job = ray_job_id() is not None
    root = os.environ.get("DISTREG_RUN_ROOT")
    if root:
        return storage.join(root, run_dir) if storage.is_url(root) else os.path.join(root, run_dir)
    if in_job:
        raise ConfigError(
            f"run_dir: {run_dir!r} is relative and this is a Ray job, whose working directory is Ray's temporary "
            "package folder (deleted after the job): set run_dir to an absolute shared path or an s3:// / gs:// "
            "URL, or set DISTREG_RUN_ROOT (e.g. --runtime-env-json '{\"env_vars\": {\"DISTREG_RUN_ROOT\": "
            "\"s3://bucket/runs\"}}')")
    return run_dir
