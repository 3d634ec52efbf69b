"""`sorsa` hook (SORSA adapters + orthonormal regulariser) and `distreg adapters merge`.

In-process: model surgery on the tiny Llama (same logits at init, residual + principal = W,
only adapters train, the split broadcast from its owner rank is identical on thread ranks);
the regulariser through the hook on thread ranks holding row (FSDP2-like) or flat,
row-cutting (ZeRO-3-like) slices: gradient additions equal (gamma / peak_lr) times autograd
of the reference formula on the whole matrices, decoupled mode steps the weights instead;
validation errors name the field.
Multi-process (one 2-rank spawn): SORSA on a few layers of the tiny Llama, started from a
pretrained checkpoint (`init_from`), 3 steps under ddp / fsdp2 / ZeRO-3 against the single
process: same losses, adapters and metrics; a resumed Trainer takes the same next step;
every checkpoint holds the residual bitwise unchanged; `distreg adapters merge` of each checkpoint gives a plain model with the adapted
model's logits.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from distreg.hooks.base import HookContext, ParamShard
from distreg.hooks.regularizers.sorsa import SorsaLinear
from distreg.models import build_model
from distreg.regularizers.sorsa import orth_loss, principal
from distreg.runtime.comm import Comm
from distreg.testing import gather_full_params, run_distributed
from tests.conftest import tiny_config
from tests.hooks.test_regularizer_hooks import Fake, hook, on_ranks
from tests.threadcomm import run_threads

F64 = torch.float64
SPLITS = [(1, "rows"), (2, "rows"), (3, "flat")]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sorsa(**params):
    return hook("sorsa", **{"peak_lr": 0.5, "gamma": 0.1, **params})


def ctx_for(model: nn.Module, comm=None) -> HookContext:
    return HookContext(comm=comm or Comm(), strategy="ddp", model=model)


# --------------------------------------------------------------------------- model surgery

def tiny_model(seed: int = 0, **overrides):
    return build_model(tiny_config("unused", "unused", **overrides).model, seed)


TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def test_prepare_model_keeps_the_function_and_trains_only_adapters():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(TOKENS)
    h = sorsa(rank=4, alpha=8.0)  # scale 2
    h.prepare_model(model, ctx_for(model))
    assert len(h.layers) == 14 and h.layers[0] == "layers.0.attention.wq"  # 7 projections x 2 blocks
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), ref, rtol=0, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{layer}.{n}" for layer in h.layers for n in ("sorsa_A", "sorsa_S", "sorsa_B")]
    for layer in h.layers:
        mod = model.get_submodule(layer)
        assert isinstance(mod, SorsaLinear) and not mod.weight.requires_grad
        w = mod.weight + principal(mod.sorsa_A, mod.sorsa_S, mod.sorsa_B, 2.0)
        torch.testing.assert_close(w.detach(), before[f"{layer}.weight"], rtol=0, atol=1e-6)
    assert model.tok_embeddings.weight.requires_grad is False

    other = tiny_model()
    sorsa(rank=4, include=["layers.1.feed_forward.w2.weight"], freeze_others=False).prepare_model(other, ctx_for(other))
    assert other.tok_embeddings.weight.requires_grad and not other.layers[1].feed_forward.w2.weight.requires_grad
    assert isinstance(other.layers[0].feed_forward.w2, nn.Linear)


def test_sorsa_linear_with_bias_equals_its_merged_linear():
    lin = nn.Linear(6, 5)
    net = nn.Sequential(lin)
    h = sorsa(rank=2, include=["0.weight"], alpha=1.0)  # scale 1/2
    h.prepare_model(net, ctx_for(net))
    mod = net[0]
    assert isinstance(mod, SorsaLinear) and not mod.bias.requires_grad
    with torch.no_grad():
        for p in (mod.sorsa_A, mod.sorsa_S, mod.sorsa_B):
            p.add_(0.1 * _randn(*p.shape, seed=p.numel()))
    x = _randn(4, 6, seed=9)
    merged = mod.weight + principal(mod.sorsa_A, mod.sorsa_S, mod.sorsa_B, 0.5)
    torch.testing.assert_close(net(x), x @ merged.t() + lin.bias, rtol=0, atol=1e-6)


def test_split_is_computed_on_the_owner_and_broadcast():
    """Two thread ranks: layer j's split comes from rank j % 2; both end bitwise equal to
    each other and to the single-process split."""
    import distreg.hooks.regularizers.sorsa as mod

    calls: dict[int, int] = {}
    orig = mod.svd_split

    def counting(weight, rank, scale):
        import threading

        calls[threading.get_ident()] = calls.get(threading.get_ident(), 0) + 1
        return orig(weight, rank, scale)

    def body(comm):
        model = tiny_model()
        sorsa(rank=3).prepare_model(model, ctx_for(model, comm))
        return {k: v.clone() for k, v in model.state_dict().items()}

    single = body(Comm())
    mod.svd_split = counting
    try:
        ranks = run_threads(body, 2)
    finally:
        mod.svd_split = orig
    assert sorted(calls.values()) == [7, 7]  # 14 layers, round-robin
    for state in ranks:
        assert state.keys() == single.keys()
        for k, v in single.items():
            assert torch.equal(state[k], v), k


def test_validation_errors_name_the_field(tmp_path):
    from distreg.config import ConfigError
    from distreg.hooks.registry import build_hooks
    from distreg.config import HookSpec

    def error(**params):
        with pytest.raises(ConfigError) as e:
            build_hooks([HookSpec.model_validate({"name": "sorsa", **params})])
        return str(e.value)

    assert "unknown parameter" in error(peak_lr=1.0, bogus=1)
    assert "hooks.0.rank" in error(peak_lr=1.0, rank=0)
    assert "hooks.0.mode" in error(peak_lr=1.0, mode="other")
    build_hooks([HookSpec.model_validate({"name": "sorsa", "mode": "decoupled"})])  # no peak_lr needed
    model = tiny_model()
    with pytest.raises(ValueError, match="sorsa.rank: 65 exceeds min"):
        sorsa(rank=65).prepare_model(model, ctx_for(model))
    with pytest.raises(ValueError, match="no nn.Linear weight matches"):
        sorsa(include=["nothing.*"]).prepare_model(model, ctx_for(model))
    meta = build_model(tiny_config("unused", "unused").model, 0, "meta", init=False)
    with pytest.raises(ValueError, match="model.init_device=meta is not supported"):
        sorsa().prepare_model(meta, ctx_for(meta))
    torch.save({"x": torch.ones(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="init_from.*does not match"):
        sorsa(init_from=str(tmp_path / "bad.pt")).prepare_model(model, ctx_for(model))


# --------------------------------------------------------------------------- regulariser on shards

# Two layers, nearly but not exactly orthonormal factors. B [7, 3] on 3 flat ranks is cut at
# elements 7 and 14 (mid-row): the gather route; 2 row ranks: the Gram all-reduce route.
LAYERS = ["l0", "l1"]
FULLS = {"l0.sorsa_A": torch.linalg.qr(_randn(5, 3, seed=1))[0].t() + 0.1 * _randn(3, 5, seed=2),
         "l0.sorsa_B": torch.linalg.qr(_randn(7, 3, seed=3))[0] + 0.1 * _randn(7, 3, seed=4),
         "l1.sorsa_A": torch.linalg.qr(_randn(9, 2, seed=5))[0].t() + 0.1 * _randn(2, 9, seed=6),
         "l1.sorsa_B": torch.linalg.qr(_randn(6, 2, seed=7))[0] + 0.1 * _randn(6, 2, seed=8)}
GRADS = {k: _randn(*v.shape, seed=20 + i) for i, (k, v) in enumerate(FULLS.items())}


def reference(fulls):
    """L_orth (float) and its autograd gradient on the whole matrices (reference formula)."""
    leaves = {k: v.to(F64).requires_grad_() for k, v in fulls.items()}
    value = orth_loss([leaves[f"{n}.sorsa_A"] for n in LAYERS], [leaves[f"{n}.sorsa_B"] for n in LAYERS])
    return float(value.detach()), dict(zip(leaves, torch.autograd.grad(value, list(leaves.values()))))


def run_hook(world, split, base_lr=None, **params):
    def body(f):
        h = sorsa(**params)
        h.layers = LAYERS
        f.ctx.base_lr = base_lr
        h.on_train_start(f.ctx)
        h.after_backward(f.ctx)
        h.after_step(f.ctx)
        return h.metrics(), h.b_routes

    return on_ranks(world, split, FULLS, body, grads=GRADS)


@pytest.mark.parametrize("world,mode", SPLITS)
def test_code_mode_adds_coef_times_the_reference_gradient(world, mode):
    value, ref = reference(FULLS)
    coef = 0.1 / 0.5  # gamma / peak_lr
    weights, grads, results = run_hook(world, mode)
    for k in FULLS:
        torch.testing.assert_close(grads[k], GRADS[k] + coef * ref[k].float(), rtol=1e-6, atol=1e-7, msg=k)
        assert torch.equal(weights[k], FULLS[k].float())  # code mode touches gradients only
    metrics, routes = results[0]
    assert all(r == results[0] for r in results)  # identical on every rank
    assert routes == {1: ["local", "local"], 2: ["gram", "gram"], 3: ["gather", "gram"]}[world]
    assert metrics["sorsa/reg"] == pytest.approx(value, rel=1e-9)
    assert metrics["sorsa/penalty"] == pytest.approx(coef * value, rel=1e-9)
    errs = [torch.linalg.matrix_norm(FULLS[f"{n}.sorsa_A"].to(F64) @ FULLS[f"{n}.sorsa_A"].to(F64).t() - torch.eye(
        FULLS[f"{n}.sorsa_A"].shape[0], dtype=F64)) for n in LAYERS]
    assert metrics["sorsa/orth_error_A"] == pytest.approx(float(sum(errs)) / 2, rel=1e-6)
    assert (metrics["sorsa/rank"], metrics["sorsa/layers"], metrics["sorsa/coef"]) == (128.0, 2.0, pytest.approx(coef))


@pytest.mark.parametrize("world,mode", SPLITS)
def test_decoupled_mode_steps_the_weights(world, mode):
    _, ref = reference(FULLS)
    weights, grads, _ = run_hook(world, mode, mode="decoupled", gamma=0.3)
    for k in FULLS:
        assert torch.equal(grads[k], GRADS[k])
        torch.testing.assert_close(weights[k], FULLS[k] - 0.3 * ref[k].float(), rtol=1e-6, atol=1e-7, msg=k)


def test_descending_the_added_gradient_restores_orthonormality():
    """Gradient steps on the hook's additions alone shrink L_orth every step (the sign and
    size of the term are right, not only its shape)."""
    f = Fake(FULLS, Comm(), "rows")
    h = sorsa(gamma=0.05, peak_lr=1.0)
    h.layers = LAYERS
    h.on_train_start(f.ctx)
    seen = []
    for _ in range(8):
        for g in f.grads.values():
            g.zero_()
        h.after_backward(f.ctx)
        seen.append(h.metrics()["sorsa/reg"])
        for k, w in f.local.items():
            w.sub_(f.grads[k])  # lr 1
    assert all(b < a for a, b in zip(seen, seen[1:])) and seen[-1] < 0.5 * seen[0], seen


def test_code_mode_refused_without_gradient_writes():
    f = Fake(FULLS, Comm(), "rows")
    shards = f.shards()
    f.ctx.shards_fn = lambda: [ParamShard(s.name, s.full_shape, s.flat_start, s.numel, s.replicated, s._read,
                                          s._write, s._grad, None) for s in shards]
    h = sorsa()
    h.layers = LAYERS
    with pytest.raises(RuntimeError, match="does not support gradient writes"):
        h.on_train_start(f.ctx)
    d = sorsa(mode="decoupled")  # writes weights only: fine
    d.layers = LAYERS
    d.on_train_start(f.ctx)


# --------------------------------------------------------------------------- real strategies (one spawn)

STEPS = 3
SORSA = {"name": "sorsa", "include": ["layers.0.attention.wq.weight", "layers.0.attention.wv.weight",
                                      "layers.1.feed_forward.w2.weight"],
         "rank": 4, "alpha": 8.0, "gamma": 0.02, "peak_lr": 0.2}
STRATEGIES = {
    "ddp": {"strategy.name": "ddp"},
    "fsdp2": {"strategy.name": "fsdp2"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
}
COMMON = {"optim.name": "sgd", "optim.momentum": 0.9, "optim.lr": 0.2, "train.grad_clip": 1.0}


def config(data, run_dir, world, init_from, **extra):
    hooks = [{**SORSA, "init_from": init_from}]
    return tiny_config(data, run_dir, **COMMON, **{"scaling.num_workers": world, "hooks": json.dumps(hooks), **extra})


def train(cfg) -> dict:
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(cfg, Comm(), track=False)
    for h in trainer.hooks:
        h.on_train_start(trainer.ctx)
    out = {"losses": [], "metrics": []}
    for _ in range(STEPS):
        out["losses"].append(trainer.train_step()[0])
        out["metrics"].append({k: v for h in trainer.hooks for k, v in h.metrics().items()})
    out["params"] = gather_full_params(trainer.ctx.local_shards(), trainer.comm)
    out["checkpoint"] = trainer.save()
    # exact resume: a fresh Trainer (SVD init from init_from again, then the checkpoint)
    # takes the same next step as the trainer that saved
    out["next_loss"] = trainer.train_step()[0]
    resumed = Trainer(cfg, Comm(), track=False)
    resumed._resume()
    for h in resumed.hooks:
        h.on_train_start(resumed.ctx)
    out["resumed_loss"] = resumed.train_step()[0]
    return out


def two_rank_worker(data: str, root: str, init_from: str) -> dict:
    return {s: train(config(data, f"{root}/{s}", 2, init_from, **extra)) for s, extra in STRATEGIES.items()}


@pytest.fixture(scope="module")
def runs(token_data, tmp_path_factory):
    from distreg.runtime.trainer import Trainer

    root = str(tmp_path_factory.mktemp("sorsa"))
    # "pretraining": one plain step, checkpointed; SORSA starts from it
    pre = Trainer(tiny_config(token_data, f"{root}/pre", **COMMON, **STRATEGIES["ddp"],
                               **{"train.max_steps": 1, "scaling.num_workers": 1}),
                  Comm(), track=False)
    pre.fit()
    init_from = f"{root}/pre/checkpoints"
    single = train(config(token_data, f"{root}/single", 1, init_from, **STRATEGIES["ddp"]))
    ranks = run_distributed(two_rank_worker, 2, token_data, root, init_from)
    return root, init_from, single, ranks


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_rank_invariance_against_single_process(runs, strategy):
    _, _, ref, ranks = runs
    assert len(ref["params"]) == 9  # A, S, B of 3 layers: nothing else trains
    for got in (r[strategy] for r in ranks):
        assert got["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert got["params"].keys() == ref["params"].keys()
        for key, w in ref["params"].items():
            torch.testing.assert_close(got["params"][key], w, atol=1e-5, rtol=0, msg=f"{strategy}: {key}")
        for m_got, m_ref in zip(got["metrics"], ref["metrics"]):
            assert m_got.keys() == m_ref.keys()
            for key, v in m_ref.items():
                assert m_got[key] == pytest.approx(v, rel=1e-5, abs=1e-6), f"{strategy}: {key}"
    for run in [ref] + [r[strategy] for r in ranks]:
        assert run["resumed_loss"] == pytest.approx(run["next_loss"], abs=1e-6)
    assert ref["metrics"][0]["sorsa/orth_error_A"] < 1e-5  # orthonormal at init
    assert ref["metrics"][-1]["sorsa/orth_error_B"] > ref["metrics"][0]["sorsa/orth_error_B"]  # training moved B


def adapted_model(init_from: str):
    """The SORSA model as prepare_model builds it from the pretrained checkpoint."""
    cfg = config("unused", "unused", 1, init_from)
    from distreg.hooks.registry import build_hooks

    h = build_hooks(cfg.hooks)[0]
    model = build_model(cfg.model, cfg.train.seed)
    h.prepare_model(model, ctx_for(model))
    return model, cfg


def test_checkpoints_hold_the_unchanged_residual_and_the_trained_adapters(runs):
    from distreg.runtime.weights import load_model_weights

    _, init_from, single, ranks = runs
    initial, _ = adapted_model(init_from)
    start = initial.state_dict()
    for name, run in [("single", single)] + [(s, ranks[0][s]) for s in STRATEGIES]:
        saved = load_model_weights(run["checkpoint"])
        assert saved.keys() == start.keys(), name
        for key, w in start.items():
            if key in run["params"]:  # trained: the gathered adapters
                assert torch.equal(saved[key], run["params"][key]), f"{name}: {key}"
            else:  # frozen residuals and every other frozen parameter: bitwise unchanged
                assert torch.equal(saved[key], w), f"{name}: {key}"


def test_merge_command_gives_the_adapted_models_logits(runs, tmp_path):
    from distreg.cli import main
    from distreg.runtime.weights import load_model_weights

    _, init_from, single, ranks = runs
    model, cfg = adapted_model(init_from)
    cfg_file = tmp_path / "sorsa.yaml"
    cfg_file.write_text(cfg.to_yaml())
    for name, run in [("single", single)] + [(s, ranks[0][s]) for s in STRATEGIES]:
        model.load_state_dict(load_model_weights(run["checkpoint"]))
        out = tmp_path / f"{name}.pt"
        assert main(["adapters", "merge", str(cfg_file), "--checkpoint", run["checkpoint"], "--out", str(out)]) == 0
        merged = torch.load(out, weights_only=True)
        assert not any("sorsa" in k for k in merged)
        plain = build_model(cfg.model, 123)
        plain.load_state_dict(merged)  # strict: exactly the plain model's names
        with torch.no_grad():
            torch.testing.assert_close(plain(TOKENS), model(TOKENS), rtol=0, atol=1e-5, msg=name)
    # the merged file is a valid starting point for another SORSA run (file form of init_from)
    again, _ = adapted_model(str(out))
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS), plain(TOKENS), rtol=0, atol=1e-5)
    # a plain checkpoint has nothing to merge; a sorsa checkpoint cannot start a plain model
    bad = main(["adapters", "merge", str(cfg_file), "--checkpoint", init_from, "--out", str(tmp_path / "x.pt")])
    assert bad == 2 and not (tmp_path / "x.pt").exists()
    with pytest.raises(ValueError, match="does not match the model"):
        adapted_model(single["checkpoint"])


def test_peak_lr_defaults_to_the_configured_lr():
    # peak_lr unset: gamma / optim.lr (ctx.base_lr) - the same additions as peak_lr=0.5
    _, grads_given, _ = run_hook(1, "rows")
    _, grads_default, results = run_hook(1, "rows", base_lr=0.5, peak_lr=None)
    for k in FULLS:
        assert torch.equal(grads_given[k], grads_default[k]), k
    assert results[0][0]["sorsa/coef"] == pytest.approx(0.1 / 0.5)
