"""Shared fixtures: one small token corpus and a config factory for the tiny Llama."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests skip without a GPU (CI); benchmarks/gpu_check.sh runs them."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> str:
    from distreg.data.tokens import synth_tokens

    path = str(tmp_path_factory.mktemp("data") / "tokens")
    synth_tokens(path, num_tokens=40_000, vocab_size=256, num_shards=3)
    return path


def tiny_config(data_path: str, run_dir: str, **overrides):
    """The tiny-Llama config every multi-process test shares (`--set`-style overrides)."""
    from distreg.config import load_config

    base = {
        "data.path": data_path, "run_dir": run_dir, "data.seq_len": 32,
        "train.global_batch_size": 8, "train.log_every": 1000, "optim.warmup_steps": 0,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every test that needs one."""
    import ray

    ray.init(address="local", num_cpus=4, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server for the session (tests/s3server.py); its environment is exported
    so that Ray clusters started after it reach the store. Make buckets with
    `tests.s3server.new_bucket()`."""
    from tests.s3server import moto_s3

    with moto_s3() as endpoint:
        yield endpoint


def tiny_imagenet_shards(root, min_size: int, max_size: int) -> str:
    """A tiny synthetic ImageNet (4 classes x 8 train images) converted to shards under
    `root`; returns the train split's path (the CNN hook tests' data)."""
    from distreg.data.imagenet_convert import convert_imagenet
    from distreg.data.synth_imagenet import synth_imagenet

    synth_imagenet(str(root / "src"), num_classes=4, train_per_class=8, val_per_class=2, min_size=min_size,
                   max_size=max_size)
    convert_imagenet(str(root / "src"), str(root / "shards"), shard_size=16, processes=1, log=lambda *_: None)
    return str(root / "shards" / "train")


def record_eval_losses(trainer) -> dict[int, float]:
    """{step: eval/loss} of every evaluation the trainer runs from now on (keep_best tests)."""
    history, run_logged = {}, trainer.evaluator.run_logged

    def record(strategy, step, *args):
        metrics = run_logged(strategy, step, *args)
        history[step] = metrics["eval/loss"]
        return metrics

    trainer.evaluator.run_logged = record
    return history
