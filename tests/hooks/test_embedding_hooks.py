"""Embedding-space hooks (issue 7): normalized_softmax, tcm, cs_ib.

In-process: spec vectors through the hooks (features captured from the head, the cosine
head, the TCM pair terms, the CS-IB terms), a Trainer-like micro-step on 1, 2 and 3
thread ranks (uneven and empty splits) giving the same step loss, the same averaged
gradients and the same metrics; state round trips; YAML validation.
Multi-process (one 2-rank spawn): the tiny Llama with normalized_softmax + tcm under ddp,
fsdp2 and ZeRO-3 with gradient accumulation against the single-process run: same losses,
weights and metrics after 3 steps.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from distreg.hooks.base import HookContext, LossTerms
from distreg.hooks.registry import build_hooks
from distreg.regularizers.losses import normsoftmax_embedding, tcm_loss
from distreg.runtime.comm import Comm
from distreg.runtime.loss import IGNORE_INDEX, per_sample_loss, reduction_weights
from distreg.testing import gather_full_params, run_distributed
from tests.conftest import tiny_config
from tests.threadcomm import run_threads

TOL = dict(rtol=1e-5, atol=1e-6)


def hooks_from(specs: list[dict]):
    from distreg.config import HookSpec

    return build_hooks([HookSpec(**s) for s in specs])


class TinyNet(nn.Module):
    """tokens -> Embedding -> (Linear + tanh) -> head `output` (a classifier or LM head)."""

    def __init__(self, table: torch.Tensor, classes: int, hidden: bool = False, bias: bool = False, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding.from_pretrained(table.float(), freeze=False)
        d = table.shape[1]
        self.hidden = nn.Linear(d, d) if hidden else None
        self.output = nn.Linear(d, classes, bias=bias)
        with torch.no_grad():
            for p in ([] if self.hidden is None else list(self.hidden.parameters())) + list(self.output.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        if self.hidden is not None:
            h = torch.tanh(self.hidden(h))
        return self.output(h)


def micro_step(comm, model: nn.Module, hooks, batch: dict, denom: float) -> dict:
    """One Trainer micro-step on this rank: forward, per-sample CE with the global token
    weights, loss hooks, backward of world * sample part + penalties, after_backward.
    Returns this rank's contribution to the step loss, its gradients and the metrics."""
    ctx = HookContext(comm=comm, strategy="test", model=model)
    for h in hooks:
        h.prepare_model(model, ctx)
    out = model(batch["input"])
    terms = LossTerms(per_sample_loss(out, batch["target"]), reduction_weights(batch["target"], "token", denom),
                      batch["index"])
    for h in hooks:
        terms = h.loss(ctx, out, batch, terms)
    sample_part = (terms.weight * terms.per_sample).sum()
    penalty = sum(terms.penalties.values(), torch.zeros(()))
    (sample_part * comm.world_size + penalty).backward()
    for h in hooks:
        h.after_backward(ctx)
    return {"loss": float(sample_part.detach()) + float(penalty.detach()) / comm.world_size, "out": out.detach(),
            "penalties": {k: float(v.detach()) for k, v in terms.penalties.items()},
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "metrics": {k: v for h in hooks for k, v in h.metrics().items()}, "hooks": hooks}


def lm_batch(tokens: torch.Tensor, target: torch.Tensor, start: int = 0) -> dict:
    """`index`: the samples' global indices (this rank's rows start at `start`)."""
    return {"input": tokens, "target": target, "index": torch.arange(start, start + tokens.shape[0])}


# --------------------------------------------------------------------------- spec vectors through the hooks


