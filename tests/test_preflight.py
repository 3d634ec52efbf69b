"""Refused before Ray starts, with the key or path named: an unwritable or full
checkpoint dir, an unknown preset, a model kind that does not fit the data, an empty
config file, a relative run_dir inside a Ray job, a plain re-run into a used run_dir."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from distreg.cli import main


def _train(capsys, *argv: str) -> str:
    import ray

    was_up = ray.is_initialized()
    assert main(["train", *argv]) == 2
    if not was_up:
        assert not ray.is_initialized()  # refused before Ray started
    return capsys.readouterr().err


def _base(token_data: str, run_dir) -> list[str]:
    return ["--set", f"data.path={token_data}", "--set", f"run_dir={run_dir}", "--set", "data.seq_len=32",
            "--set", "train.global_batch_size=8"]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write to, root included (chattr +i), or chmod when not root."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)]).returncode:
            pytest.skip("running as root without chattr +i: cannot make a read-only directory")
        yield path
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


def test_unwritable_checkpoint_dir(capsys, token_data, tmp_path, read_only_dir):
    err = _train(capsys, "configs/quickstart.yaml", *_base(token_data, tmp_path / "run"),
                 "--set", f"checkpoint.dir={read_only_dir / 'ckpt'}")
    assert f"checkpoint.dir: cannot write to {read_only_dir / 'ckpt'}" in err


def test_checkpoint_dir_without_room_for_one_checkpoint(capsys, token_data, tmp_path):
    # A vocabulary whose embedding alone (fp32 weights + AdamW moments) needs twice the
    # free space of the disk holding tmp_path: the plan's estimate says it cannot fit.
    free = shutil.disk_usage(tmp_path).free
    vocab = int(2 * free / (12 * 64)) + 1  # llama-tiny: dim 64; untied output head doubles it again
    err = _train(capsys, "configs/quickstart.yaml", *_base(token_data, tmp_path / "run"),
                 "--set", f"model.vocab_size={vocab}", "--set", "scaling.num_workers=1", "--set", "strategy.name=ddp")
    assert f"run_dir (checkpoints): {tmp_path / 'run' / 'checkpoints'} has" in err
    assert "GiB free but one checkpoint needs about" in err


def test_unknown_preset_and_kind_data_mismatch(capsys, token_data, tmp_path):
    err = _train(capsys, "configs/quickstart.yaml", *_base(token_data, tmp_path / "a"), "--set", "model.preset=llama-huge")
    assert "model.preset: unknown preset 'llama-huge'" in err
    err = _train(capsys, "configs/quickstart.yaml", *_base(token_data, tmp_path / "b"), "--set", "model.kind=torchvision")
    assert "model.kind=torchvision trains on data.kind imagenet, but data.kind=tokens" in err


def test_empty_config_file(capsys, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    assert f"{empty}: the config file is empty" in _train(capsys, str(empty))


def test_relative_run_dir_inside_a_ray_job(capsys, token_data, monkeypatch, tmp_path):
    # What Ray sets for a `ray job submit` entrypoint; the cwd would be Ray's package folder.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_x"}}')
    monkeypatch.delenv("DISTREG_RUN_ROOT", raising=False)
    args = _base(token_data, "runs/rel")
    err = _train(capsys, "configs/quickstart.yaml", *args)
    assert "run_dir: 'runs/rel' is relative and this is a Ray job" in err and "DISTREG_RUN_ROOT" in err
    # With DISTREG_RUN_ROOT it resolves there (and the preflight's test write lands there).
    monkeypatch.setenv("DISTREG_RUN_ROOT", str(tmp_path / "root"))
    from distreg.config import load_config
    from distreg.launch import prepare

    cfg = prepare(load_config("configs/quickstart.yaml", [a for a in args if a != "--set"]))
    assert cfg.run_dir == str(tmp_path / "root" / "runs" / "rel")
