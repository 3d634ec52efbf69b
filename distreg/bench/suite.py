"""Benchmark suite files: what to run, which metrics gate, in which direction, by how much.

    suite: smoke
    experiment: distreg-bench            # MLflow experiment holding every suite run
    baseline_runs: 5                     # compare: median of the last N runs on the same hardware
    runs:
      - name: tiny-fsdp2
        config: configs/quickstart.yaml
        overrides: [train.max_steps=20]
        baseline: tiny-nohooks           # optional: report step-time overhead vs that run
    thresholds:                          # how much worse than the baseline is a regression
      final_loss: {relative: 0.05}       # 5% higher loss
      tokens_per_s: {relative: 0.30}     # 30% fewer tokens/s (+ the measured noise band)
      eval/top1: {absolute: 0.005}       # top-1 (a fraction) down by more than 0.5 points

Direction ("better"): lower for losses, perplexities, times and memory, higher for
throughput and accuracies (`eval/top1`, `eval/top5`, `eval/accuracy`, ...); a threshold on
a metric whose direction the name does not tell must say `better: lower|higher`.
Timing metrics get a noise band measured from the baseline runs on top of their threshold
(`noise_band: false|true` overrides that).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# What each suite entry reports (rank 0's summary), plus eval/* metrics when it evaluates.
RUN_METRICS = ("final_loss", "tokens_per_s", "step_time_p50_s", "step_time_p90_s", "peak_rss_mb", "peak_gpu_mem_mb")
DERIVED_METRICS = ("overhead",)  # step_time_p50_s / the entry's `baseline` entry's
TIMING_METRICS = frozenset({"tokens_per_s", "step_time_p50_s", "step_time_p90_s", "overhead"})
_HIGHER = frozenset({"tokens_per_s"})
_LOWER_LEAVES = ("loss", "ppl", "perplexity")
_HIGHER_LEAVES = ("acc", "accuracy", "top1", "top5")


def known_metric(metric: str) -> bool:
    return metric in RUN_METRICS or metric in DERIVED_METRICS or metric.startswith("eval/")


def direction(metric: str) -> str | None:
    """"lower" or "higher" (which way is better) from the metric's name; None if unknown."""
    if metric in _HIGHER:
        return "higher"
    if metric in RUN_METRICS or metric in DERIVED_METRICS:
        return "lower"
    leaf = metric.rsplit("/", 1)[-1]
    if leaf in _HIGHER_LEAVES or leaf.endswith("_acc") or leaf.endswith("accuracy"):
        return "higher"
    if leaf in _LOWER_LEAVES or leaf.endswith("_loss"):
        return "lower"
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Threshold(_Strict):
    """How much worse than the baseline's median a metric may get: `relative` (a fraction
    of the baseline) or `absolute` (in the metric's own units), exactly one."""
    relative: float | None = Field(None, ge=0)
    absolute: float | None = Field(None, ge=0)
    better: Literal["lower", "higher"] | None = None  # default: from the metric's name
    noise_band: bool | None = None  # default: on for timing metrics

    @model_validator(mode="after")
    def _one_limit(self):
        if (self.relative is None) == (self.absolute is None):
            raise ValueError("give exactly one of relative (fraction of the baseline) or absolute (metric units)")
        return self


class SuiteRun(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # a metric-key prefix: no '/'
    config: str
    overrides: list[str] = []
    baseline: str | None = None


class Suite(_Strict):
    suite: str
    experiment: str = "distreg-bench"
    baseline_runs: int = Field(5, ge=1)
    runs: list[SuiteRun] = Field(min_length=1)
    thresholds: dict[str, Threshold] = {}

    def better(self, metric: str) -> str | None:
        t = self.thresholds.get(metric)
        return (t.better if t and t.better else None) or direction(metric)

    def uses_noise_band(self, metric: str) -> bool:
        t = self.thresholds.get(metric)
        return t.noise_band if t is not None and t.noise_band is not None else metric in TIMING_METRICS


def load_suite(path: str) -> Suite:
    """The validated suite; a ConfigError naming the file and key otherwise."""
    from distreg.config import ConfigError

    try:
        suite = Suite.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    except ValidationError as e:
        raise ConfigError(f"{path}: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    names = [r.name for r in suite.runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: runs: entry names must be unique ({names})")
    for r in suite.runs:
        if r.baseline is not None and r.baseline not in names:
            raise ConfigError(f"{path}: runs.{r.name}.baseline: no entry named {r.baseline!r}")
    for metric in suite.thresholds:
        if not known_metric(metric):
            raise ConfigError(f"{path}: thresholds.{metric}: unknown metric; known: "
                              f"{[*RUN_METRICS, *DERIVED_METRICS]} and eval/<name>")
        if suite.better(metric) is None:
            raise ConfigError(f"{path}: thresholds.{metric}: say which way is better (better: lower|higher)")
    return suite
