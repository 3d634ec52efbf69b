"""`distreg eval CONFIG --checkpoint PATH [--world-size N] [--set ...] [--run-id ID] [--out FILE]`

Evaluates a checkpoint of any strategy (or a `model.pt` of `distreg prune dsnot` /
`adapters merge`) on the config's `eval:` held-out set, under the config's strategy on
N local gloo processes (default 1; the numbers do not depend on N or on the strategy:
`distreg.runtime.evaluate`). Writes eval.json (default
`<run_dir>/eval/<checkpoint name>/eval.json`) and logs the `eval/` metrics to MLflow:
to the training run with `--run-id` (at the checkpoint's step), else to a new run of
`tracking.experiment` tagged with the checkpoint. Everything that can be checked before
compute is spent (config, held-out data, checkpoint path and completeness, parameter
names and shapes) is checked in this process first; errors are one line.
"""
from __future__ import annotations

import json
import math
import posixpath
import time
from pathlib import Path

import fsspec

from distreg.config import ConfigError, RunConfig, load_config


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML config of the model, its strategy and its eval: section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set eval.path=data/val")
    p.add_argument("--checkpoint", required=True,
                   help="a step_N checkpoint, a checkpoint root (latest step), or a torch.save'd state dict")
    p.add_argument("--world-size", type=int, default=1, help="local gloo processes (default 1)")
    p.add_argument("--run-id", default=None, help="log to this MLflow run (e.g. the training run) instead of a new one")
    p.add_argument("--out", default=None, help="eval.json path (default <run_dir>/eval/<checkpoint name>/eval.json)")


def _absolute(path: str) -> str:
    return path if "://" in path and not path.startswith("file://") else str(Path(path.removeprefix("file://")).resolve())


def run(args) -> int:
    from distreg.data.errors import DataError
    from distreg.data.heldout import build_heldout
    from distreg.launch import resolve_paths
    from distreg.runtime.eval_checkpoint import check_checkpoint, eval_config
    from distreg.runtime.weights import CheckpointError, resolve_checkpoint

    if args.world_size < 1:
        raise ConfigError(f"--world-size {args.world_size}: must be >= 1")
    cfg = load_config(args.config, args.overrides)
    checkpoint = _absolute(args.checkpoint)
    try:
        cfg = resolve_paths(eval_config(cfg, args.world_size))
        build_heldout(cfg, 0, args.world_size)  # opens every held-out dataset: a bad path is named here
        check_checkpoint(cfg, checkpoint)
    except (CheckpointError, DataError) as e:
        raise ConfigError(str(e)) from None
    fs, local = fsspec.core.url_to_fs(checkpoint)
    resolved = checkpoint if fs.isfile(local) else resolve_checkpoint(checkpoint)
    name = posixpath.basename(resolved.rstrip("/")).removesuffix(".pt")
    if args.run_id:
        check_run(cfg, args.run_id)  # before compute is spent
    out = Path(args.out or Path(cfg.run_dir) / "eval" / name / "eval.json").resolve()
    report = evaluate(cfg, checkpoint, args.world_size)
    report["config"] = args.config
    _write_json(out, report)
    report["mlflow_run_id"] = log_to_mlflow(cfg, report, str(out), args.run_id)
    _write_json(out, report)  # now with the run id
    print(format_report(report, str(out)))
    return 0


def _write_json(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)


def evaluate(cfg: RunConfig, checkpoint: str, world_size: int) -> dict:
    """`evaluate_checkpoint` on `world_size` local gloo processes; rank 0's report."""
    import torch.multiprocessing as mp

    from distreg.runtime.eval_checkpoint import evaluate_checkpoint
    from distreg.testing import run_distributed

    t0 = time.perf_counter()
    try:
        report = run_distributed(evaluate_checkpoint, world_size, cfg, checkpoint)[0]
    except mp.ProcessRaisedException as e:
        # An error found inside a rank (weights that do not fit a hook's reshaped model)
        # is reported as one line, not a worker traceback.
        for marker in ("CheckpointError: ", "DataError: ", "ConfigError: "):
            lines = [ln for ln in str(e).splitlines() if marker in ln]
            if lines:
                raise ConfigError(lines[-1].split(marker, 1)[1]) from None
        raise
    report["seconds"] = time.perf_counter() - t0
    return report


def _client(cfg: RunConfig):
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines (store creation) in our output

    from distreg.tracking.mlflow_tracker import default_tracking_uri

    return MlflowClient(cfg.tracking.uri or default_tracking_uri(cfg.run_dir))


def check_run(cfg: RunConfig, run_id: str) -> None:
    client = _client(cfg)
    try:
        client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types per store
        raise ConfigError(f"--run-id {run_id}: no such MLflow run at {client.tracking_uri}") from None


def log_to_mlflow(cfg: RunConfig, report: dict, eval_json: str, run_id: str | None) -> str | None:
    """Metrics (finite ones) and eval.json to `run_id`, or to a new run tagged with the
    checkpoint. Returns the run id."""
    from mlflow.entities import Metric

    client = _client(cfg)
    now = int(time.time() * 1000)
    step = report["step"] or 0
    metrics = [Metric(k, float(v), now, step) for k, v in report["metrics"].items() if math.isfinite(v)]
    new = run_id is None
    if new:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
        tags = {"distreg.kind": "eval", "distreg.checkpoint": report["checkpoint"],
                "distreg.strategy": report["strategy"], "distreg.world_size": str(report["world_size"]),
                "mlflow.runName": f"eval {posixpath.basename(report['checkpoint'].rstrip('/'))}"}
        run_id = client.create_run(exp_id, tags=tags).info.run_id
    else:
        client.set_tag(run_id, f"distreg.eval_checkpoint.step_{step}", report["checkpoint"])
    client.log_batch(run_id, metrics=metrics)
    client.log_artifact(run_id, eval_json, f"eval/{Path(eval_json).parent.name}")
    if new:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def format_report(report: dict, out: str) -> str:
    m = report["metrics"]
    lines = [f"eval of {report['checkpoint']} (step {report['step']}) under {report['strategy']} on "
             f"{report['world_size']} rank(s): {int(m['eval/samples'])} held-out samples"]
    width = max(len(k) for k in m)
    lines += [f"  {k:<{width}}  {v:.6g}" for k, v in m.items()]
    lines.append(f"wrote {out}; MLflow run {report['mlflow_run_id']}")
    return "\n".join(lines)
