"""Held-out evaluation: exact sharding, hand-checked sums, rank invariance on 1/2/3
gloo ranks under ddp / fsdp2 / ZeRO-3, masks re-applied on load, `distreg eval` on
fsdp2 and ZeRO-3 checkpoints, one-line errors, keep_best pruning."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from distreg.runtime.loss import IGNORE_INDEX
from distreg.testing import run_distributed
from tests.conftest import record_eval_losses, tiny_config

VAL_WINDOWS = 101  # held-out samples: prime, so no world size 2 or 3 divides it
SEQ = 32
PRUNE = "[{name: magnitude_pruning, sparsity: 0.5, plot: false}]"


@pytest.fixture(scope="module")
def val_data(tmp_path_factory) -> str:
    from distreg.data.token_format import write_token_shards
    import numpy as np

    path = str(tmp_path_factory.mktemp("val") / "val")
    rng = np.random.default_rng(7)
    # Two shards of 60 and 41 windows of 32 tokens (+1 token each to close the last window).
    write_token_shards(path, [rng.integers(0, 256, 60 * SEQ + 1), rng.integers(0, 256, 41 * SEQ + 1)], 256)
    return path


# -- the reader and the sums, in this process ----------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_heldout_counts_every_sample_once(val_data, tmp_path, world):
    from distreg.data.heldout import build_heldout

    cfg = tiny_config(val_data, str(tmp_path), **{"eval.path": val_data, "eval.batch_size": 8})
    seen, batches = [], set()
    for rank in range(world):
        h = build_heldout(cfg, rank, world)
        got = list(h.batches())
        batches.add(len(got))
        for b in got:
            assert b["input"].shape == (8, SEQ)
            real = b["index"] >= 0
            assert (b["target"][~real] == IGNORE_INDEX).all()  # padding carries no target
            seen += b["index"][real].tolist()
    assert sorted(seen) == list(range(VAL_WINDOWS))
    assert len(batches) == 1  # every rank runs the same number of forwards


def test_batch_sums_by_hand():
    from distreg.runtime.evaluate import batch_sums, metrics_from_sums

    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7)
    target = torch.randint(0, 7, (3, 4))
    target[1, 2] = IGNORE_INDEX
    target[2] = IGNORE_INDEX  # a padding row
    source = torch.tensor([0, 1, -1])
    sums = batch_sums(logits, target, source, 2)
    for row, s in ((0, 0), (1, 1)):
        valid = target[row] != IGNORE_INDEX
        ce = F.cross_entropy(logits[row][valid], target[row][valid], reduction="sum")
        assert sums[s, 0].item() == pytest.approx(ce.item(), rel=1e-6)
        assert sums[s, 1].item() == valid.sum().item()
        assert sums[s, 2].item() == (logits[row].argmax(-1) == target[row])[valid].sum().item()
        assert sums[s, 4].item() == 1
    m = metrics_from_sums(sums, ["a", "b"], "tok")
    assert m["eval/loss"] == pytest.approx(sums[:, 0].sum().item() / 7)
    assert m["eval/ppl"] == pytest.approx(math.exp(m["eval/loss"]))
    assert m["eval/samples"] == 2 and m["eval/a/tokens"] == 4 and m["eval/b/tokens"] == 3
    # Vision: top-1 / top-5 of [batch, classes] logits.
    logits = torch.tensor([[0., 1, 2, 3, 4, 5, 6], [6., 5, 4, 3, 2, 1, 0]])
    v = metrics_from_sums(batch_sums(logits, torch.tensor([6, 6]), torch.tensor([0, 0]), 1), ["all"], "img")
    assert v["eval/top1"] == 0.5 and v["eval/top5"] == 0.5  # class 6 is last of 7 in row 2


def test_keep_best_survives_pruning(tmp_path):
    from distreg.config import KeepBestConfig
    from distreg.runtime.checkpoint import MARKER, _prune, best_checkpoint, save_torch, step_path

    root = str(tmp_path)
    for step, loss in ((1, 3.0), (2, 1.5), (3, 2.0), (4, None), (5, 2.5)):
        save_torch(f"{step_path(root, step)}/trainer.pt", {"step": step, **({"eval": {"eval/loss": loss}} if loss else {})})
        (tmp_path / f"step_{step:08d}" / MARKER).write_text("x")
    best = best_checkpoint(root, KeepBestConfig(metric="eval/loss", mode="min"))
    assert best == step_path(root, 2)
    assert best_checkpoint(root, KeepBestConfig(metric="eval/loss", mode="max")) == step_path(root, 1)
    _prune(root, 2, best)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004", "step_00000005"]


# -- rank invariance across world sizes and strategies ---------------------------------------
STRATEGIES = {"ddp": {"strategy.name": "ddp"}, "fsdp2": {"strategy.name": "fsdp2"},
              "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3}}


def _cfg(data, val, run_dir, world, **extra):
    return tiny_config(data, run_dir, **{"scaling.num_workers": world, "eval.path": val, "eval.batch_size": 4,
                                         "hooks": PRUNE, **extra})


def _train(data: str, val: str, run_dir: str) -> dict:
    """2 ranks: fsdp2 with one-shot magnitude pruning (masks in the hook state), 2 steps,
    eval each step; then a ZeRO-3 checkpoint of the same weights (init_from, saved at
    step 0, no hooks)."""
    from distreg.runtime.comm import Comm
    from distreg.runtime.trainer import Trainer

    cfg = _cfg(data, val, f"{run_dir}/fsdp2", 2, **{"train.max_steps": 3, "eval.every": 1, "checkpoint.every": 1,
                                                   "checkpoint.keep_last": 1,
                                                   "checkpoint.keep_best": "{metric: eval/loss, mode: min}"})
    trainer = Trainer(cfg, Comm(), track=False)
    history = record_eval_losses(trainer)
    result = trainer.fit()
    z = _cfg(data, val, f"{run_dir}/zero3", 2, **STRATEGIES["zero3"], **{"model.init_from": result.checkpoint,
                                                                        "hooks": "[]"})
    zero3 = Trainer(z, Comm(), track=False).save()
    from distreg.runtime.checkpoint import complete_checkpoints, load_torch

    kept = {step: load_torch(f"{path}/trainer.pt")["eval"]["eval/loss"] for step, path in complete_checkpoints(cfg.checkpoint_dir)}
    return {"fsdp2": result.checkpoint, "zero3": zero3, "train_eval": result.eval, "kept": kept, "history": history}


def test_keep_best_in_training(runs):
    ckpts, _, _ = runs
    kept, history = ckpts["kept"], ckpts["history"]  # step -> eval/loss (kept checkpoints; every eval)
    assert sorted(history) == [1, 2, 3]
    best = min(history, key=lambda s: (history[s], s))
    assert set(kept) == {3, best}  # keep_last: 1, plus the best
    assert all(kept[s] == history[s] for s in kept)  # the metric travelled with the checkpoint


def _evaluate_all(data: str, val: str, run_dir: str, world: int, jobs: list) -> dict:
    from distreg.runtime.eval_checkpoint import eval_config, evaluate_checkpoint

    out = {}
    for key, strategy, ckpt in jobs:
        cfg = eval_config(_cfg(data, val, f"{run_dir}/eval", 1, **STRATEGIES[strategy]), world)
        out[key] = evaluate_checkpoint(cfg, ckpt)["metrics"]
    return out


def _perturb(ckpt: str, out: str) -> str:
    """A copy of the fsdp2 checkpoint whose masked (zero) weights were moved off zero;
    also the perturbed weights as a plain state dict (no masks) beside it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns("model"))
    state: dict = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(f"{ckpt}/model"),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    g = torch.Generator().manual_seed(0)
    moved = 0
    for name, t in state["model"].items():
        if t.ndim == 2 and not name.startswith("tok_embeddings"):
            zero = t == 0
            moved += int(zero.sum())
            t[zero] = 0.05 * torch.randn(int(zero.sum()), generator=g)
    assert moved > 0
    dcp.save(state, storage_writer=dcp.FileSystemWriter(f"{out}/model"), no_dist=True)
    torch.save(state["model"], f"{out}.pt")
    return out


