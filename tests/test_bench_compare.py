"""`distreg bench compare` against a real MLflow store (sqlite), with suite runs logged
directly: median-of-last-N baselines on the same hardware, noise bands for timing
metrics, eval-metric gates with a direction, exit codes 0 / 1 / 2, unique plots."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from distreg.bench import compare, log_suite_run
from distreg.bench.record import client
from distreg.cli import main

CPU = "2x cpu (1 CPU/worker, Intel Xeon, x86_64)"
THRESHOLDS = {"final_loss": {"relative": 0.05}, "tokens_per_s": {"relative": 0.30},
              "step_time_p50_s": {"relative": 0.40}, "eval/top1": {"absolute": 0.005}, "eval/loss": {"relative": 0.02}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    return {"uri": uri, "client": client(uri), "root": root, "clock": [1_700_000_000_000]}


def suite_file(store, name: str, thresholds=THRESHOLDS, baseline_runs: int = 5) -> str:
    path = store["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"suite": name, "experiment": "bench-compare-test", "baseline_runs": baseline_runs,
                                    "runs": [{"name": "tiny", "config": "configs/quickstart.yaml"}],
                                    "thresholds": thresholds}))
    return str(path)


def log(store, name: str, time_factor: float = 1.0, loss: float = 2.0, top1: float = 0.70, eval_loss: float = 1.5,
        hardware: str = CPU) -> str:
    """One suite run of identical code: step time scaled by `time_factor` (injected noise)."""
    store["clock"][0] += 60_000  # distinct, increasing start times
    metrics = {"final_loss": loss, "step_time_p50_s": 0.1 * time_factor, "tokens_per_s": 2560 / time_factor,
               "peak_rss_mb": 900.0, "eval/top1": top1, "eval/loss": eval_loss}
    return log_suite_run(store["client"], "bench-compare-test", name, {"tiny": metrics}, hardware, "abc123",
                         start_time=store["clock"][0])


def test_identical_code_under_30pct_timing_noise_passes(store, capsys):
    suite = suite_file(store, "noise")
    rng = np.random.default_rng(0)
    for f in rng.uniform(0.7, 1.3, 5):
        log(store, "noise", f)
    # The extremes first, then a seeded sweep: every candidate is the same code.
    for f in [1.3, 0.7, *rng.uniform(0.7, 1.3, 8)]:
        run = log(store, "noise", f)
        assert compare(suite, tracking_uri=store["uri"], run_id=run, plot=False) == 0, f
    out = capsys.readouterr().out
    assert "median of 5" in out and "REGRESSION" not in out


def test_noise_band_adapts_to_a_quiet_baseline(store, capsys):
    """On a quiet machine (±2%) the band is small, so a real slowdown is caught."""
    suite = suite_file(store, "quiet", {"step_time_p50_s": {"relative": 0.05}, "tokens_per_s": {"relative": 0.05}})
    for f in (1.0, 1.02, 0.98, 1.01, 0.99):
        log(store, "quiet", f)
    assert compare(suite, tracking_uri=store["uri"], run_id=log(store, "quiet", 1.01), plot=False) == 0
    slow = log(store, "quiet", 1.30)
    assert compare(suite, tracking_uri=store["uri"], run_id=slow, plot=False) == 1
    out = capsys.readouterr().out
    # +30% step time = 23% fewer tokens/s; band = spread of the baseline (4%), limit 5% + 4%.
    assert "regression in tiny/step_time_p50_s, tiny/tokens_per_s" in out


def test_median_of_last_runs_not_best_of(store):
    """One lucky baseline run (loss 1.8) does not make ordinary runs (2.0) regress."""
    suite = suite_file(store, "median")
    for loss in (2.0, 2.0, 1.8, 2.0, 2.0):
        log(store, "median", loss=loss)
    assert compare(suite, tracking_uri=store["uri"], run_id=log(store, "median", loss=2.0), plot=False) == 0
    # ... and a run 10% above the median does regress (threshold 5%).
    assert compare(suite, tracking_uri=store["uri"], run_id=log(store, "median", loss=2.2), plot=False) == 1


def test_eval_metric_regression_fails_with_direction(store, capsys):
    suite = suite_file(store, "evalgate")
    for f in (1.0, 1.25, 0.75, 1.1, 0.9):
        log(store, "evalgate", f)
    capsys.readouterr()
    # top-1 0.3 points lower, eval loss 1% higher: inside the limits (0.5 points, 2%).
    assert compare(suite, tracking_uri=store["uri"], run_id=log(store, "evalgate", 1.2, top1=0.697, eval_loss=1.515),
                   plot=False) == 0
    # A better top-1 is never a regression (higher is better) ...
    assert compare(suite, tracking_uri=store["uri"], run_id=log(store, "evalgate", top1=0.80), plot=False) == 0
    capsys.readouterr()
    # ... a drop of one point is, whatever the timing noise does.
    bad = log(store, "evalgate", 0.8, top1=0.69)
    assert compare(suite, tracking_uri=store["uri"], run_id=bad) == 1
    out = capsys.readouterr().out
    assert "regression in tiny/eval/top1" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| tiny/")}
    assert "REGRESSION" in rows["tiny/eval/top1"] and "higher" in rows["tiny/eval/top1"]
    assert "-1.4%" in rows["tiny/eval/top1"]  # (0.69 - 0.70) / 0.70, signed so that + is better
    assert "ok" in rows["tiny/step_time_p50_s"]
    # The plot and table went to the candidate run.
    names = [a.path for a in store["client"].list_artifacts(bad, "comparisons")]
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".md") for n in names)


def test_first_run_passes_with_a_note(store, capsys):
    suite = suite_file(store, "fresh")
    log(store, "fresh", hardware="8x NVIDIA H100 80GB HBM3 (1 GPU/worker, driver 550.54.15)")
    # The only earlier run is on other hardware: still no baseline for this one.
    assert main(["bench", "compare", suite, "--tracking-uri", store["uri"]]) == 0
    log(store, "fresh")
    assert main(["bench", "compare", suite, "--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    assert out.count("note: no baseline yet for suite 'fresh' on hardware") == 2


def test_usage_and_lookup_errors_exit_2_with_one_line(store, capsys):
    suite = suite_file(store, "lookup")
    # No run of the suite at all.
    assert main(["bench", "compare", suite, "--tracking-uri", store["uri"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished run of suite 'lookup'" in err
    log(store, "lookup")
    for args, message in ((["--baseline", "deadbeef"], "--baseline deadbeef: no such MLflow run"),
                          (["--run", "deadbeef"], "--run deadbeef: no such MLflow run"),
                          (["--baseline", log(store, "other-suite")], "a run of suite 'other-suite', not 'lookup'")):
        assert main(["bench", "compare", suite, "--tracking-uri", store["uri"], *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["bench", "compare", suite, "--tracking-uri", f"sqlite:///{store['root']}/nowhere.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MLflow store at" in err and not (store["root"] / "nowhere.db").exists()
    bad = store["root"] / "bad.yaml"
    bad.write_text(yaml.safe_dump({"suite": "x", "runs": [{"name": "a", "config": "c.yaml"}],
                                   "thresholds": {"eval/bleu": {"relative": 0.1}}}))
    assert main(["bench", "compare", str(bad), "--tracking-uri", store["uri"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "thresholds.eval/bleu: say which way is better" in err


def test_each_comparison_gets_its_own_plot(store):
    suite = suite_file(store, "plots")
    log(store, "plots")
    run = log(store, "plots", 1.2, top1=0.6)
    assert compare(suite, tracking_uri=store["uri"], run_id=run) == 1
    assert compare(suite, tracking_uri=store["uri"], run_id=run) == 1
    pngs = [a.path for a in store["client"].list_artifacts(run, "comparisons") if a.path.endswith(".png")]
    assert len(pngs) == 2 and len(set(pngs)) == 2
    local = store["client"].download_artifacts(run, pngs[0], str(store["root"]))
    assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
