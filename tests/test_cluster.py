"""Cluster paths: `ray job submit` of the README's job command against `ray start --head`
with token auth and data and run_dir on an S3-compatible store (moto's server): the job
succeeds, a second submit of unchanged code into the same run_dir is refused, `ray job
stop` marks the MLflow run KILLED; a worker killed mid-run that Ray Train replaces, the
run resuming from its checkpoint (local disk here; two nodes and S3 in
tests/test_cluster_s3.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from distreg.submit import UPLOAD_EXCLUDES
from distreg.testing import free_port, run_distributed
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_endpoint):
    """A real head node on 127.0.0.1 with token authentication on.

    It gets its own temp dir, and teardown kills exactly the processes whose command
    line names it: `ray stop` would also kill the other Ray cluster of this session."""
    import psutil

    home = tmp_path_factory.mktemp("rayhome")
    # Short: Ray's Unix socket paths live under the temp dir and must stay under ~107 chars.
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    # os.environ holds the object store's endpoint and credentials (s3_endpoint): the head,
    # its job drivers and workers inherit them, as pods get them from a Secret.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    dash = free_port()
    start = ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "3",
             "--ray-client-server-port", str(free_port()), "--temp-dir", temp_dir, "--disable-usage-stats"]
    # The session's other cluster holds the default agent ports: without ports of its own,
    # this head's job agent never comes up ("No available agent to submit job").
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port"):
        start += [flag, str(free_port())]
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while True:  # `ray start` returns before the dashboard's job server listens
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5)
            break
        except urllib.error.HTTPError:
            break  # it answered (401 without a token): it is up
        except OSError:
            assert time.time() < deadline, "the Ray dashboard did not come up"
            time.sleep(1)
    yield env, address, temp_dir
    mine = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in mine:
        p.kill()
    psutil.wait_procs(mine, timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_tokens(s3_endpoint, token_data) -> str:
    """The token corpus on the object store (`--working-dir` uploads no data)."""
    import fsspec

    from tests.s3server import new_bucket

    bucket = new_bucket("jobs")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(token_data.rstrip("/") + "/", f"{bucket}/data/tokens/", recursive=True)
    return bucket


def _job_command(address: str, tracking_uri: str, bucket: str, run: str, *extra: str) -> list[str]:
    """The README's job command (data and run on the object store), made tiny."""
    env = {"DS_ACCELERATOR": "cpu", "MLFLOW_TRACKING_URI": tracking_uri}
    return ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps({"env_vars": env, "excludes": UPLOAD_EXCLUDES}), *extra,
            "--", "distreg", "train", "configs/quickstart.yaml", "--set", f"data.path={bucket}/data/tokens",
            "--set", f"run_dir={bucket}/runs/{run}", "--set", "data.seq_len=32", "--set", "train.global_batch_size=8"]


def _submit(env: dict, cmd: list[str]) -> subprocess.CompletedProcess:
    for attempt in range(6):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        out = proc.stdout + proc.stderr
        # A freshly started head accepts HTTP before its job agent is up ("No available
        # agent"): that is the cluster starting, not the job failing - try again.
        if proc.returncode == 0 or not any(s in out for s in ("No available agent", "Connection refused",
                                                                 "ConnectionRefusedError")):
            break
        time.sleep(10)
    return proc


def _run_record(bucket: str, run: str) -> dict:
    from distreg.runs.identity import read_record

    return read_record(f"{bucket}/runs/{run}")


def test_ray_job_submit_runs_a_config(ray_head, s3_tokens, tmp_path):
    from mlflow.tracking import MlflowClient

    env, address, _ = ray_head
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = _job_command(address, uri, s3_tokens, "job") + ["--set", "train.max_steps=4"]
    proc = _submit(env, cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distreg: training finished" in proc.stdout and "succeeded" in proc.stdout.lower()
    record = _run_record(s3_tokens, "job")
    client = MlflowClient(uri)
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["distreg.run_id"] == record["run_id"]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3, 4]
    # The same command again (unchanged code, same Ray package folder, same run_dir): refused.
    again = _submit(env, cmd)
    assert again.returncode != 0
    assert f"already holds run {record['run_id']}" in again.stdout + again.stderr
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no second MLflow run


def _worker_processes(temp_dir: str) -> list:
    """Ray Train worker processes of the head started in `temp_dir`."""
    import psutil

    raylets = [p for p in psutil.process_iter(["cmdline"])
               if temp_dir in " ".join(p.info["cmdline"] or []) and "raylet" in " ".join(p.info["cmdline"] or [])]
    found = []
    for raylet in raylets:
        for child in raylet.children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                pass
    return found


