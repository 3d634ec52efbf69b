"""Benchmark suites: `distreg bench run SUITE.yaml` and `distreg bench compare SUITE.yaml`.

`suite.py`: the suite file (entries, thresholds with a direction per metric); `runner.py`:
run the entries on Ray, numbers and hardware from the workers; `record.py`: suite runs in
MLflow; `compare.py`: median-of-last-N baseline on the same hardware, noise bands, exit
codes; `plot.py`: the comparison plot; `cli.py`: the commands.
"""
from distreg.bench.cli import add_commands
from distreg.bench.compare import compare
from distreg.bench.record import BenchError, log_suite_run
from distreg.bench.runner import run_suite
from distreg.bench.suite import Suite, Threshold, load_suite

__all__ = ["BenchError", "Suite", "Threshold", "add_commands", "compare", "load_suite", "log_suite_run", "run_suite"]
