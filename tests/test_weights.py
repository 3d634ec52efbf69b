"""Whole-model weights read back from 2-rank fsdp2 and ZeRO-3 checkpoints, in one process,
equal the weights the ranks held (gathered from their shards) when they saved."""
from __future__ import annotations

import pytest
import torch

from distreg.models import build_model
from distreg.runtime.comm import Comm
from distreg.runtime.weights import CheckpointError, load_into, load_model_weights, resolve_checkpoint
from distreg.testing import gather_full_params, run_distributed
from tests.conftest import tiny_config

STRATEGIES = {"fsdp2": {"strategy.name": "fsdp2"}, "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3}}


def train_and_save(data: str, root: str) -> dict:
    from distreg.runtime.trainer import Trainer

    out = {}
    for name, extra in STRATEGIES.items():
        cfg = tiny_config(data, f"{root}/{name}", **{"scaling.num_workers": 2, "train.max_steps": 2, **extra})
        trainer = Trainer(cfg, Comm(), track=False)
        trainer.fit()
        out[name] = gather_full_params(trainer.ctx.local_shards(), trainer.comm)
    # model.init_from across strategies: ZeRO-3 (meta init) from the fsdp2 checkpoint, fsdp2 from ZeRO-3's
    for name, source in (("zero3", "fsdp2"), ("fsdp2", "zero3")):
        cfg = tiny_config(data, f"{root}/init_{name}", **{
            "scaling.num_workers": 2, "model.init_device": "meta", "model.init_from": f"{root}/{source}/checkpoints",
            **STRATEGIES[name]})
        trainer = Trainer(cfg, Comm(), track=False)
        out[f"init_{name}"] = gather_full_params(trainer.ctx.local_shards(), trainer.comm)
    return out


@pytest.fixture(scope="module")
def saved(token_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("weights"))
    return root, run_distributed(train_and_save, 2, token_data, root)[0]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_checkpoint_weights_equal_the_trained_weights(saved, name, token_data):
    root, trained = saved
    weights = load_model_weights(f"{root}/{name}/checkpoints")  # the root resolves to the latest step
    assert set(weights) == set(trained[name])
    for key, full in trained[name].items():
        torch.testing.assert_close(weights[key], full.view(weights[key].shape), rtol=0, atol=0, msg=key)
    cfg = tiny_config(token_data, f"{root}/x")
    model = build_model(cfg.model, 0, torch.device("cpu"), True)
    load_into(model, f"{root}/{name}/checkpoints")
    torch.testing.assert_close(model.state_dict()["output.weight"], weights["output.weight"], rtol=0, atol=0)


def test_missing_checkpoint_and_mismatched_model_are_named(saved, tmp_path, token_data):
    root, _ = saved
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(str(tmp_path))
    cfg = tiny_config(token_data, f"{root}/x", **{"model.n_layers": 1})
    model = build_model(cfg.model, 0, torch.device("cpu"), True)
    with pytest.raises(CheckpointError, match="unexpected.*layers.1"):
        load_into(model, f"{root}/fsdp2/checkpoints")


@pytest.mark.parametrize("name,source", [("zero3", "fsdp2"), ("fsdp2", "zero3")])
def test_init_from_a_checkpoint_of_another_strategy(saved, name, source):
    _, trained = saved
    got = trained[f"init_{name}"]
    assert set(got) == set(trained[source])
    for key, full in trained[source].items():
        torch.testing.assert_close(got[key], full, rtol=0, atol=0, msg=key)


def test_init_from_a_state_dict_file_and_bad_files(saved, tmp_path, token_data):
    from distreg.runtime.trainer import Trainer

    root, trained = saved
    weights = load_model_weights(f"{root}/fsdp2/checkpoints")
    torch.save(weights, tmp_path / "model.pt")
    cfg = tiny_config(token_data, str(tmp_path / "run"), **{"scaling.num_workers": 1, "strategy.name": "ddp",
                                                         "model.init_from": str(tmp_path / "model.pt")})
    got = gather_full_params(Trainer(cfg, Comm(), track=False).ctx.local_shards(), Comm())
    for key, full in trained["fsdp2"].items():
        torch.testing.assert_close(got[key], full, rtol=0, atol=0, msg=key)
    del weights["output.weight"]
    torch.save(weights, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="no weights for parameter output.weight"):
        Trainer(cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": str(tmp_path / "partial.pt")})}),
                Comm(), track=False)
