"""MLflow: a real `mlflow server` on 127.0.0.1 receives params, metrics and the config
artifact of a 2-worker Ray run; a tracking outage never stops training and what could
not be sent is uploaded later by `distreg mlflow-sync`."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from distreg.testing import free_port
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_ray_run_logs_to_mlflow_server(mlflow_server, token_data, tmp_path, ray_cluster):
    from mlflow.tracking import MlflowClient

    from distreg.launch import launch

    cfg = tiny_config(token_data, str(tmp_path / "run"), **{
        "scaling.num_workers": 2, "train.max_steps": 6, "tracking.uri": mlflow_server,
        "tracking.experiment": "ray-e2e", "hooks": "[{name: param_norm}]"})
    info = launch(cfg)
    assert info["step"] == 6 and info["checkpoint"].endswith("step_00000006")
    client = MlflowClient(mlflow_server)
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "fsdp2" and run.data.params["train.max_steps"] == "6"
    assert run.data.tags["distreg.world_size"] == "2"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 7))
    for key in ("train/lr", "train/tokens_per_s", "train/step_time_s", "hooks/param_norm"):
        assert key in run.data.metrics
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    # One run per job, not one per worker.
    exp = client.get_experiment_by_name("ray-e2e")
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_tracking_outage_keeps_training_and_syncs_later(mlflow_server, token_data, tmp_path):
    from mlflow.tracking import MlflowClient

    from distreg.runtime.trainer import Trainer
    from distreg.tracking.mlflow_tracker import FALLBACK, sync_fallback

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    run_dir = tmp_path / "run"
    cfg = tiny_config(token_data, str(run_dir), **{"scaling.num_workers": 1, "strategy.name": "ddp",
                                                    "train.max_steps": 3, "tracking.uri": dead,
                                                    "tracking.experiment": "outage"})
    with pytest.warns(UserWarning, match="training continues"):
        result = Trainer(cfg).fit()
    assert result.final_step == 3
    lines = (run_dir / FALLBACK).read_text().splitlines()
    assert len(lines) == 1 + 3 + 1  # the run's start record, three steps of metrics, its end
    assert sync_fallback(str(run_dir), mlflow_server, "outage") == 5
    client = MlflowClient(mlflow_server)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3]
    assert client.get_run(run_id).data.params["train.max_steps"] == "3"
    assert client.get_run(run_id).info.status == "FINISHED"  # the end kept back is applied too
