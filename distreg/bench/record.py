"""Suite runs in MLflow: one run per suite execution, tagged with suite, commit and
hardware, metrics `<entry>/<metric>` (e.g. `tiny-fsdp2/tokens_per_s`, `resnet/eval/top1`)."""
from __future__ import annotations

import os
import time
from pathlib import Path

SUITE_TAG = "distreg.suite"
HARDWARE_TAG = "distreg.hardware"
COMMIT_TAG = "mlflow.source.git.commit"


class BenchError(Exception):
    """A usage or lookup error of a bench command: one line, exit code 2."""


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('runs/bench/mlflow.db').resolve()}"


def client(uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(resolve_uri(uri))


def log_suite_run(mlflow_client, experiment: str, suite: str, results: dict[str, dict[str, float]], hardware: str,
                  commit: str | None, run_name: str | None = None, start_time: int | None = None,
                  artifacts: list[str] = ()) -> str:
    """Log one suite execution (finished) and return its run id."""
    from mlflow.entities import Metric

    exp = mlflow_client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else mlflow_client.create_experiment(
        experiment, artifact_location=_artifact_location(mlflow_client.tracking_uri))
    tags = {SUITE_TAG: suite, HARDWARE_TAG: hardware}
    if commit:
        tags[COMMIT_TAG] = commit
    run = mlflow_client.create_run(exp_id, run_name=run_name or suite, tags=tags, start_time=start_time)
    now = int(time.time() * 1000)
    metrics = [Metric(f"{entry}/{m}", float(v), now, 0) for entry, ms in results.items() for m, v in ms.items()]
    for i in range(0, len(metrics), 1000):  # MLflow's per-batch limit
        mlflow_client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
    for path in artifacts:
        mlflow_client.log_artifact(run.info.run_id, path)
    mlflow_client.set_terminated(run.info.run_id, end_time=start_time)
    return run.info.run_id


def _artifact_location(uri: str) -> str | None:
    """Beside a sqlite store (MLflow's default would be ./mlruns of whatever the current
    directory is); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def suite_runs(mlflow_client, experiment: str, suite: str, limit: int = 1000) -> list:
    """Finished runs of `suite`, newest first."""
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    quoted = suite.replace("'", "\\'")
    return mlflow_client.search_runs([exp.experiment_id], f"tags.`{SUITE_TAG}` = '{quoted}' and "
                                     "attributes.status = 'FINISHED'",
                                     order_by=["attributes.start_time DESC"], max_results=limit)