def test_normalized_softmax_spec_vector_through_the_head():
    # spec 16: e = normalize([3, 4]) = [0.6, 0.8]; W = [[1,0],[0,2],[-1,-1]] -> logits
    # [12, 16, -19.798990] (T = 0.05), CE(y = 1) = 0.018150; cos to class 1 = 0.8
    model = TinyNet(torch.tensor([[3.0, 4.0]]), 3)
    with torch.no_grad():
        model.output.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
    hooks = hooks_from([{"name": "normalized_softmax", "layer_norm": False}])
    r = micro_step(Comm(), model, hooks, lm_batch(torch.tensor([[0]]), torch.tensor([[1]])), 1.0)
    np.testing.assert_allclose(r["out"][0, 0], [12.0, 16.0, -19.798990], **TOL)
    np.testing.assert_allclose(r["loss"], 0.018150, **TOL)
    assert r["metrics"] == pytest.approx({"normalized_softmax/cos_target": 0.8, "normalized_softmax/cos_max": 0.8,
                                          "normalized_softmax/accuracy": 1.0, "normalized_softmax/scale": 20.0})
    # gradient of CE(s cos) w.r.t. the class weights, by hand: dL/dlogit = softmax - onehot,
    # dlogit_c/dW_c = s (e - cos_c u_c) / ||W_c|| with u_c = W_c / ||W_c||
    w = model.output.weight.detach().double()
    e = torch.tensor([0.6, 0.8], dtype=torch.float64)
    logits = 20 * (w / w.norm(dim=1, keepdim=True)) @ e
    g = torch.softmax(logits, 0) - torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    u = w / w.norm(dim=1, keepdim=True)
    want = g[:, None] * 20 * (e[None, :] - (u @ e)[:, None] * u) / w.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(r["grads"]["output.weight"], want, rtol=1e-5, atol=1e-7)


def test_normalized_softmax_layer_norm_path_and_bias():
    # spec 16 feature path: LayerNorm([1,2,3,6]) then L2 -> [-0.534522, -0.267261, 0, 0.801784];
    # with identity class weights the logits are e / T. A head bias is unused (gradient 0).
    model = TinyNet(torch.tensor([[1.0, 2.0, 3.0, 6.0]]), 4, bias=True)
    with torch.no_grad():
        model.output.weight.copy_(torch.eye(4))
    hooks = hooks_from([{"name": "normalized_softmax", "temperature": 0.5}])
    r = micro_step(Comm(), model, hooks, lm_batch(torch.tensor([[0]]), torch.tensor([[3]])), 1.0)
    e = [-0.534522, -0.267261, 0.0, 0.801784]
    np.testing.assert_allclose(r["out"][0, 0] * 0.5, e, **TOL)
    np.testing.assert_allclose(hooks[0].tap.embedding[0, 0].detach(), e, **TOL)
    assert r["grads"]["output.bias"].abs().max() == 0
    assert r["metrics"]["normalized_softmax/cos_target"] == pytest.approx(0.801784, rel=1e-5)
    assert r["metrics"]["normalized_softmax/scale"] == 2.0
    # eval predictions use the same cosine head
    model.eval()
    assert model(torch.tensor([[0]])).argmax(-1).item() == 3


def test_normalized_softmax_and_tcm_on_a_torchvision_classifier():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    batch = {"input": torch.randn(4, 3, 32, 32), "target": torch.tensor([0, 1, 1, 3]), "index": torch.arange(4)}
    hooks = hooks_from([{"name": "normalized_softmax", "head": "fc"},
                        {"name": "tcm", "head": "fc", "pos_margin": 1.0, "neg_margin": -1.0}])
    r = micro_step(Comm(), model, hooks, batch, 4.0)
    feats = hooks[0].tap.features.detach()  # the pooled 512-d features fc received
    e = normsoftmax_embedding(feats)
    want = e @ torch.nn.functional.normalize(model.fc.weight.detach(), dim=1).t() / 0.05
    np.testing.assert_allclose(r["out"], want, rtol=1e-5, atol=1e-5)
    # margins 1 / -1 make every pair hard: TCM = mean(1 - s) over positives + mean(s + 1) over negatives
    s = e @ e.t()
    same, off = batch["target"][:, None] == batch["target"][None, :], ~torch.eye(4, dtype=torch.bool)
    np.testing.assert_allclose(r["penalties"]["tcm"], (1 - s[same & off]).mean() + (s[~same & off] + 1).mean(),
                               rtol=1e-5)
    assert r["grads"]["fc.bias"].abs().max() == 0 and r["grads"]["conv1.weight"].abs().sum() > 0


TCM_EMB = torch.tensor([[0.0, 1.0], [0.43, 0.9], [1.0, 0.0], [0.5, 0.5], [-7.0, 3.0]])
TCM_TOK = torch.tensor([[0, 1, 2, 3, 4]])
TCM_TGT = torch.tensor([[0, 0, 1, 1, IGNORE_INDEX]])  # the 5th token is padding: left out of every pair


