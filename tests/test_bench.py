"""`distreg bench run` on the shared Ray cluster with the shipped smoke suite (a few
steps): numbers come back from rank 0 through Ray and hardware from a worker-resourced
Ray task, so the driver reads no file the workers wrote (the entries' run_dirs are a
`memory://` URL: per process, invisible to the driver)."""
from __future__ import annotations

from pathlib import Path

from distreg.bench import compare, load_suite, run_suite
from distreg.bench.record import HARDWARE_TAG, client

REPO = Path(__file__).resolve().parents[1]


def test_smoke_suite_runs_through_ray(ray_cluster, token_data, tmp_path, capsys, monkeypatch):
    import platform

    from distreg.bench.runner import _cpu_model

    monkeypatch.chdir(REPO)  # the suite names its configs relative to the repository
    uri = f"sqlite:///{tmp_path}/bench.db"
    suite = str(REPO / "configs/bench/smoke.yaml")
    run_id = run_suite(suite, "memory://bench-test", uri,
                       [f"data.path={token_data}", "train.max_steps=3", "data.seq_len=32", "train.global_batch_size=8",
                        f"checkpoint.dir={tmp_path}/checkpoints/{{entry}}"])  # DeepSpeed needs a file system
    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    # The tag comes from a Ray task on a worker-resourced node: workers, CPUs each, model, arch.
    assert run.data.tags[HARDWARE_TAG] == f"2x cpu (1 CPU/worker, {_cpu_model()}, {platform.machine()})"
    # Each entry's final loss is the last train/loss its own training run logged (rank 0).
    exp = mlflow_client.get_experiment_by_name("distreg-bench-runs")
    trained = mlflow_client.search_runs([exp.experiment_id])
    assert len(trained) == 3
    final_losses = sorted(r.data.metrics["train/loss"] for r in trained)
    assert sorted(run.data.metrics[f"{e}/final_loss"] for e in ("tiny-nohooks", "tiny-fsdp2", "tiny-zero3")) \
        == final_losses
    assert run.data.metrics["tiny-fsdp2/overhead"] == (run.data.metrics["tiny-fsdp2/step_time_p50_s"]
                                                      / run.data.metrics["tiny-nohooks/step_time_p50_s"])
    assert {"summary.md"} <= {a.path for a in mlflow_client.list_artifacts(run_id)}
    # The first run of the suite on this hardware passes with a note.
    capsys.readouterr()
    assert compare(suite, tracking_uri=uri) == 0
    assert "no baseline yet" in capsys.readouterr().out


def test_shipped_suites_are_valid():
    for path in sorted((REPO / "configs/bench").glob("*.yaml")):
        suite = load_suite(str(path))
        for entry in suite.runs:
            assert (REPO / entry.config).exists(), f"{path.name}: {entry.config}"


def test_hardware_probe_reads_nvidia_smi(tmp_path, monkeypatch):
    """No GPU here: a stand-in `nvidia-smi` on PATH prints what the real one prints for
    `--query-gpu=name,driver_version --format=csv,noheader` on a 2-GPU node."""
    from distreg.bench.runner import _probe

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --query-gpu=name,driver_version ] || exit 9\n"
                    "echo 'NVIDIA H100 80GB HBM3, 550.54.15'\necho 'NVIDIA H100 80GB HBM3, 550.54.15'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    info = _probe()
    assert (info["gpu"], info["driver"], info["gpus_seen"]) == ("NVIDIA H100 80GB HBM3", "550.54.15", 2)