@pytest.fixture(scope="module")
def runs(token_data, val_data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("evalruns"))
    ckpts = run_distributed(_train, 2, token_data, val_data, run_dir)[0]
    ckpts["perturbed"] = _perturb(ckpts["fsdp2"], f"{run_dir}/perturbed/step_00000002")
    jobs = [("fsdp2@ddp", "ddp", ckpts["fsdp2"]), ("fsdp2@fsdp2", "fsdp2", ckpts["fsdp2"]),
            ("fsdp2@zero3", "zero3", ckpts["fsdp2"]), ("zero3@fsdp2", "fsdp2", ckpts["zero3"]),
            ("perturbed@fsdp2", "fsdp2", ckpts["perturbed"]), ("perturbed_nomask@fsdp2", "fsdp2", ckpts["perturbed"] + ".pt")]
    by_world = {w: run_distributed(_evaluate_all, w, token_data, val_data, run_dir, w, jobs if w == 3 else jobs[:4])[0]
                for w in (1, 3)}
    return ckpts, by_world, run_dir


KEYS = ("eval/loss", "eval/ppl", "eval/accuracy")


def test_rank_and_strategy_invariant(runs):
    ckpts, by_world, _ = runs
    ref = by_world[1]["fsdp2@fsdp2"]
    assert ref["eval/samples"] == VAL_WINDOWS and ref["eval/tokens"] == VAL_WINDOWS * SEQ
    assert 0 < ref["eval/accuracy"] < 1 and ref["eval/loss"] > 0
    # The evaluation during training (2 ranks, fsdp2) saw the same model.
    for k in KEYS:
        assert ckpts["train_eval"][k] == pytest.approx(ref[k], abs=1e-6, rel=1e-6)
    for world, results in by_world.items():
        for key in ("fsdp2@ddp", "fsdp2@fsdp2", "fsdp2@zero3", "zero3@fsdp2"):
            assert results[key]["eval/samples"] == VAL_WINDOWS, (world, key)
            for k in KEYS:
                assert results[key][k] == pytest.approx(ref[k], abs=1e-6, rel=1e-6), (world, key, k)


