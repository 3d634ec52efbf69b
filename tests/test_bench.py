"""`distreg bench run` + `compare`: two suite runs compare clean, and a regression
(forced by a threshold the test sets) exits non-zero."""
from __future__ import annotations

from pathlib import Path

import yaml

from distreg.bench import compare, load_suite, run_suite

REPO = Path(__file__).resolve().parents[1]


def write_suite(path: Path, data: str, thresholds: dict) -> str:
    entry = {"config": str(REPO / "configs/quickstart.yaml"),
             "overrides": ["train.max_steps=3", f"data.path={data}", "data.seq_len=32", "train.global_batch_size=8"]}
    path.write_text(yaml.safe_dump({
        "suite": "test-smoke", "experiment": "bench-test",
        "runs": [{"name": "nohooks", **entry, "overrides": [*entry["overrides"], "hooks=[]"]},
                 {"name": "param-norm", **entry, "baseline": "nohooks"}],
        "thresholds": thresholds}))
    return str(path)


def test_bench_run_and_compare(ray_cluster, token_data, tmp_path):
    uri = f"sqlite:///{tmp_path}/bench.db"
    # Losses are deterministic, so two runs of the same code agree exactly.
    suite = write_suite(tmp_path / "suite.yaml", token_data, {"final_loss": {"max_increase": 0.01}})
    first = run_suite(suite, str(tmp_path / "out"), uri)
    second = run_suite(suite, str(tmp_path / "out"), uri)
    assert first != second
    assert (next((tmp_path / "out").glob("test-smoke-*")) / "summary.md").exists()
    assert compare(suite, tracking_uri=uri) == 0
    # A threshold no run can meet: the loss must have dropped by 10% since the baseline.
    strict = write_suite(tmp_path / "strict.yaml", token_data, {"final_loss": {"max_increase": -0.10}})
    assert compare(strict, tracking_uri=uri) == 1


def test_shipped_suites_are_valid():
    for path in sorted((REPO / "configs/bench").glob("*.yaml")):
        suite = load_suite(str(path))
        for entry in suite.runs:
            assert (REPO / entry.config).exists(), f"{path.name}: {entry.config}"
