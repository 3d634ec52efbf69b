"""MLflow tracking from rank 0: batched, off the training thread, outage-tolerant.

Metrics go into a queue; a daemon thread sends them with `log_batch`. If the tracking
server is unreachable (at start or mid-run) the run keeps training: a warning is
printed once and every record that could not be sent is appended to
`<run_dir>/mlflow_fallback.jsonl` (run_dir may be a URL); `distreg mlflow-sync RUN_DIR`
uploads it later, and closes the run when its end was kept back too.

Under `distreg train` the driver owns the MLflow run (`open_run` / `close_run`: one run
per job, FINISHED / FAILED / KILLED set there); rank 0's tracker attaches to it and only
logs metrics. A tracker that attaches to a run with history (a resume, a restarted
worker group) logs only the steps after the last one MLflow already has, so replayed
steps never give duplicate points.
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

from distreg.runtime import storage

import distreg

# Fail fast on an unreachable server instead of MLflow's default minutes of retries;
# the fallback file keeps what could not be sent.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

FALLBACK = "mlflow_fallback.jsonl"
RUN_ID_FILE = "mlflow_run_id"


def default_tracking_uri(run_dir: str) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if storage.is_url(run_dir):
        # sqlite needs a local file; an object-store run_dir needs a tracking server.
        raise ValueError(f"tracking.uri: run_dir {run_dir} is an object-store URL, which cannot hold the sqlite "
                         "MLflow store: set tracking.uri (or MLFLOW_TRACKING_URI) to a tracking server or a shared path")
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class MlflowTracker:
    def __init__(self, run_dir: str, uri: str | None, experiment: str, run_name: str | None):
        self.run_dir = run_dir
        self.uri = uri or default_tracking_uri(run_dir)
        self.experiment, self.run_name = experiment, run_name
        self.run_id: str | None = None
        self.client = None
        self._queue: queue.Queue = queue.Queue()
        self._warned = False
        self._thread: threading.Thread | None = None
        self.logged_through = 0  # steps <= this are already in MLflow (attached runs)
        self.owns_run = True  # False: the driver closes the run

    # -- start ---------------------------------------------------------------------
    def start(self, params: dict, tags: dict, config_yaml: str, run_id: str | None = None) -> str | None:
        """Create a new run, or attach to `run_id` (the job's run, owned by the driver).
        Never raises."""
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            if run_id:
                self.run_id, self.owns_run = run_id, False
                self.logged_through = last_logged_step(self.client, run_id)
            else:
                self.run_id = create_run(self.client, self.experiment, self.run_name, params, tags, config_yaml)
                storage.write_text(storage.join(self.run_dir, RUN_ID_FILE), self.run_id + "\n")
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            self._degrade(f"cannot reach MLflow at {self.uri}: {e}")
            if run_id is None:
                self._fallback({"kind": "start", "params": params, "tags": tags, "config": config_yaml})
        self._thread = threading.Thread(target=self._drain, name="mlflow-tracker", daemon=True)
        self._thread.start()
        return self.run_id

    # -- metrics ---------------------------------------------------------------------
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Non-blocking: queue for the sender thread. Steps MLflow already holds (replayed
        after a resume: identical values) are dropped."""
        if step <= self.logged_through:
            return
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
            warnings.warn(f"{why}; training continues, unsent records go to {storage.join(self.run_dir, FALLBACK)} "
                          f"(upload later with `distreg mlflow-sync {self.run_dir}`)", stacklevel=2)
            self._warned = True

    def _fallback(self, record: dict) -> None:
        record["run_id"] = self.run_id
        storage.append_text(storage.join(self.run_dir, FALLBACK), json.dumps(record) + "\n")

    # -- end ---------------------------------------------------------------------
    def finish(self, status: str = "FINISHED") -> None:
        """Flush the queue; close the run only if this tracker created it."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=120)
        if self.owns_run:
            close_run(self.uri, self.run_id, status, self.run_dir, client=self.client)


def create_run(client, experiment: str, run_name: str | None, params: dict, tags: dict, config_yaml: str) -> str:
    from mlflow.entities import Param

    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    client.log_text(run_id, config_yaml, "config.yaml")
    return run_id


def last_logged_step(client, run_id: str, key: str = "train/loss") -> int:
    history = client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=0)


def open_run(uri: str, experiment: str, run_name: str | None, params: dict, tags: dict, config_yaml: str,
             run_id: str | None, run_dir: str) -> str | None:
    """The driver's side: the job's MLflow run, reopened (RUNNING) when `run_id` is the
    run being resumed, else created. None when MLflow is unreachable (rank 0's tracker
    then keeps the records in the fallback file)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        if run_id:
            try:
                client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException as e:
                if "RESOURCE_DOES_NOT_EXIST" not in str(e.error_code):
                    raise
                warnings.warn(f"MLflow run {run_id} of this lineage is not in {uri} (another tracking URI?): "
                              "the resumed run continues in a new MLflow run", stacklevel=2)
        return create_run(client, experiment, run_name, params, tags, config_yaml)
    except Exception as e:  # noqa: BLE001 - a tracking outage must not stop the job
        warnings.warn(f"cannot reach MLflow at {uri}: {e}; rank 0 keeps unsent records in "
                      f"{storage.join(run_dir, FALLBACK)}", stacklevel=2)
        return None


def close_run(uri: str, run_id: str | None, status: str, run_dir: str, client=None) -> None:
    """Set the terminal status; if MLflow cannot be reached, keep an `end` record in the
    fallback file so `distreg mlflow-sync` closes the run later."""
    if run_id is None:
        storage.append_text(storage.join(run_dir, FALLBACK), json.dumps({"kind": "end", "status": status,
                                                                         "run_id": None}) + "\n")
        return
    try:
        from mlflow.tracking import MlflowClient

        (client or MlflowClient(tracking_uri=uri)).set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"closing MLflow run {run_id} ({status}) failed: {e}; kept for `distreg mlflow-sync`",
                      stacklevel=2)
        storage.append_text(storage.join(run_dir, FALLBACK),
                            json.dumps({"kind": "end", "status": status, "run_id": run_id}) + "\n")


def sync_fallback(run_dir: str, uri: str | None = None, experiment: str = "distreg") -> int:
    """Upload `<run_dir>/mlflow_fallback.jsonl` (records a tracking outage kept back).
    Returns the number of records sent; the file is renamed `.synced` afterwards."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    url = storage.join(run_dir, FALLBACK)
    text = storage.read_text(url)
    if text is None:
        return 0
    client = MlflowClient(tracking_uri=uri or default_tracking_uri(run_dir))
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
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
            storage.write_text(storage.join(run_dir, RUN_ID_FILE), run_id + "\n")
        elif r["kind"] == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, float(v), r["ts"], r["step"]) for k, v in r["metrics"].items()])
        elif r["kind"] == "end":  # the run's end was lost in the outage: close it now
            client.set_terminated(r.get("run_id") or run_id, status=r["status"])
        sent += 1
    storage.write_text(url + ".synced", text)
    storage.remove(url)
    return sent


def run_tags(strategy: str, world_size: int) -> dict[str, str]:
    tags = {"distreg.strategy": strategy, "distreg.world_size": str(world_size), "distreg.version": distreg.__version__}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
