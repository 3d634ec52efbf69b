"""HF interop on 2 gloo ranks: `model.init_from: hf://` with `init_device: meta` under
fsdp2 and ZeRO-3 (and replicated under ZeRO-2) equals the single-process import bitwise,
each sharded rank reading only about its share of the values; after a training step,
exporting the 2-rank fsdp2 (DCP), ZeRO-3 and ZeRO-2 checkpoints gives the same files as
exporting the gathered weights from one process."""
from __future__ import annotations

import os

import pytest
import torch

from distreg.runtime.comm import Comm
from distreg.testing import gather_full_params, run_distributed
from tests.conftest import tiny_config

pytest.importorskip("transformers")

STRATEGIES = {"fsdp2": {"strategy.name": "fsdp2"}, "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
              "zero2": {"strategy.name": "deepspeed", "strategy.zero_stage": 2}}
SHARDED = ("fsdp2", "zero3")  # meta init, sliced reads; ZeRO-2 replicates the parameters


def run_config(data: str, root: str, name: str, hf_dir: str, world: int):
    return tiny_config(data, f"{root}/{name}", **{
        "scaling.num_workers": world, "train.max_steps": 1, "model.preset": "null",
        "model.init_from": f"hf://{hf_dir}", **(STRATEGIES[name] if world > 1 else {"strategy.name": "ddp"}),
        **({"model.init_device": "meta"} if name in SHARDED else {})})


def import_and_train(data: str, root: str, hf_dir: str) -> dict:
    from distreg.interop.safetensors_dir import SafetensorsDir
    from distreg.runtime.trainer import Trainer

    values_read = [0]
    rows = SafetensorsDir.rows

    def counting_rows(self, name, start, stop):  # how much of the files this rank reads
        out = rows(self, name, start, stop)
        values_read[0] += out.numel()
        return out

    SafetensorsDir.rows = counting_rows
    out = {}
    for name in STRATEGIES:
        values_read[0] = 0
        trainer = Trainer(run_config(data, root, name, hf_dir, 2), Comm(), track=False)
        out[f"read_{name}"] = values_read[0]
        out[f"import_{name}"] = gather_full_params(trainer.ctx.local_shards(), trainer.comm)
        trainer.fit()
        out[f"trained_{name}"] = gather_full_params(trainer.ctx.local_shards(), trainer.comm)
    return out


@pytest.fixture(scope="module")
def runs(token_data, tmp_path_factory):
    from tests.test_hf_interop import save_transformers_model

    root = str(tmp_path_factory.mktemp("hfdist"))
    hf_dir = f"{root}/hf"
    save_transformers_model(hf_dir)  # GQA: 4 heads, 2 KV heads; several safetensors files
    return root, hf_dir, run_distributed(import_and_train, 2, token_data, root, hf_dir)


def test_meta_init_from_hf_equals_the_single_process_import(runs, token_data):
    from distreg.interop.hf_import import load_hf_into
    from distreg.models import build_model

    root, hf_dir, ranks = runs
    cfg = run_config(token_data, root, "single", hf_dir, 1)
    single = build_model(cfg.model, seed=1)
    load_hf_into(single, hf_dir)
    total = sum(p.numel() for p in single.parameters())
    for name in STRATEGIES:
        got = ranks[0][f"import_{name}"]
        assert set(got) == set(dict(single.named_parameters()))
        for key, p in single.named_parameters():
            assert torch.equal(got[key].view(p.shape), p.detach()), (name, key)
        # sliced reads: each rank reads about half the values (whole rotary heads at the ends)
        for rank in ranks:
            assert rank[f"read_{name}"] < 0.7 * total if name in SHARDED else rank[f"read_{name}"] == total, name
        assert ranks[0][f"read_{name}"] + ranks[1][f"read_{name}"] >= total


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_export_of_a_two_rank_checkpoint_equals_the_one_process_export(runs, token_data, tmp_path, name):
    from distreg.interop.hf_export import export_hf
    from distreg.models import build_model

    root, hf_dir, ranks = runs
    cfg = run_config(token_data, root, name, hf_dir, 2)
    trained = ranks[0][f"trained_{name}"]
    model = build_model(cfg.model, 0, "meta")
    assert not all(torch.equal(trained[k], ranks[0][f"import_{name}"][k]) for k in trained)  # a step was taken
    torch.save({k: trained[k].view(p.shape).clone() for k, p in model.named_parameters()}, tmp_path / "gathered.pt")
    from_ranks = export_hf(cfg, f"{root}/{name}/checkpoints", str(tmp_path / "ranks"), max_shard_size=60_000,
                           record=False)
    export_hf(cfg, str(tmp_path / "gathered.pt"), str(tmp_path / "one"), max_shard_size=60_000, record=False)
    assert from_ranks["step"] == 1 and from_ranks["files"] > 1
    files = sorted(f for f in os.listdir(tmp_path / "one") if f.endswith(".safetensors"))
    assert files == sorted(f for f in os.listdir(tmp_path / "ranks") if f.endswith(".safetensors"))
    for f in files + ["model.safetensors.index.json", "config.json"]:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "ranks" / f).read_bytes(), f