def _job_running(env: dict, address: str, job_id: str) -> bool:
    status = subprocess.run(["ray", "job", "status", "--address", address, job_id], env=env, capture_output=True,
                            text=True, timeout=60)
    out = status.stdout.lower()  # e.g. "Job 'raysubmit_..' was stopped" / "has failed" / "has succeeded"
    return not any(s in out for s in ("failed", "succeeded", "stopped"))


def test_ray_job_stop_marks_the_run_killed(ray_head, s3_tokens, tmp_path):
    from mlflow.tracking import MlflowClient

    env, address, temp_dir = ray_head
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = _job_command(address, uri, s3_tokens, "stopped", "--no-wait")
    cmd += ["--set", "train.max_steps=100000"]
    proc = _submit(env, cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", proc.stdout).group(0)
    client, deadline = MlflowClient(uri), time.time() + 600
    while True:  # wait until it trains (a few steps in MLflow)
        record = _run_record(s3_tokens, "stopped")
        if record and record.get("mlflow_run_id"):
            if len(client.get_metric_history(record["mlflow_run_id"], "train/loss")) >= 2:
                break
        if time.time() > deadline or not _job_running(env, address, job_id):
            logs = subprocess.run(["ray", "job", "logs", "--address", address, job_id], env=env,
                                  capture_output=True, text=True, timeout=60)
            pytest.fail(f"the job never started training: {logs.stdout[-3000:]}")
        time.sleep(2)
    assert _worker_processes(temp_dir)
    # A second job on the same run_dir while the first runs (even a --resume): refused.
    second = _submit(env, [c for c in cmd if c != "--no-wait"] + ["--resume"])
    assert second.returncode != 0 and "run_dir is in use" in second.stdout + second.stderr
    subprocess.run(["ray", "job", "stop", "--address", address, job_id], env=env, check=True, capture_output=True,
                   timeout=120)
    deadline = time.time() + 60
    while client.get_run(record["mlflow_run_id"]).info.status != "KILLED":
        assert time.time() < deadline, "the MLflow run was not KILLED within a minute"
        time.sleep(1)
    while _worker_processes(temp_dir):
        assert time.time() < deadline, "workers still alive a minute after ray job stop"
        time.sleep(1)
    status = subprocess.run(["ray", "job", "status", "--address", address, job_id], env=env, capture_output=True,
                            text=True, timeout=60)
    assert "was stopped" in status.stdout


def test_submit_without_token_is_refused(ray_head, tmp_path):
    env, address, _ = ray_head
    no_token = {**env, "HOME": str(tmp_path)}  # no ~/.ray/auth_token here
    proc = subprocess.run([sys.executable, "-m", "distreg.cli", "submit", "configs/quickstart.yaml",
                           "--address", address, "--no-wait"], cwd=REPO, env=no_token, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "requires a Ray auth token" in proc.stderr


def _straight(data: str, run_dir: str, overrides: dict) -> dict:
    from distreg.runtime.trainer import train_worker

    return train_worker(tiny_config(data, run_dir, **overrides).model_dump(mode="json"), track=False).losses


def test_killed_worker_is_replaced_and_resumes(ray_cluster, token_data, tmp_path):
    from distreg.launch import launch

    common = {"scaling.num_workers": 2, "train.max_steps": 8, "checkpoint.every": 3, "optim.lr": 0.01}
    run_dir = tmp_path / "faulty"
    cfg = tiny_config(token_data, str(run_dir), **common, **{
        "scaling.max_failures": 1, "hooks": f"[{{name: fail_once, step: 5, rank: 1, run_dir: '{run_dir}'}}]"})
    info = launch(cfg)
    assert (run_dir / ".fail_once.fired").exists()  # the worker really died at step 5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert info["step"] == summary["final_step"] == 8
    # The surviving attempt resumed from the step-3 checkpoint: it ran steps 4..8 only.
    assert sorted(int(s) for s in summary["losses"]) == [4, 5, 6, 7, 8]
    straight = run_distributed(_straight, 2, token_data, str(tmp_path / "straight"), common)[0]
    assert summary["final_loss"] == pytest.approx(straight[8], abs=1e-6)


def test_too_few_resources_fail_fast(ray_cluster, token_data, tmp_path):
    from distreg.launch import launch

    cfg = tiny_config(token_data, str(tmp_path / "big"), **{"scaling.num_workers": 2, "scaling.cpus_per_worker": 64})
    with pytest.raises(SystemExit, match=r"lacks resources for 2 workers \(CPU: need 128, cluster has 4\)"):
        launch(cfg)
