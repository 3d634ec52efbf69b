"""Conversions as Ray jobs into an S3-compatible server (moto on 127.0.0.1), on a
two-node Ray cluster on this machine: output byte-identical to the local
single-process run; a driver SIGKILLed half-way leaves an incomplete manifest that
`distreg train` refuses (naming the missing shards) before any worker starts; the
re-run writes only the missing shards and yields the same dataset."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.data.objectstore import env_set

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _driver(args: list[str], env: dict) -> subprocess.Popen:
    """`distreg data ...` as its own process (the light entry point: no torch import)."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "distreg.data.cli", *args], env=full_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args: list[str], env: dict) -> str:
    p = _driver(args, env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return out


def _objects(fs, prefix: str) -> dict[str, tuple[str, object]]:
    """name -> (ETag, LastModified) of every object under prefix."""
    fs.invalidate_cache()
    return {p[len(prefix) + 1:]: (info["ETag"], info["LastModified"])
            for p, info in fs.find(prefix, detail=True).items()}


def _kill_when(fs, proc: subprocess.Popen, records: str, at_least: int, total: int) -> None:
    """SIGKILL the driver once `at_least` of `total` task records exist."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        fs.invalidate_cache()
        n = len(fs.glob(records))
        if n >= at_least:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # tasks the dead driver owned finish or die


def _same_dataset(fs, a: str, b: str, names: list[str]) -> None:
    for name in names:
        assert fs.cat(f"{a}/{name}") == fs.cat(f"{b}/{name}"), name


def test_tokenize_two_nodes_kill_and_resume(s3, ray2, tmp_path, capsys):
    bucket = "tok"
    s3.fs.mkdir(bucket)
    s3.fs.pipe({f"{bucket}/src/d{i:03d}.txt": (f"document {i} " * (3 + i % 11)).encode() for i in range(200)})
    args = ["--tokenizer", "bytes", "--task-mb", "0.0015", "--shard-tokens", "512", "--progress-every", "0.5"]
    _run(["tokenize", f"s3://{bucket}/src", f"s3://{bucket}/ref", *args, "--processes", "1"], s3.env)
    ref = _objects(s3.fs, f"{bucket}/ref")
    total = sum(n.startswith("_parts/") for n in ref)
    assert total >= 12

    ray_env = {**s3.env, "RAY_ADDRESS": ray2}
    proc = _driver(["tokenize", f"s3://{bucket}/src", f"s3://{bucket}/ray", *args, "--max-in-flight", "2"], ray_env)
    _kill_when(s3.fs, proc, f"{bucket}/ray/_parts/*.json", 3, total)
    objects = _objects(s3.fs, f"{bucket}/ray")
    done_tasks = {n[len("_parts/task_"):-len(".json")] for n in objects if n.startswith("_parts/")}
    # complete tasks: their records and shards (a killed task may have left shards without a record)
    before = {n: v for n, v in objects.items() if n.startswith("_parts/") or n[6:11] in done_tasks}
    done = len(done_tasks)
    assert 0 < done < total, f"the kill should land half-way ({done} of {total} tasks done)"

    # The half-written dataset is refused by `distreg train` before any worker starts.
    from distreg import cli, launch

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: s3://{bucket}/ray\n")
    launched = []
    with env_set(s3.env), pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "launch", lambda *a, **k: launched.append(1))
        import s3fs

        try:
            assert cli.main(["train", str(cfg)]) == 2
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err
    assert not launched and re.search(r"incomplete dataset.*missing: shard_\d{5}_\*\.bin", err), err
    named = re.findall(r"shard_(\d{5})_\*\.bin", err)
    assert f"{total - done} shard group(s) missing" in err and not done_tasks & set(named)

    out = _run(["tokenize", f"s3://{bucket}/src", f"s3://{bucket}/ray", *args], ray_env)
    after = _objects(s3.fs, f"{bucket}/ray")
    rewritten = [n for n in before if after[n] != before[n]]
    assert rewritten == []  # nothing complete was written again
    written_records = [n for n in after if n.startswith("_parts/") and n not in before]
    assert f"{len(written_records)} tasks written, {total - len(written_records)} already complete" in out
    assert "2 Ray node(s)" in out or len(written_records) < 2
    assert set(after) == set(ref)
    _same_dataset(s3.fs, f"{bucket}/ref", f"{bucket}/ray", sorted(ref))  # index.json, shards, records


def test_imagenet_two_nodes_kill_and_resume(s3, ray2, ilsvrc_tree):
    bucket = "img"
    s3.fs.mkdir(bucket)
    s3.fs.put(ilsvrc_tree + "/", f"{bucket}/src", recursive=True)
    args = ["--shard-size", "3", "--progress-every", "0.5"]
    _run(["imagenet-to-shards", f"s3://{bucket}/src", f"s3://{bucket}/ref", *args, "--processes", "1"], s3.env)
    ref = _objects(s3.fs, f"{bucket}/ref")
    total = sum("/_parts/" in n for n in ref)
    assert total == 16 + 3  # 48 train and 8 val images in shards of 3

    ray_env = {**s3.env, "RAY_ADDRESS": ray2}
    proc = _driver(["imagenet-to-shards", f"s3://{bucket}/src", f"s3://{bucket}/ray", *args, "--max-in-flight", "2"],
                   ray_env)
    _kill_when(s3.fs, proc, f"{bucket}/ray/*/_parts/*.json", 3, total)
    objects = _objects(s3.fs, f"{bucket}/ray")
    records = [n for n in objects if "/_parts/" in n]
    shards = {n.replace("/_parts/", "/")[: -len(".json")] for n in records}
    before = {n: v for n, v in objects.items() if n in records or n in shards}  # complete shards and records
    done = len(records)
    assert 0 < done < total, f"the kill should land half-way ({done} of {total} shards done)"

    from distreg.data.errors import DataError
    from distreg.data.tarshards import ShardIndex

    with env_set(s3.env), pytest.raises(DataError, match=r"incomplete split.*shards missing: shard-0000\d\d\.tar"):
        import s3fs

        try:
            ShardIndex(f"s3://{bucket}/ray/train")
        finally:
            s3fs.S3FileSystem.clear_instance_cache()

    out = _run(["imagenet-to-shards", f"s3://{bucket}/src", f"s3://{bucket}/ray", *args], ray_env)
    after = _objects(s3.fs, f"{bucket}/ray")
    assert [n for n in before if after[n] != before[n]] == []
    written = [n for n in after if "/_parts/" in n and n not in before]
    assert f"{len(written)} shards written, {total - len(written)} already complete" in out
    assert "2 Ray node(s)" in out or len(written) < 2
    assert set(after) == set(ref)
    _same_dataset(s3.fs, f"{bucket}/ref", f"{bucket}/ray", sorted(ref))
