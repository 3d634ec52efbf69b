"""Restartable conversions on the local backend (cheap; the Ray + S3 + SIGKILL version is
test_convert_ray_s3.py): a crash leaves an incomplete manifest that readers and
check_data refuse, naming the missing shards; the re-run writes only those."""
from __future__ import annotations

import json
import os

import pytest

from distreg.data import imagenet_convert, tokenize
from distreg.data.errors import DataError

QUIET = {"log": lambda *_: None, "progress_every": 1e9}


def _crash_after(monkeypatch, module, name: str, n: int) -> None:
    """`module.name` (the per-task function) dies like a killed driver on its call n+1."""
    real, calls = getattr(module, name), []

    def flaky(job):
        if len(calls) == n:
            raise KeyboardInterrupt("simulated crash")
        calls.append(1)
        return real(job)

    monkeypatch.setattr(module, name, flaky)


def test_imagenet_crash_incomplete_refused_then_only_missing_written(ilsvrc_tree, tmp_path, monkeypatch):
    from distreg.config import load_config
    from distreg.data import check_data

    dest = str(tmp_path / "out")
    with monkeypatch.context() as mp:
        _crash_after(mp, imagenet_convert, "write_shard", 2)
        with pytest.raises(KeyboardInterrupt):
            imagenet_convert.convert_imagenet(ilsvrc_tree, dest, shard_size=10, **QUIET)
    manifest = json.load(open(f"{dest}/train/manifest.json"))
    assert manifest["complete"] is False and len(manifest["missing"]) == 5
    cfg = load_config(None, ["data.kind=imagenet", f"data.path={dest}/train", "model.kind=torchvision",
                             "model.num_classes=4"])
    with pytest.raises(DataError, match=r"incomplete split .* 3 of 5 shards missing: shard-000002.tar, "
                                        r"shard-000003.tar, shard-000004.tar"):
        check_data(cfg)
    mtimes = {n: os.path.getmtime(f"{dest}/train/{n}") for n in ("shard-000000.tar", "shard-000001.tar")}
    s = imagenet_convert.convert_imagenet(ilsvrc_tree, dest, shard_size=10, **QUIET)
    assert s["written_shards"] == ["train/shard-000002.tar", "train/shard-000003.tar", "train/shard-000004.tar",
                                   "val/shard-000000.tar"]
    assert all(os.path.getmtime(f"{dest}/train/{n}") == t for n, t in mtimes.items())
    check_data(cfg)
    ref = str(tmp_path / "ref")
    imagenet_convert.convert_imagenet(ilsvrc_tree, ref, shard_size=10, **QUIET)
    for split in ("train", "val"):
        for name in sorted(os.listdir(f"{ref}/{split}")):
            if name != "_parts":
                assert open(f"{ref}/{split}/{name}", "rb").read() == open(f"{dest}/{split}/{name}", "rb").read()


def test_tokenize_crash_then_resume_is_identical(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"d{i:02d}.txt").write_text(f"text {i} " * (i + 2))
    kw = dict(shard_tokens=40, task_bytes=60, progress_every=1e9)
    with monkeypatch.context() as mp:
        _crash_after(mp, tokenize, "run_task", 3)
        with pytest.raises(KeyboardInterrupt):
            tokenize.tokenize_corpus(str(src), str(tmp_path / "out"), **kw)
    from distreg.data.tokens import TokenDataset

    with pytest.raises(DataError, match=r"incomplete dataset .*shard_00003_\*\.bin"):
        TokenDataset(str(tmp_path / "out"), 4)
    s = tokenize.tokenize_corpus(str(src), str(tmp_path / "out"), **kw)
    assert s["written_tasks"] == list(range(3, s["written"] + 3)) and s["skipped"] == 3
    tokenize.tokenize_corpus(str(src), str(tmp_path / "ref"), **kw)
    assert sorted(os.listdir(tmp_path / "ref")) == sorted(os.listdir(tmp_path / "out"))
    for name in os.listdir(tmp_path / "ref"):
        if name != "_parts":
            assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_missing_data_inside_a_ray_job_says_where_to_put_it(monkeypatch, tmp_path):
    from distreg.data.tokens import TokenDataset

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets for a job's driver
    with pytest.raises(DataError, match=r"inside a Ray job: `ray job submit --working-dir` uploads the code, "
                                        r"not the data \(data/ is gitignored\).*s3://"):
        TokenDataset("data/quickstart_tokens", 8)


def test_progress_logged_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"d{i}.txt").write_text("word " * (i + 1))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    s = tokenize.tokenize_corpus(str(src), str(tmp_path / "out"), task_bytes=10, progress_every=0.0, mlflow_uri=uri)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("distreg-data").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data/tokens_done"] == s["num_tokens"] and run.data.metrics["data/files_done"] == 6
    history = client.get_metric_history(run.info.run_id, "data/files_done")
    assert [m.value for m in history][-1] == 6 and len(history) >= 2  # one point per finished task, then final
