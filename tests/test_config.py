"""Config errors name the key and the file, before any worker starts."""
from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import pytest

from distreg.config import ConfigError, load_config
from distreg.hooks.base import Hook
from distreg.hooks.registry import register


def write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 7\nstrategy:\n  name: deepspeed\n")
    cfg = load_config(path, ["strategy.zero_stage=2", "scaling.num_workers=4", "train.global_batch_size=32"])
    assert (cfg.train.max_steps, cfg.strategy.name, cfg.strategy.zero_stage) == (7, "deepspeed", 2)
    assert cfg.micro_batch_size == 8
    assert cfg.flat()["strategy.zero_stage"] == 2


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  max_stpes: 7\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'train\.max_stpes'"):
        load_config(path)


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: key 'train\.max_steps'.*'many'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"key 'strategy\.zero_stage'"):
        load_config(write(tmp_path, "{}"), ["strategy.zero_stage=4"])


def test_batch_arithmetic_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="global_batch_size=10 is not divisible"):
        load_config(write(tmp_path, "{}"), ["train.global_batch_size=10", "scaling.num_workers=4"])


def test_hook_name_and_params_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"hooks\.0\.name: unknown hook 'nope'"):
        load_config(write(tmp_path, "hooks:\n  - name: nope\n"))
    with pytest.raises(ConfigError, match=r"hooks\.0\.evry: unknown parameter"):
        load_config(write(tmp_path, "hooks:\n  - name: param_norm\n    evry: 3\n"))
    with pytest.raises(ConfigError, match=r"hooks\.0\.every"):
        load_config(write(tmp_path, "hooks:\n  - name: param_norm\n    every: 0\n"))


class _ReplaceA(Hook):
    name, replaces_loss = "test_replace_a", True


class _ReplaceB(Hook):
    name, replaces_loss = "test_replace_b", True


register(_ReplaceA)
register(_ReplaceB)


def test_two_loss_replacing_hooks_are_refused(tmp_path):
    path = write(tmp_path, "hooks:\n  - name: test_replace_a\n  - name: test_replace_b\n")
    with pytest.raises(ConfigError, match="'test_replace_a' and 'test_replace_b' both replace the loss"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))


def test_cli_names_missing_data_path_before_starting_workers(tmp_path):
    path = write(tmp_path, f"data:\n  path: {tmp_path}/no_such_tokens\n")
    proc = subprocess.run([sys.executable, "-m", "distreg.cli", "train", path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{tmp_path}/no_such_tokens" in proc.stderr and "run.yaml" in proc.stderr
    assert "Ray" not in proc.stdout  # nothing was launched


def test_cli_config_show_prints_resolved_config(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 9\n")
    proc = subprocess.run([sys.executable, "-m", "distreg.cli", "config", "show", path, "--set", "train.seed=5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 9" in proc.stdout and "seed: 5" in proc.stdout


@pytest.mark.parametrize("path", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(path):
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / path))
    assert cfg.run_dir


def test_launcher_makes_hook_file_paths_absolute(tmp_path, monkeypatch):
    from distreg.launch import resolve_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "masks.pt").write_bytes(b"")
    hooks = ('[{name: dsnot, mask_file: masks.pt, sparsity: 0.5}, '
             '{name: mba_l2, lam: 0.1, counts_file: s3://bucket/counts.pt}]')
    cfg = resolve_paths(load_config(None, [f"hooks={hooks}", "data.path=tokens"]))
    assert cfg.hooks[0].model_extra["mask_file"] == str(tmp_path / "masks.pt")
    assert cfg.hooks[0].model_extra["sparsity"] == 0.5
    assert cfg.hooks[1].model_extra["counts_file"] == "s3://bucket/counts.pt"  # URLs untouched
    from distreg.hooks.registry import hook_class

    teachers = {"teachers": [{"checkpoint": "t1/ckpt", "config": None}, {"checkpoint": "/abs/t2"}], "coef": 1}
    out = hook_class("distillation").resolve_paths(teachers, lambda p: "/root/" + p if not p.startswith("/") else p)
    assert out == {"teachers": [{"checkpoint": "/root/t1/ckpt", "config": None}, {"checkpoint": "/abs/t2"}], "coef": 1}