def test_tcm_spec_vector_through_the_hook():
    # spec 11 (PML unit test): positive part 0.192893 (2 of the 4 ordered positive pairs are
    # hard), negative part 0.324983 (4 of 8 ordered negative pairs), L_TCM = 0.517876
    model = TinyNet(TCM_EMB, 2)
    hooks = hooks_from([{"name": "tcm", "coef": 0.5}])
    r = micro_step(Comm(), model, hooks, lm_batch(TCM_TOK, TCM_TGT), 4.0)
    np.testing.assert_allclose(r["penalties"]["tcm"], 0.5 * 0.517876, **TOL)
    want = {"tcm/value": 0.5 * 0.517876, "tcm/pos_part": 0.192893, "tcm/neg_part": 0.324983,
            "tcm/hard_pos_fraction": 0.5, "tcm/hard_neg_fraction": 0.5}
    assert r["metrics"] == pytest.approx(want, rel=1e-5)
    # the embedding gradient is 0.5 * the all-pairs autograd gradient (padding row: only CE)
    ref = TCM_EMB[:4].clone().double().requires_grad_()
    (0.5 * tcm_loss(ref, TCM_TGT[0, :4])).backward()
    ce_only = TinyNet(TCM_EMB, 2)
    r0 = micro_step(Comm(), ce_only, [], lm_batch(TCM_TOK, TCM_TGT), 4.0)
    np.testing.assert_allclose(r["grads"]["emb.weight"] - r0["grads"]["emb.weight"],
                               torch.cat([ref.grad.float(), torch.zeros(1, 2)]), rtol=1e-5, atol=1e-6)


def test_tcm_spec_split_over_two_thread_ranks():
    # spec 11: samples {0,1} | {2,3}; rank shares pos (0 | 0.385786 / 2), neg (0.65 / 4 each)
    def rank(comm):
        lo, hi = (0, 2) if comm.rank == 0 else (2, 5)
        model = TinyNet(TCM_EMB, 2)
        return micro_step(comm, model, hooks_from([{"name": "tcm"}]),
                          lm_batch(TCM_TOK[:, lo:hi], TCM_TGT[:, lo:hi]), 4.0)

    res = run_threads(rank, 2)
    np.testing.assert_allclose([r["penalties"]["tcm"] / 2 for r in res],
                               [0.649966 / 4, 0.385786 / 2 + 0.649966 / 4], rtol=1e-5)
    for r in res:  # metrics are global
        assert r["metrics"]["tcm/value"] == pytest.approx(0.517876, rel=1e-5)


def test_tcm_on_the_normalized_embedding():
    # with normalized_softmax on the same head, TCM's pairs use its unit embedding (here
    # after the no-affine LayerNorm), not the raw features
    table = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    model = TinyNet(table, 3)
    hooks = hooks_from([{"name": "tcm", "pos_margin": 0.95, "neg_margin": -0.5},
                        {"name": "normalized_softmax"}])
    tokens, target = torch.tensor([[0, 1, 2, 3, 4, 5]]), torch.tensor([[0, 1, 0, 2, 1, 0]])
    r = micro_step(Comm(), model, hooks, lm_batch(tokens, target), 6.0)
    want = tcm_loss(normsoftmax_embedding(table), target[0], 0.95, -0.5).item()
    assert want != pytest.approx(tcm_loss(table, target[0], 0.95, -0.5).item(), rel=1e-3)  # LayerNorm matters
    np.testing.assert_allclose(r["penalties"]["tcm"], want, rtol=1e-5)


# --------------------------------------------------------------------------- CS-IB

CS_X = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
CS_Y = torch.tensor([0.0, 1.0, 0.0, 1.0])
CS_T = torch.tensor([[0, 0.5], [1, 0], [0.5, 0.5], [2, 1]])


def np_gram(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / 2)


def np_dcs(x, y, yh):
    """The reference CS_Div (sum of squared kernel rows in the denominator), sigma = 1."""
    k = np_gram(x, x)
    d = (k**2).sum(1)
    t = [((k * kk).sum(1) / d).sum() for kk in (np_gram(y, y), np_gram(yh, yh), np_gram(yh, y))]
    return np.log2(t[0]) + np.log2(t[1]) - 2 * np.log2(t[2])


