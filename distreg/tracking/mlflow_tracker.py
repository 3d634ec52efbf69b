"""MLflow tracking from rank 0: batched, off the training thread, outage-tolerant.

Metrics go into a queue; a daemon thread sends them with `log_batch`. If the tracking
server is unreachable (at start or mid-run) the run keeps training: a warning is
printed once and every record that could not be sent is appended to
`<run_dir>/mlflow_fallback.jsonl`; `distreg mlflow-sync RUN_DIR` uploads it later.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import warnings
from pathlib import Path

import distreg

# Fail fast on an unreachable server instead of MLflow's default minutes of retries;
# the fallback file keeps what could not be sent.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

FALLBACK = "mlflow_fallback.jsonl"
RUN_ID_FILE = "mlflow_run_id"


def default_tracking_uri(run_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class MlflowTracker:
    def __init__(self, run_dir: str, uri: str | None, experiment: str, run_name: str | None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = uri or default_tracking_uri(run_dir)
        self.experiment, self.run_name = experiment, run_name
        self.run_id: str | None = None
        self.client = None
        self._queue: queue.Queue = queue.Queue()
        self._warned = False
        self._thread: threading.Thread | None = None

    # -- start ---------------------------------------------------------------------
    def start(self, params: dict, tags: dict, config_yaml: str) -> str | None:
        """Create (or resume, via <run_dir>/mlflow_run_id) the run. Never raises."""
        import mlflow
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            id_file = self.run_dir / RUN_ID_FILE
            if id_file.exists():
                self.run_id = id_file.read_text().strip()
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                exp = self.client.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
                run = self.client.create_run(exp_id, run_name=self.run_name, tags=tags)
                self.run_id = run.info.run_id
                id_file.write_text(self.run_id + "\n")
                self._log_params(params)
                self.client.log_text(self.run_id, config_yaml, "config.yaml")
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            self._degrade(f"cannot reach MLflow at {self.uri}: {e}")
            self._fallback({"kind": "start", "params": params, "tags": tags, "config": config_yaml})
        self._thread = threading.Thread(target=self._drain, name="mlflow-tracker", daemon=True)
        self._thread.start()
        return self.run_id

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    # -- metrics ---------------------------------------------------------------------
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Non-blocking: queue for the sender thread."""
        self._queue.put((step, int(time.time() * 1000), dict(metrics)))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            return
        try:
            self.client.log_artifact(self.run_id, local_path, artifact_path)
        except Exception as e:  # noqa: BLE001
            self._degrade(f"artifact upload failed: {e}")

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            batch = [item]
            while len(batch) < 100:  # coalesce whatever is waiting into one request
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    self._queue.task_done()
                    break
                batch.append(nxt)
            self._send(batch)
            for _ in batch:
                self._queue.task_done()

    def _send(self, batch) -> None:
        from mlflow.entities import Metric

        if self.run_id is not None:
            metrics = [Metric(k, float(v), ts, step) for step, ts, m in batch for k, v in m.items()]
            try:
                for i in range(0, len(metrics), 1000):
                    self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000], synchronous=True)
                return
            except Exception as e:  # noqa: BLE001
                self._degrade(f"sending metrics to MLflow failed: {e}")
        for step, ts, m in batch:
            self._fallback({"kind": "metrics", "step": step, "ts": ts, "metrics": m})

    def _degrade(self, why: str) -> None:
        if not self._warned:
            warnings.warn(f"{why}; training continues, unsent records go to {self.run_dir / FALLBACK} "
                          f"(upload later with `distreg mlflow-sync {self.run_dir}`)", stacklevel=2)
            self._warned = True

    def _fallback(self, record: dict) -> None:
        record["run_id"] = self.run_id
        with open(self.run_dir / FALLBACK, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- end ---------------------------------------------------------------------
    def finish(self, status: str = "FINISHED") -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=120)
        if self.run_id is not None:
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as e:  # noqa: BLE001
                self._degrade(f"closing the MLflow run failed: {e}")


def sync_fallback(run_dir: str, uri: str | None = None, experiment: str = "distreg") -> int:
    """Upload `<run_dir>/mlflow_fallback.jsonl` (records a tracking outage kept back).
    Returns the number of records sent; the file is renamed `.synced` afterwards."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    path = Path(run_dir) / FALLBACK
    if not path.exists():
        return 0
    client = MlflowClient(tracking_uri=uri or default_tracking_uri(run_dir))
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    run_id = next((r["run_id"] for r in records if r.get("run_id")), None)
    sent = 0
    for r in records:
        if r["kind"] == "start" and run_id is None:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
            run_id = client.create_run(exp_id, tags=r["tags"]).info.run_id
            for k, v in r["params"].items():
                client.log_param(run_id, k, str(v)[:6000])
            client.log_text(run_id, r["config"], "config.yaml")
            (Path(run_dir) / RUN_ID_FILE).write_text(run_id + "\n")
        elif r["kind"] == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, float(v), r["ts"], r["step"]) for k, v in r["metrics"].items()])
        sent += 1
    path.rename(path.with_suffix(".jsonl.synced"))
    return sent


def run_tags(strategy: str, world_size: int) -> dict[str, str]:
    tags = {"distreg.strategy": strategy, "distreg.world_size": str(world_size), "distreg.version": distreg.__version__}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
