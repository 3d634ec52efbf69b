"""The run_dir on an S3-compatible object store (moto's server on 127.0.0.1), on a Ray
cluster of two nodes (two raylets, `ray.cluster_utils.Cluster`, a head without CPUs):
one worker per node, rank 1 SIGKILLed after the step-3 checkpoint, the group restarts
and resumes from the store; final loss equals the uninterrupted run, one MLflow run,
FINISHED, one point per step, and the driver's summary comes back through Ray. In the
same cluster: the same config again without --resume and a local run_dir not declared
shared are refused before any worker starts.

One Ray run of a tiny model: the scenario runs in a subprocess with a cluster of its own
(tests/cluster_scenarios.py), so the session's shared cluster stays untouched."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distreg.testing import run_distributed
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
COMMON = {"scaling.num_workers": 2, "train.max_steps": 8, "checkpoint.every": 3, "optim.lr": 0.01}


def _straight(data: str, run_dir: str) -> dict:
    from distreg.runtime.trainer import train_worker

    return train_worker(tiny_config(data, run_dir, **COMMON).model_dump(mode="json"), track=False).losses


def test_two_nodes_s3_run_dir_killed_worker_resumes_from_the_store(s3_endpoint, token_data, tmp_path):
    from mlflow.tracking import MlflowClient

    from distreg.runs.identity import read_record
    from distreg.runtime import checkpoint as ckpt
    from distreg.runtime import storage
    from tests.s3server import new_bucket

    run_dir = f"{new_bucket('twonode')}/runs/faulty"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = {"data": token_data, "run_dir": run_dir, "tracking_uri": uri, "common": COMMON}
    out_file = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "tests.cluster_scenarios", "two_nodes_s3", json.dumps(args),
                           str(out_file)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = json.loads(out_file.read_text())
    assert out["nodes"] == 3  # head (no CPUs) + two worker nodes
    info, summary = out["info"], out["info"]["summary"]
    assert storage.exists(storage.join(run_dir, ".fail_once.fired"))  # rank 1 really died at step 5
    # The driver's view came from rank 0 through Ray: run id, checkpoint on the store, summary.
    record = read_record(run_dir)
    assert info["run_id"] == summary["run_id"] == record["run_id"]
    assert info["mlflow_run_id"] == summary["mlflow_run_id"] == record["mlflow_run_id"]
    assert info["step"] == summary["final_step"] == 8
    assert info["checkpoint"] == ckpt.step_path(storage.join(run_dir, "checkpoints"), 8)
    # The restarted group resumed from the store's step-3 checkpoint: it ran steps 4..8.
    assert sorted(int(s) for s in summary["losses"]) == [4, 5, 6, 7, 8]
    assert json.loads(storage.read_text(storage.join(run_dir, "summary.json")))["final_step"] == 8
    assert [s for s, _ in ckpt.complete_checkpoints(storage.join(run_dir, "checkpoints"))] == [6, 8]  # keep_last 2
    assert not (tmp_path / "s3:").exists()  # nothing landed in a local folder named after the URL
    straight = run_distributed(_straight, 2, token_data, str(tmp_path / "straight"))[0]
    assert summary["final_loss"] == pytest.approx(straight[8], abs=1e-6)
    # One MLflow run, FINISHED, one point per step although steps 4-5 ran twice.
    client = MlflowClient(uri)
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert {m.step: m.value for m in history}[8] == pytest.approx(straight[8], abs=1e-6)
    # Refused before any worker started, naming the run / the key and what to do.
    assert f"already holds run {record['run_id']}" in out["rerun_refused"] and "--resume" in out["rerun_refused"]
    assert "run_dir:" in out["local_refused"] and "run_dir_shared: true" in out["local_refused"]