class Bottleneck(nn.Module):
    """Regression net: index -> t (a table, the bottleneck) -> head Linear(2, 1) -> y_hat."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Embedding.from_pretrained(CS_T.clone(), freeze=False)
        self.output = nn.Linear(2, 1)
        with torch.no_grad():
            self.output.weight.copy_(torch.tensor([[0.4, 0.2]]))
            self.output.bias.fill_(0.1)

    def forward(self, idx):
        return self.output(self.enc(idx)).squeeze(-1)


def cs_step(comm, model, hooks, batch):
    """A micro-step with the per-sample loss left to the hook (regression: no CE)."""
    ctx = HookContext(comm=comm, strategy="test", model=model)
    for h in hooks:
        h.prepare_model(model, ctx)
    out = model(batch["input"])
    n = out.shape[0]
    terms = LossTerms(torch.full((n,), float("nan")), torch.full((n,), 1.0 / 4), batch["index"])
    for h in hooks:
        terms = h.loss(ctx, out, batch, terms)
    total = (terms.weight * terms.per_sample).sum() * comm.world_size + sum(terms.penalties.values())
    total.backward()
    for h in hooks:
        h.after_backward(ctx)
    return float(total.detach()) / comm.world_size, {n: p.grad.clone() for n, p in model.named_parameters()}, \
        {k: v for h in hooks for k, v in h.metrics().items()}


def test_cs_ib_spec_terms_through_the_hook():
    # spec 12: x = [0,1,2,3], t = [[0,.5],[1,0],[.5,.5],[2,1]] -> normalised I_CS(x; t) =
    # 0.685023; y_hat = 0.4 t_0 + 0.2 t_1 + 0.1 = [0.2, 0.5, 0.4, 1.1], D_CS by the formula
    yh = np.array([0.2, 0.5, 0.4, 1.1])
    batch = {"input": torch.arange(4), "x": CS_X, "target": CS_Y, "index": torch.arange(4)}
    hooks = hooks_from([{"name": "cs_ib", "beta": 0.5, "input_key": "x"}])
    loss, grads, metrics = cs_step(Comm(), Bottleneck(), hooks, batch)
    d = np_dcs(CS_X.numpy(), CS_Y.numpy(), yh)
    assert metrics == pytest.approx({"cs_ib/loss": d + 0.5 * 0.685023, "cs_ib/d_cs": d, "cs_ib/i_xt": 0.685023,
                                     "cs_ib/beta": 0.5}, rel=1e-5)
    np.testing.assert_allclose(loss, d + 0.5 * 0.685023, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads.values())
    # the reference script's 1-D-target kernel: D = sum (y_hat - y)^2 / ln 2 = 0.46 / ln 2
    hooks = hooks_from([{"name": "cs_ib", "beta": 0.0, "input_key": "x", "prediction": "reference_1d"}])
    loss, _, metrics = cs_step(Comm(), Bottleneck(), hooks, batch)
    np.testing.assert_allclose([loss, metrics["cs_ib/d_cs"]], [0.46 / math.log(2)] * 2, rtol=1e-5)


def test_cs_ib_bad_batches_name_the_field():
    model, hooks = Bottleneck(), hooks_from([{"name": "cs_ib", "input_key": "x"}])
    with pytest.raises(ValueError, match=r"batch\['target'\] must hold float"):
        cs_step(Comm(), model, hooks, {"input": torch.arange(4), "x": CS_X, "target": torch.arange(4),
                                       "index": torch.arange(4)})
    with pytest.raises(ValueError, match="cs_ib.input_key"):
        cs_step(Comm(), Bottleneck(), hooks_from([{"name": "cs_ib", "input_key": "feat"}]),
                {"input": torch.arange(4), "target": CS_Y, "index": torch.arange(4)})


# --------------------------------------------------------------------------- 1 vs N thread ranks


def make_lm(seed=7):
    g = torch.Generator().manual_seed(seed)
    return TinyNet(torch.randn(11, 6, generator=g), 5, hidden=True, bias=True, seed=seed)


def lm_data(seed=8):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (4, 6), generator=g)
    target = torch.randint(0, 5, (4, 6), generator=g)
    target[1, 4:] = IGNORE_INDEX
    target[3, 0] = IGNORE_INDEX
    return tokens, target


LM_HOOKS = {
    "normsoftmax+tcm": [{"name": "normalized_softmax", "temperature": 0.2},
                        {"name": "tcm", "coef": 0.7, "pos_margin": 0.6, "neg_margin": 0.0}],
    "tcm": [{"name": "tcm", "pos_margin": 0.8, "neg_margin": 0.1, "pos_weight": 2.0}],
    "tcm_sampled": [{"name": "tcm", "pos_margin": 0.8, "neg_margin": 0.1, "token_fraction": 0.5, "seed": 3}],
}


def _lm_rank(comm, cuts, specs):
    tokens, target = lm_data()
    denom = float((target != IGNORE_INDEX).sum())
    lo, hi = cuts[comm.rank], cuts[comm.rank + 1]
    return micro_step(comm, make_lm(), hooks_from(specs), lm_batch(tokens[lo:hi], target[lo:hi], lo), denom)


def assert_same_as_single(res, single, loss_key="loss"):
    world = len(res)
    np.testing.assert_allclose(sum(r[loss_key] for r in res), single[loss_key], rtol=1e-6)
    for name, g in single["grads"].items():  # the strategies average the ranks' gradients
        np.testing.assert_allclose(sum(r["grads"][name] for r in res) / world, g, rtol=1e-5, atol=1e-7, err_msg=name)
    for r in res:
        assert r["metrics"] == pytest.approx(single["metrics"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", list(LM_HOOKS))
@pytest.mark.parametrize("cuts", [[0, 1, 4], [0, 2, 2, 4]])
def test_lm_hooks_same_loss_and_gradient_on_thread_ranks(name, cuts):
    single = run_threads(_lm_rank, 1, [0, 4], LM_HOOKS[name])[0]
    assert single["penalties"]["tcm"] > 0 and single["metrics"]["tcm/hard_pos_fraction"] > 0
    res = run_threads(_lm_rank, len(cuts) - 1, cuts, LM_HOOKS[name])
    assert_same_as_single(res, single)


def make_reg(seed=3):
    # Values from a private generator: thread ranks build their models concurrently, and
    # the global RNG (torch.manual_seed + nn.Linear's init) would be shared between them.
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    return model


def _reg_rank(comm, cuts, spec):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 3, generator=g), torch.randn(7, generator=g)
    lo, hi = cuts[comm.rank], cuts[comm.rank + 1]
    batch = {"input": x[lo:hi], "target": y[lo:hi], "index": torch.arange(lo, hi)}
    loss, grads, metrics = cs_step(comm, make_reg(), hooks_from([spec]), batch)
    return {"loss": loss, "grads": grads, "metrics": metrics}


@pytest.mark.parametrize("cuts", [[0, 3, 7], [0, 2, 2, 7]])
@pytest.mark.parametrize("denominator", ["sum_sq", "sq_sum"])
def test_cs_ib_same_loss_and_gradient_on_thread_ranks(cuts, denominator):
    spec = {"name": "cs_ib", "head": "2", "beta": 0.3, "sigma": 1.5, "denominator": denominator}
    single = run_threads(_reg_rank, 1, [0, 7], spec)[0]
    res = run_threads(_reg_rank, len(cuts) - 1, cuts, spec)
    assert_same_as_single(res, single)
    assert single["metrics"]["cs_ib/d_cs"] > 0 and single["metrics"]["cs_ib/i_xt"] > 0


# --------------------------------------------------------------------------- state, config


def test_state_round_trip_restores_metrics():
    for specs in LM_HOOKS.values():
        hooks = run_threads(_lm_rank, 1, [0, 4], specs)[0]["hooks"]
        for h in hooks:
            buf = io.BytesIO()
            torch.save(h.state_dict(), buf)
            buf.seek(0)
            fresh = hooks_from([{"name": h.name, **h.params.model_dump(exclude_defaults=True)}])[0]
            fresh.load_state_dict(torch.load(buf, weights_only=False))
            assert fresh.metrics() == h.metrics() and h.metrics()


def test_yaml_params_validation(tmp_path):
    import yaml

    from distreg.config import ConfigError, load_config

    path = tmp_path / "cfg.yaml"
    every = [{"name": "normalized_softmax", "head": "fc", "temperature": 0.1, "layer_norm": False},
             {"name": "tcm", "coef": 0.5, "pos_margin": 0.8, "neg_margin": 0.4}]
    path.write_text(yaml.safe_dump({"hooks": every}))
    hooks = build_hooks(load_config(path).hooks)
    assert hooks[0].params.head == "fc" and hooks[1].params.neg_margin == 0.4

    def error(hooks_list):
        path.write_text(yaml.safe_dump({"hooks": hooks_list}))
        with pytest.raises(ConfigError) as e:
            build_hooks(load_config(path).hooks, str(path))
        return str(e.value)

    assert "hooks.0.temperature" in error([{"name": "normalized_softmax", "temperature": 0}])
    assert "hooks.0.pos_margin" in error([{"name": "tcm", "pos_margin": 1.5}])
    assert "hooks.0.denominator" in error([{"name": "cs_ib", "denominator": "paper"}])
    assert "hooks.0.sigma" in error([{"name": "cs_ib", "sigma": -1}])
    assert "unknown parameter" in error([{"name": "tcm", "margin": 0.3}])
    msg = error([{"name": "normalized_softmax"}, {"name": "stablemax"}])
    assert "'normalized_softmax'" in msg and "replace the loss" in msg
    # a head that the model lacks, or one without class weights: named at prepare_model
    ctx = HookContext(comm=Comm(), strategy="test", model=make_lm())
    with pytest.raises(ValueError, match="tcm.head: no module 'fc'"):
        hooks_from([{"name": "tcm", "head": "fc"}])[0].prepare_model(make_lm(), ctx)
    with pytest.raises(ValueError, match="normalized_softmax.head: module 'emb' has no 2-D"):
        hooks_from([{"name": "normalized_softmax", "head": "emb"}])[0].prepare_model(
            nn.ModuleDict({"emb": nn.Tanh()}), ctx)


# --------------------------------------------------------------------------- real strategies (one spawn)

STEPS = 3
HOOKS = [{"name": "normalized_softmax", "temperature": 0.1},
         {"name": "tcm", "coef": 0.5, "pos_margin": 0.5, "neg_margin": 0.05}]
STRATEGIES = {
    "ddp": {"strategy.name": "ddp"},
    "fsdp2": {"strategy.name": "fsdp2"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
}
# pairs span the global micro-batch: the same grad_accum_steps on 1 and 2 ranks (the global
# micro-batch m is then the same samples)
COMMON = {"optim.name": "sgd", "optim.momentum": 0.9, "optim.lr": 0.2, "train.grad_clip": 1.0,
          "train.grad_accum_steps": 2, "hooks": json.dumps(HOOKS)}


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
    return out


def two_rank_worker(data: str, root: str) -> dict:
    return {s: train(tiny_config(data, f"{root}/{s}", **COMMON, **{"scaling.num_workers": 2}, **over))
            for s, over in STRATEGIES.items()}


@pytest.fixture(scope="module")
def runs(token_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("embedding_hooks"))
    single = train(tiny_config(token_data, f"{root}/single", **COMMON, **{"scaling.num_workers": 1},
                               **STRATEGIES["ddp"]))
    return single, run_distributed(two_rank_worker, 2, token_data, root)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_rank_invariance_against_single_process(runs, strategy):
    single, ranks = runs
    for got in (r[strategy] for r in ranks):
        assert got["losses"] == pytest.approx(single["losses"], abs=1e-5)
        for key, w in single["params"].items():
            torch.testing.assert_close(got["params"][key], w, atol=1e-5, rtol=0, msg=f"{strategy}: {key}")
        for m_got, m_ref in zip(got["metrics"], single["metrics"]):
            assert m_got.keys() == m_ref.keys()
            for key, v in m_ref.items():
                assert m_got[key] == pytest.approx(v, rel=1e-5, abs=1e-6), f"{strategy}: {key}"


def test_single_process_run_trains_with_both_terms(runs):
    single, _ = runs
    assert all(math.isfinite(x) for x in single["losses"])
    assert single["losses"][-1] < single["losses"][0]
    for m in single["metrics"]:
        assert m["tcm/value"] > 0 and 0 < m["tcm/hard_neg_fraction"] <= 1
        assert -1 <= m["normalized_softmax/cos_target"] <= m["normalized_softmax/cos_max"] <= 1
    assert single["metrics"][-1]["normalized_softmax/scale"] == pytest.approx(10.0)


def test_tcm_token_fraction_thins_pairs_by_global_position():
    full = run_threads(_lm_rank, 1, [0, 4], LM_HOOKS["tcm"])[0]["metrics"]
    half = run_threads(_lm_rank, 1, [0, 4], LM_HOOKS["tcm_sampled"])[0]["metrics"]
    assert half != full  # fewer pairs, another estimate
    hook = hooks_from(LM_HOOKS["tcm_sampled"])[0]
    ctx = HookContext(comm=Comm(), strategy="test", model=nn.Module())
    valid = torch.ones(4, 6, dtype=torch.bool)
    batch = {"index": torch.tensor([10, 11, 12, 13])}
    kept = hook.sampled(ctx, batch, valid)
    assert 0 < int(kept.sum()) < 24
    # the same global positions give the same draw in any sub-batch (rank split)
    assert torch.equal(hook.sampled(ctx, {"index": torch.tensor([12, 13])}, valid[2:]), kept[2:])
    ctx.step = 1  # a new draw each step
    assert not torch.equal(hook.sampled(ctx, batch, valid), kept)
