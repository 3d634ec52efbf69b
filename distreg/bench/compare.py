"""`distreg bench compare SUITE.yaml`: the latest suite run against a robust baseline.

Baseline: the median, per metric, of the last N finished runs of the suite on the same
hardware tag before the candidate (`--baseline RUN_ID` names one run instead). Timing
metrics also get a noise band measured from those runs: their spread relative to their
median, so a machine that is noisy in the baseline is allowed the same noise in the
candidate, and a quiet one catches small slowdowns. A metric regresses when it is worse than the median by
more than its threshold (+ band). No baseline yet (first run of a suite on a hardware):
exit 0 with a note. Exit codes: 0 ok, 1 regression, 2 usage or lookup error (one line).
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from distreg.bench.record import COMMIT_TAG, HARDWARE_TAG, SUITE_TAG, BenchError, client, resolve_uri, suite_runs
from distreg.bench.suite import Suite, load_suite


@dataclass
class Row:
    key: str  # <entry>/<metric>
    metric: str
    better: str | None  # "lower" | "higher" | None (unknown: shown, never gated)
    base: float  # median of the baseline runs
    value: float | None  # None: missing from the candidate
    band: float  # relative noise band (0 for non-timing metrics)
    allowed: float | None  # how much worse is tolerated, relative to |base| (threshold + band); None: not gated
    verdict: str  # "ok", "REGRESSION", "info"

    @property
    def change(self) -> float:
        """Relative change vs the baseline, signed so that > 0 is better (unknown direction: value - base)."""
        if self.value is None:
            return math.nan
        diff = self.base - self.value if self.better == "lower" else self.value - self.base  # unknown: as measured
        return diff / abs(self.base) if self.base else (0.0 if diff == 0 else math.copysign(math.inf, diff))


@dataclass
class Comparison:
    suite: str
    latest_id: str
    baseline_ids: list[str]
    hardware: str
    commit: str | None
    rows: list[Row]
    note: str | None = None

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "REGRESSION"]


def noise_band(values: list[float]) -> float:
    """The spread of the baseline runs relative to their median, (max - min) / |median|
    (0 for one run): a candidate of the same code lands within it of the median about as
    often as the runs agree among themselves (simulated for uniform noise: false alarms
    3% at 5 runs, 1% at 7 with a 5% threshold; under 0.1% with a 30% threshold)."""
    med = statistics.median(values)
    return (max(values) - min(values)) / abs(med) if med else 0.0


def compare_metrics(suite: Suite, latest: dict[str, float], pool: list[dict[str, float]]) -> list[Row]:
    """One row per `<entry>/<metric>` of the suite's entries that the baseline runs have."""
    entries = {r.name for r in suite.runs}
    keys = sorted({k for run in pool for k in run if k.split("/", 1)[0] in entries and "/" in k})
    rows = []
    for key in keys:
        metric = key.split("/", 1)[1]
        values = [run[key] for run in pool if key in run]
        base, value = statistics.median(values), latest.get(key)
        better = suite.better(metric)
        limit = suite.thresholds.get(metric)
        band = noise_band(values) if suite.uses_noise_band(metric) else 0.0
        allowed = None
        if limit is not None:
            allowed = (limit.relative if limit.relative is not None
                       else limit.absolute / abs(base) if base else (0.0 if limit.absolute == 0 else math.inf)) + band
        row = Row(key, metric, better, base, value, band, allowed, "info")
        if allowed is not None:
            # A gated metric the candidate no longer reports cannot be shown to hold.
            row.verdict = "REGRESSION" if value is None or -row.change > allowed + 1e-12 else "ok"
        rows.append(row)
    return rows


def select(suite: Suite, mlflow_client, run_id: str | None, baseline_id: str | None, last: int | None):
    """(candidate run, baseline runs, note) from MLflow; BenchError on a bad id."""
    from mlflow.exceptions import MlflowException

    def get(run: str, flag: str):
        try:
            found = mlflow_client.get_run(run)
        except MlflowException:
            raise BenchError(f"{flag} {run}: no such MLflow run at {mlflow_client.tracking_uri}") from None
        if found.data.tags.get(SUITE_TAG) != suite.suite:
            raise BenchError(f"{flag} {run}: a run of suite {found.data.tags.get(SUITE_TAG)!r}, "
                             f"not {suite.suite!r}")
        return found

    try:
        runs = suite_runs(mlflow_client, suite.experiment, suite.suite)
    except MlflowException as e:
        raise BenchError(f"cannot read experiment {suite.experiment!r} at {mlflow_client.tracking_uri}: "
                         f"{str(e).splitlines()[0]}") from None
    if run_id:
        latest = get(run_id, "--run")
    elif runs:
        latest = runs[0]
    else:
        raise BenchError(f"no finished run of suite {suite.suite!r} in experiment {suite.experiment!r} at "
                         f"{mlflow_client.tracking_uri}; run `distreg bench run` first")
    hardware = latest.data.tags.get(HARDWARE_TAG, "?")
    if baseline_id:
        if baseline_id == latest.info.run_id:
            raise BenchError(f"--baseline {baseline_id}: that is the run being compared")
        base = get(baseline_id, "--baseline")
        note = None
        if base.data.tags.get(HARDWARE_TAG) != hardware:
            note = f"baseline hardware {base.data.tags.get(HARDWARE_TAG)!r} differs from {hardware!r}"
        return latest, [base], note
    n = last or suite.baseline_runs
    older = [r for r in runs if r.info.run_id != latest.info.run_id and r.info.start_time <= latest.info.start_time
             and r.data.tags.get(HARDWARE_TAG) == hardware]
    pool = older[:n]
    note = None if pool else (f"no baseline yet for suite {suite.suite!r} on hardware {hardware!r}: "
                              f"run {latest.info.run_id} passes and becomes the baseline")
    return latest, pool, note


def compare(path: str, baseline_run: str | None = None, last: int | None = None, tracking_uri: str | None = None,
            run_id: str | None = None, plot: bool = True, out=None) -> int:
    """Compare, print the table, log the plot and table to the candidate run; exit code."""
    out = out or sys.stdout
    from distreg.bench.plot import log_comparison
    from distreg.bench.report import format_rows

    suite = load_suite(path)
    uri = resolve_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        # Say so, and create no empty store as a side effect of a lookup.
        raise BenchError(f"no MLflow store at {uri.removeprefix('sqlite:///')} (set --tracking-uri or MLFLOW_TRACKING_URI)")
    mlflow_client = client(uri)
    latest, pool, note = select(suite, mlflow_client, run_id, baseline_run, last)
    result = Comparison(suite.suite, latest.info.run_id, [r.info.run_id for r in pool],
                        latest.data.tags.get(HARDWARE_TAG, "?"), latest.data.tags.get(COMMIT_TAG),
                        compare_metrics(suite, latest.data.metrics, [r.data.metrics for r in pool]) if pool else [],
                        note)
    if note:
        print(f"distreg bench compare: note: {note}", file=out)
    if not pool:
        return 0
    table = format_rows(result)
    print(table, file=out)
    if plot:
        artifact = log_comparison(mlflow_client, result, table)
        print(f"distreg bench compare: plot {artifact} (run {latest.info.run_id})", file=out)
    if result.regressions:
        print(f"distreg bench compare: regression in {', '.join(r.key for r in result.regressions)}", file=out)
        return 1
    print(f"distreg bench compare: no regression vs the median of {len(pool)} baseline run(s)", file=out)
    return 0
