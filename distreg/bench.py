"""Benchmark suites: `distreg bench run SUITE.yaml` and `distreg bench compare SUITE.yaml`.

A suite file names configs to run (each with `--set`-style overrides) and per-metric
regression thresholds:

    suite: smoke
    experiment: distreg-bench            # MLflow experiment holding every suite run
    runs:
      - name: tiny-fsdp2
        config: configs/quickstart.yaml
        overrides: [train.max_steps=20]
        baseline: tiny-nohooks           # optional: report step-time overhead vs that run
    thresholds:                          # relative change that counts as a regression
      final_loss: {max_increase: 0.05}
      tokens_per_s: {max_decrease: 0.30}

`run` trains each entry (through the same Ray launcher as `distreg train`), reads its
`summary.json`, and logs one MLflow run per suite execution (tags: suite, git commit,
hardware) with metrics `<entry>/<metric>`, plus a markdown summary table. `compare`
takes the latest suite run against a baseline (a run id, or the best of the previous N
runs per metric), prints a table, logs a comparison plot, and exits 1 on a regression.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

METRICS = ("final_loss", "tokens_per_s", "step_time_p50_s", "step_time_p90_s", "peak_rss_mb", "peak_gpu_mem_mb")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Threshold(_Strict):
    max_increase: float | None = None  # relative: 0.05 = 5% higher is a regression
    max_decrease: float | None = None


class SuiteRun(_Strict):
    name: str
    config: str
    overrides: list[str] = []
    baseline: str | None = None


class Suite(_Strict):
    suite: str
    experiment: str = "distreg-bench"
    runs: list[SuiteRun] = Field(min_length=1)
    thresholds: dict[str, Threshold] = {}


def load_suite(path: str) -> Suite:
    from distreg.config import ConfigError

    try:
        suite = Suite.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    except ValidationError as e:
        raise ConfigError(f"{path}: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    unknown = set(suite.thresholds) - {f"{m}" for m in METRICS} - {"overhead"}
    if unknown:
        raise ConfigError(f"{path}: thresholds: unknown metric(s) {sorted(unknown)}; known: {list(METRICS)}")
    return suite


def hardware() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"{platform.machine()} {os.cpu_count()} cpus, {gpu}"


def _client(uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('runs/bench/mlflow.db').resolve()}")


def run_suite(path: str, out_dir: str = "runs/bench", tracking_uri: str | None = None) -> str:
    """Run every entry; returns the MLflow run id of this suite execution."""
    import json

    from distreg.config import load_config
    from distreg.launch import launch
    from distreg.tracking.mlflow_tracker import git_commit

    suite = load_suite(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(out_dir) / f"{suite.suite}-{stamp}"
    # Validate every entry before running any.
    configs = {r.name: load_config(r.config, [*r.overrides, f"run_dir={root / r.name}",
                                              f"tracking.experiment={suite.experiment}-runs"]) for r in suite.runs}
    if tracking_uri:
        for cfg in configs.values():
            cfg.tracking.uri = tracking_uri
    results: dict[str, dict] = {}
    for entry in suite.runs:
        print(f"distreg bench: {suite.suite}/{entry.name}", flush=True)
        launch(configs[entry.name])
        summary = json.loads((root / entry.name / "summary.json").read_text())
        results[entry.name] = {m: summary[m] for m in METRICS if summary.get(m) is not None}
    for entry in suite.runs:
        if entry.baseline:
            base = results[entry.baseline]["step_time_p50_s"]
            results[entry.name]["overhead"] = results[entry.name]["step_time_p50_s"] / base

    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(suite.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(suite.experiment)
    tags = {"distreg.suite": suite.suite, "distreg.hardware": hardware()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(exp_id, run_name=f"{suite.suite}-{stamp}", tags=tags)
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(f"{name}/{m}", float(v), now, 0)
                                               for name, ms in results.items() for m, v in ms.items()])
    table = format_table(["run", *METRICS, "overhead"],
                         [[name, *(ms.get(m) for m in (*METRICS, "overhead"))] for name, ms in results.items()])
    (root / "summary.md").write_text(table + "\n")
    client.log_artifact(run.info.run_id, str(root / "summary.md"))
    client.set_terminated(run.info.run_id)
    print(table)
    print(f"distreg bench: suite run {run.info.run_id} ({root})")
    return run.info.run_id


def format_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _lower_is_better(metric: str) -> bool:
    return metric != "tokens_per_s"


def compare(path: str, baseline_run: str | None = None, best_of: int = 5, tracking_uri: str | None = None) -> int:
    """Latest suite run vs a baseline; returns 1 on any regression beyond thresholds."""
    suite = load_suite(path)
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(suite.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`distreg.suite` = '{suite.suite}'",
                              order_by=["attributes.start_time DESC"], max_results=best_of + 1) if exp else []
    if not runs or (baseline_run is None and len(runs) < 2):
        print(f"distreg bench compare: need a latest run and a baseline of suite {suite.suite!r} in "
              f"experiment {suite.experiment!r} (found {len(runs)})", file=sys.stderr)
        return 2
    latest = runs[0]
    if baseline_run:
        pool = [client.get_run(baseline_run)]
    else:
        pool = runs[1:]
    rows, regressions = [], []
    for key, value in sorted(latest.data.metrics.items()):
        metric = key.split("/", 1)[1]
        candidates = [r.data.metrics[key] for r in pool if key in r.data.metrics]
        if not candidates:
            continue
        base = min(candidates) if _lower_is_better(metric) else max(candidates)
        change = (value - base) / abs(base) if base else 0.0
        limit = suite.thresholds.get(metric)
        bad = False
        if limit is not None:
            if limit.max_increase is not None and change > limit.max_increase:
                bad = True
            if limit.max_decrease is not None and -change > limit.max_decrease:
                bad = True
        rows.append([key, base, value, f"{change:+.1%}", "REGRESSION" if bad else "ok"])
        if bad:
            regressions.append(key)
    table = format_table(["metric", "baseline", "latest", "change", "verdict"], rows)
    print(table)
    _log_comparison_plot(client, latest.info.run_id, rows)
    if regressions:
        print(f"distreg bench compare: regression in {', '.join(regressions)}", file=sys.stderr)
        return 1
    print("distreg bench compare: no regression")
    return 0


def _log_comparison_plot(client, run_id: str, rows: list[list]) -> None:
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    ratios = [(r[2] / r[1]) if r[1] else 1.0 for r in rows]
    ax.barh([r[0] for r in rows], ratios, color=["tab:red" if r[4] != "ok" else "tab:blue" for r in rows])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("latest / baseline")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "comparison.png"
        fig.savefig(out, dpi=100)
        client.log_artifact(run_id, str(out))
    plt.close(fig)


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="run a benchmark suite")
    p.add_argument("suite")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(fn=lambda a: (run_suite(a.suite, a.out, a.tracking_uri), 0)[1])
    p = sub.add_parser("compare", help="compare the latest suite run to a baseline; exit 1 on regression")
    p.add_argument("suite")
    p.add_argument("--baseline", default=None, help="MLflow run id of the baseline suite run")
    p.add_argument("--best-of", type=int, default=5, help="baseline: best of the previous N suite runs")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(fn=lambda a: compare(a.suite, a.baseline, a.best_of, a.tracking_uri))