def test_masks_reapplied_on_load(runs):
    _, by_world, _ = runs
    ref, res = by_world[1]["fsdp2@fsdp2"], by_world[3]
    for k in KEYS:
        assert res["perturbed@fsdp2"][k] == pytest.approx(ref[k], abs=1e-6, rel=1e-6)
    # Without its masks the perturbed model evaluates differently: the masks did the work.
    assert abs(res["perturbed_nomask@fsdp2"]["eval/loss"] - ref["eval/loss"]) > 1e-4


# -- the command ---------------------------------------------------------------------------
def _write_config(tmp_path, data, val, **extra) -> str:
    import yaml

    cfg = {"run_dir": str(tmp_path / "run"), "data": {"path": data, "seq_len": SEQ},
           "eval": {"path": val, "batch_size": 4}, "train": {"global_batch_size": 8},
           "scaling": {"num_workers": 2}, "hooks": [{"name": "magnitude_pruning", "sparsity": 0.5, "plot": False}]}
    cfg.update(extra)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_cli_fsdp2_and_zero3_checkpoints(runs, token_data, val_data, tmp_path):
    from distreg.cli import main

    ckpts, by_world, _ = runs
    ref = by_world[1]["fsdp2@fsdp2"]
    config = _write_config(tmp_path, token_data, val_data)
    got = {}
    for name, ckpt, world, extra in (("fsdp2_w1", ckpts["fsdp2"], 1, []), ("fsdp2_w2", ckpts["fsdp2"], 2, []),
                                     ("zero3_w2", ckpts["zero3"], 2, ["--set", "strategy.name=deepspeed"])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", config, "--checkpoint", ckpt, "--world-size", str(world), "--out", str(out), *extra]) == 0
        got[name] = json.loads(out.read_text())
        assert got[name]["world_size"] == world
    assert got["zero3_w2"]["strategy"] == "deepspeed-zero3"
    for name, report in got.items():
        for k in KEYS:
            assert report["metrics"][k] == pytest.approx(ref[k], abs=1e-6, rel=1e-6), (name, k)
    # A new MLflow run tagged with the checkpoint, holding the metrics.
    from mlflow.tracking import MlflowClient

    from distreg.tracking.mlflow_tracker import default_tracking_uri

    run = MlflowClient(default_tracking_uri(str(tmp_path / "run"))).get_run(got["zero3_w2"]["mlflow_run_id"])
    assert run.data.tags["distreg.checkpoint"] == ckpts["zero3"]
    assert run.data.metrics["eval/loss"] == pytest.approx(ref["eval/loss"], rel=1e-6)


def test_cli_one_line_errors(runs, token_data, val_data, tmp_path, capsys):
    from distreg.cli import main

    ckpts, _, _ = runs
    config = _write_config(tmp_path, token_data, val_data)
    cases = [(["--checkpoint", str(tmp_path / "missing")], "no such file or directory"),
             (["--checkpoint", str(tmp_path)], "no complete checkpoint"),
             (["--checkpoint", ckpts["fsdp2"], "--set", "model.dim=48"], "does not match the model"),
             (["--checkpoint", ckpts["zero3"], "--set", "model.n_layers=3"], "does not match the model"),
             (["--checkpoint", ckpts["fsdp2"], "--set", "eval.path=" + str(tmp_path / "nodata")], "no token dataset")]
    for args, expect in cases:
        assert main(["eval", config, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expect in err, err


def test_metrics_to_the_training_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from distreg.eval_cli import log_to_mlflow
    from distreg.tracking.mlflow_tracker import default_tracking_uri

    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"), **{"eval.path": str(tmp_path)})
    client = MlflowClient(default_tracking_uri(cfg.run_dir))
    run_id = client.create_run(client.create_experiment("training")).info.run_id
    out = tmp_path / "eval.json"
    out.write_text("{}")
    report = {"metrics": {"eval/loss": 2.5, "eval/ppl": math.exp(2.5), "eval/accuracy": float("nan")},
              "step": 7, "checkpoint": "/ckpt/step_00000007", "strategy": "fsdp2", "world_size": 2}
    assert log_to_mlflow(cfg, report, str(out), run_id) == run_id
    history = client.get_metric_history(run_id, "eval/loss")
    assert [(m.step, m.value) for m in history] == [(7, 2.5)]
    assert "eval/accuracy" not in client.get_run(run_id).data.metrics  # NaN left out
    assert client.get_run(run_id).data.tags["distreg.eval_checkpoint.step_7"] == "/ckpt/step_00000007"


def test_eval_config_errors(token_data, tmp_path):
    from distreg.config import ConfigError

    with pytest.raises(ConfigError, match="checkpoint.keep_best needs held-out data"):
        tiny_config(token_data, str(tmp_path), **{"checkpoint.keep_best": "{metric: eval/loss}"})
    with pytest.raises(ConfigError, match="eval.sources is only used by eval.kind=mixture"):
        tiny_config(token_data, str(tmp_path), **{"eval.sources": f"[{{name: a, path: {token_data}}}]"})
    with pytest.raises(ConfigError, match="eval.kind=mixture needs eval.sources"):
        tiny_config(token_data, str(tmp_path), **{"eval.kind": "mixture", "eval.path": token_data})


def test_mixture_metrics_per_source(token_data, val_data, tmp_path):
    """Per-source sums add up to the totals; max_samples caps each source."""
    from distreg.models import build_model
    from distreg.runtime.comm import Comm
    from distreg.runtime.evaluate import Evaluator

    cfg = tiny_config(token_data, str(tmp_path), **{
        "eval.kind": "mixture", "eval.max_samples": 37, "eval.batch_size": 8,
        "eval.sources": f"[{{name: synth, path: {token_data}}}, {{name: random, path: {val_data}}}]"})
    model = build_model(cfg.model, 0, "cpu")
    m = Evaluator(cfg, Comm(), torch.device("cpu")).run(model, model)
    assert m["eval/synth/samples"] == 37 and m["eval/random/samples"] == 37 and m["eval/samples"] == 74
    assert m["eval/synth/tokens"] == 37 * SEQ
    total = (m["eval/synth/loss"] * m["eval/synth/tokens"] + m["eval/random/loss"] * m["eval/random/tokens"]) / (74 * SEQ)
    assert m["eval/loss"] == pytest.approx(total, rel=1e-9)
    assert m["eval/synth/loss"] != m["eval/random/loss"]


def test_cli_bad_run_id_before_compute(token_data, val_data, tmp_path, capsys):
    """A state-dict file passes the checks; the unknown --run-id is refused before any
    process starts, in one line."""
    from distreg.cli import main
    from distreg.models import build_model

    config = _write_config(tmp_path, token_data, val_data)
    model_pt = tmp_path / "model.pt"
    torch.save(build_model(tiny_config(token_data, str(tmp_path)).model, 0, "cpu").state_dict(), model_pt)
    assert main(["eval", config, "--checkpoint", str(model_pt), "--run-id", "0123456789abcdef"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--run-id 0123456789abcdef: no such MLflow run" in err, err


def test_eval_mode_is_the_inference_model(token_data, val_data, tmp_path):
    """The Evaluator's numbers are those of the model in eval mode: Dice on its running
    statistics (not the batch's), nested dropout at `eval_keep`; training mode restored."""
    from distreg.data.heldout import build_heldout
    from distreg.hooks.base import HookContext
    from distreg.hooks.registry import build_hooks
    from distreg.models import build_model
    from distreg.runtime.comm import Comm
    from distreg.runtime.evaluate import Evaluator, batch_sums

    def direct(cfg, model):
        h = build_heldout(cfg, 0, 1)
        with torch.no_grad():
            sums = sum(batch_sums(model(b["input"]), b["target"], b["source"], 1) for b in h.batches())
        return float(sums[0, 0] / sums[0, 1])

    cfg = tiny_config(token_data, str(tmp_path), **{"eval.path": val_data, "model.ffn_activation": "dice",
                                                    "hooks": "[{name: nested_dropout, sigma: 4, eval_keep: 16}]"})
    model = build_model(cfg.model, 0, "cpu")
    for name, buf in model.named_buffers():  # running statistics far from a batch's own moments
        if name.endswith("running_mean"):
            buf.fill_(0.5)
    ctx = HookContext(comm=Comm(), strategy="ddp", model=model)
    for hook in build_hooks(cfg.hooks):
        hook.prepare_model(model, ctx)
    model.train()
    got = Evaluator(cfg, Comm(), torch.device("cpu")).run(model, model)["eval/loss"]
    assert model.training
    model.eval()
    assert got == pytest.approx(direct(cfg, model), rel=1e-9)
    model.train()
    assert abs(direct(cfg, model) - got) > 1e-4  # batch moments and random keeps give other numbers
