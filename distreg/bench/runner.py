"""`distreg bench run SUITE.yaml`: train every entry, log one MLflow run per execution.

Each entry trains through the normal launcher; its numbers come back from rank 0 through
Ray (the value `distreg.launch.launch` returns), never from a file on the head, and the
hardware tag comes from a small Ray task scheduled with a worker's resources. So a suite
runs from a head without GPUs and without a disk shared with the workers (`--out` may be
an fsspec URL for the entries' run directories).
"""
from __future__ import annotations

import posixpath
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from distreg.bench.record import client, log_suite_run
from distreg.bench.report import format_table
from distreg.bench.suite import DERIVED_METRICS, RUN_METRICS, load_suite

PROBE_TIMEOUT_S = 600  # an autoscaler may have to bring a worker node back


def _cpu_model() -> str:
    import platform

    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "?"


def _probe(gpus: bool = True) -> dict:
    """Runs on a worker node: what hardware a training worker there gets (GPU model and
    driver from nvidia-smi, else torch; `gpus=False`: CPU facts only)."""
    import os
    import platform

    info = {"machine": platform.machine(), "cpu_model": _cpu_model(), "node_cpus": os.cpu_count(), "gpu": None,
            "driver": None, "gpus_seen": 0}
    if not gpus:
        return info
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
        if out.returncode == 0 and rows:
            info.update(gpu=rows[0][0], driver=rows[0][1], gpus_seen=len(rows))
    except (OSError, subprocess.SubprocessError):
        pass
    if info["gpu"] is None:
        import torch

        if torch.cuda.is_available():
            info.update(gpu=torch.cuda.get_device_name(0), gpus_seen=torch.cuda.device_count())
    return info


def worker_hardware(cfg) -> str:
    """The hardware tag of `cfg`'s workers, probed on a node that can host one:
    "<workers>x <GPU model> (<gpus/worker> GPU/worker, driver <version>)" or
    "<workers>x cpu (<cpus/worker> CPU/worker, <CPU model>, <arch>)"."""
    import ray

    s = cfg.scaling
    gpus = max(s.gpus_per_worker, 1) if s.use_gpu else 0
    task = ray.remote(_probe).options(num_cpus=s.cpus_per_worker, num_gpus=gpus,
                                      resources=dict(s.resources_per_worker)).remote(bool(gpus))
    try:
        info = ray.get(task, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(task, force=True)
        raise RuntimeError(f"bench: no node with a worker's resources answered the hardware probe within "
                           f"{PROBE_TIMEOUT_S} s") from None
    if gpus and info["gpu"]:
        return f"{s.num_workers}x {info['gpu']} ({gpus:g} GPU/worker, driver {info['driver'] or '?'})"
    return f"{s.num_workers}x cpu ({s.cpus_per_worker:g} CPU/worker, {info['cpu_model']}, {info['machine']})"


def entry_metrics(info: dict) -> dict[str, float]:
    """Rank 0's numbers from `launch()`'s return value: the run metrics and eval/*."""
    summary = info.get("summary") or {}
    out = {m: float(summary[m]) for m in RUN_METRICS if isinstance(summary.get(m), (int, float))}
    for key, value in summary.items():  # eval metrics, flat ("eval/top1") or nested ({"eval": {"top1": ..}})
        if key.startswith("eval/") and isinstance(value, (int, float)):
            out[key] = float(value)
        elif key == "eval" and isinstance(value, dict):
            out.update({f"eval/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
    return out


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts) if "://" in root else str(Path(root, *parts))


def run_suite(path: str, out_dir: str = "runs/bench", tracking_uri: str | None = None,
              overrides: list[str] = ()) -> str:
    """Run every entry (`overrides` apply to all, after each entry's own; `{entry}` in
    one stands for the entry's name); returns the MLflow run id of this suite execution."""
    from distreg.config import ConfigError, load_config
    from distreg.data import check_data
    from distreg.data.errors import DataError
    from distreg.launch import launch
    from distreg.tracking.mlflow_tracker import git_commit

    suite = load_suite(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = _join(out_dir, f"{suite.suite}-{stamp}-{uuid.uuid4().hex[:6]}")  # one run_dir per execution
    # Validate every entry (config and data) before running any.
    configs = {r.name: load_config(r.config, [*r.overrides, *(o.replace("{entry}", r.name) for o in overrides),
                                              f"run_dir={_join(root, r.name)}",
                                              f"tracking.experiment={suite.experiment}-runs"]) for r in suite.runs}
    for name, cfg in configs.items():
        try:
            check_data(cfg)
        except DataError as e:
            raise ConfigError(f"{path}: runs.{name}: {e}") from None
    if tracking_uri:
        for cfg in configs.values():
            cfg.tracking.uri = tracking_uri
    results: dict[str, dict] = {}
    hardware: dict[str, None] = {}  # ordered set of the entries' tags
    for entry in suite.runs:
        print(f"distreg bench: {suite.suite}/{entry.name}", flush=True)
        info = launch(configs[entry.name])
        results[entry.name] = entry_metrics(info)
        if "final_loss" not in results[entry.name]:
            raise RuntimeError(f"{suite.suite}/{entry.name}: rank 0 reported no summary (launch returned {info})")
        hardware[worker_hardware(configs[entry.name])] = None  # the cluster launch() joined or started
    for entry in suite.runs:
        if entry.baseline and "step_time_p50_s" in results[entry.baseline]:
            results[entry.name]["overhead"] = results[entry.name]["step_time_p50_s"] / results[entry.baseline]["step_time_p50_s"]


    columns = [*RUN_METRICS, *DERIVED_METRICS]
    columns += sorted({m for ms in results.values() for m in ms if m.startswith("eval/")})
    table = format_table(["run", *columns], [[name, *(ms.get(m) for m in columns)] for name, ms in results.items()])
    with tempfile.TemporaryDirectory() as tmp:
        md = Path(tmp) / "summary.md"
        md.write_text(table + "\n")
        run_id = log_suite_run(client(tracking_uri), suite.experiment, suite.suite, results,
                               " + ".join(hardware), git_commit(), run_name=f"{suite.suite}-{stamp}", artifacts=[str(md)])
    if "://" not in root:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "summary.md").write_text(table + "\n")
    print(table)
    print(f"distreg bench: suite run {run_id} (hardware {' + '.join(hardware)}; {root})")
    return run_id
