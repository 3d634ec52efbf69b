"""Reweighting and per-sample-store hooks (`loss_reweighting`, `dro_reweighting`, `elr`,
`ps_kd`).

In-process: the spec vectors (sparsity-reweighting-ot.md sections 8, 9; regularizers.md
sections 3, 4) through the hooks, on one rank and on thread ranks (uneven splits), the
gradient-accumulation scaling (each global micro-batch reweighted, the step's weights sum
to 1), the warm-up schedule, the logged statistics, the plot, parameter validation, and
the 7B config at tiny scale (one process, FSDP2, by `--set` overrides only).
Multi-process (two spawns: 2 and 4 gloo ranks): one real Trainer step (ddp, gradient
accumulation) with each reweighting hook - loss, gathered weights and gradient equal the
1-process run within 1e-6; and (2 ranks) ELR + PS-KD over 2 epochs on a small
classification task driven through the real Trainer (an in-test data source that
implements the `distreg.data` contract and an MLP replace `build_data` / `build_model`):
stores and losses equal the 1-process Trainer and a plain-torch reference loop, and a run
stopped after step 4 and resumed from its checkpoint continues identically.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distreg.config import ConfigError, load_config
from distreg.hooks.base import HookContext, LossTerms
from distreg.hooks.registry import build_hooks
from distreg.hooks.reweighting import DroReweighting, LossReweighting
from distreg.hooks.self_distill import Elr, PsKd
from distreg.reweighting import linupper_weights
from distreg.runtime.comm import Comm
from distreg.testing import gather_full_params, run_distributed
from tests.conftest import tiny_config
from tests.reweighting.threadcomm import run_threads

REPO = Path(__file__).resolve().parents[2]

# spec section 8, losses [1, 2, 3, 4], delta = 1
SPEC8 = {
    ("linupper", 1.0): [0.119271, 0.232307, 0.324211, 0.324211],
    ("linupper", 0.4): [0.032616, 0.172687, 0.397348, 0.397348],
    ("quadratic", 1.0): [0.145670, 0.354330, 0.354330, 0.145670],
    ("mid", 0.4): [0.048886, 0.451114, 0.451114, 0.048886],
    ("extremes", 1.0): [0.330378, 0.169622, 0.169622, 0.330378],
    ("extremes", 0.4): [0.420565, 0.079435, 0.079435, 0.420565],
    ("linear", 1.0): [0.141610, 0.197633, 0.275819, 0.384937],
}
# spec section 9, losses [0.5, 1, 2]
SPEC9 = {1.0: [0.140244, 0.231224, 0.628532], 0.5: [0.042010, 0.114195, 0.843795], 10.0: [0.311225, 0.327182, 0.361592]}


def lrw(**kw) -> LossReweighting:
    return LossReweighting(LossReweighting.Params(**kw))


def dro(**kw) -> DroReweighting:
    return DroReweighting(DroReweighting.Params(**kw))


def ctx_for(comm, **kw) -> HookContext:
    return HookContext(comm=comm, strategy="ddp", model=nn.Linear(1, 1), **kw)


def drive_step(hook, comm, micro, step=0, **ctx_kw):
    """One optimizer step of `loss` hooks as the Trainer runs it: `micro` = this rank's
    micro-batches as (losses, reduction weights). Returns per micro-batch (weights, the
    rank's backward loss W * sum w l, d(backward loss)/d losses) and the hook's metrics."""
    ctx = ctx_for(comm, step=step, grad_accum_steps=len(micro), **ctx_kw)
    out = []
    for m, (losses, base) in enumerate(micro):
        ctx.micro_step = m
        l = torch.tensor(losses, dtype=torch.float32, requires_grad=True)
        terms = hook.loss(ctx, None, {}, LossTerms(l, torch.tensor(base, dtype=torch.float32), torch.arange(len(losses))))
        part = (terms.weight * terms.per_sample).sum() * comm.world_size
        (grad,) = torch.autograd.grad(part, l) if len(losses) else (torch.zeros(0),)
        out.append((terms.weight.detach().clone(), float(part.detach()), grad))
    ctx.step = step + 1
    hook.after_step(ctx)
    return out, hook.metrics()


# ------------------------------------------------------------------- loss_reweighting: vectors
@pytest.mark.parametrize("strategy,r", list(SPEC8))
def test_loss_reweighting_spec_vectors(strategy, r):
    (w, part, grad), = drive_step(lrw(strategy=strategy, r=r), Comm(), [([1, 2, 3, 4], [0.25] * 4)])[0]
    torch.testing.assert_close(w, torch.tensor(SPEC8[(strategy, r)]), atol=2e-6, rtol=0)
    torch.testing.assert_close(grad, w)  # d/dl of sum w l with detached w
    assert part == pytest.approx(float((w * torch.tensor([1.0, 2, 3, 4])).sum()))


def test_loss_reweighting_defaults_are_linupper_r1_delta1():
    hook = build_hooks(load_config(None, ["hooks=[{name: loss_reweighting}]"]).hooks)[0]
    (w, _, _), = drive_step(hook, Comm(), [([1, 2, 3, 4], [0.25] * 4)])[0]
    torch.testing.assert_close(w, torch.tensor(SPEC8[("linupper", 1.0)]), atol=2e-6, rtol=0)


@pytest.mark.parametrize("mode", ["allreduce", "allgather"])
def test_two_thread_ranks_give_the_spec_split(mode):
    # spec section 8: ranks [1, 2] | [3, 4] -> local W * sum w l = 1.167771 and 4.538954, mean 2.853363
    res = run_threads(lambda comm: drive_step(lrw(mode=mode), comm, [([[1, 2], [3, 4]][comm.rank], [0.25, 0.25])]), 2)
    w = torch.cat([r[0][0][0] for r in res])
    torch.testing.assert_close(w, torch.tensor(SPEC8[("linupper", 1.0)]), atol=2e-6, rtol=0)
    assert [r[0][0][1] for r in res] == pytest.approx([1.167771, 4.538954], abs=2e-6)
    assert torch.equal(torch.cat([r[0][0][2] for r in res]), w * 2)  # per-rank grad; DDP averages over 2 ranks


def test_uneven_and_empty_ranks_match_one_process():
    losses, base = [0.3, 2.5, 1.1, 0.7, 4.0, 1.9, 0.2], [1 / 7] * 7
    (ref, _, _), = drive_step(lrw(strategy="extremes", r=0.4), Comm(), [(losses, base)])[0]
    cuts = [(0, 0), (0, 1), (1, 5), (5, 7)]  # rank 0 empty, then 1, 4, 2 samples
    res = run_threads(lambda comm: drive_step(lrw(strategy="extremes", r=0.4), comm,
                                              [(losses[slice(*cuts[comm.rank])], base[slice(*cuts[comm.rank])])]), 4)
    torch.testing.assert_close(torch.cat([r[0][0][0] for r in res]), ref, atol=1e-7, rtol=0)


def test_gradient_accumulation_reweights_each_global_micro_batch_and_the_step_sums_to_one():
    # 2 ranks x 2 micro-batches, 8 samples, token weights n_i / N with unequal lengths.
    n = torch.tensor([10.0, 20, 30, 40, 16, 16, 16, 16])  # micro 0: samples 0-3, micro 1: samples 4-7
    b = (n / n.sum()).tolist()
    loss = [1.0, 2, 3, 4, 5, 1, 1, 1]
    layout = {0: [[0, 1], [4, 5]], 1: [[2, 3], [6, 7]]}  # rank -> micro-batch -> sample ids (data-source slicing)

    def body(comm):
        micro = [([loss[i] for i in ids], [b[i] for i in ids]) for ids in layout[comm.rank]]
        return drive_step(lrw(), comm, micro)[0]

    res = run_threads(body, 2)
    w = torch.zeros(8)
    for rank, out in enumerate(res):
        for ids, (wm, _, _) in zip(layout[rank], out):
            w[ids] = wm
    # by hand: group m gets M_m * b_i u_i / sum_group b u, u = LinUpper softmax of the group
    u0 = torch.tensor(SPEC8[("linupper", 1.0)])  # losses [1, 2, 3, 4]
    u1 = linupper_weights(torch.tensor([5.0, 1, 1, 1]))  # h = [1, -1, -1, -1] -> f = [1, 0, 0, 0]
    e = math.e
    torch.testing.assert_close(u1, torch.tensor([e / (e + 3), 1 / (e + 3), 1 / (e + 3), 1 / (e + 3)]))
    bt = torch.tensor(b)
    m0, m1 = float(bt[:4].sum()), float(bt[4:].sum())
    assert (m0, m1) == pytest.approx((100 / 164, 64 / 164))
    want = torch.cat([m0 * bt[:4] * u0 / (bt[:4] * u0).sum(), m1 * bt[4:] * u1 / (bt[4:] * u1).sum()])
    torch.testing.assert_close(w, want, atol=2e-7, rtol=0)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    # micro-batch 1: uniform lengths there, so its weights are M_1 * u1
    torch.testing.assert_close(w[4:], m1 * u1, atol=1e-7, rtol=0)


def test_equal_losses_and_uniform_strategy_leave_the_trainer_weights():
    base = [0.1, 0.2, 0.3, 0.4]
    (w, _, _), = drive_step(lrw(), Comm(), [([2.0, 2.0, 2.0, 2.0], base)])[0]  # h = 0 -> uniform u
    torch.testing.assert_close(w, torch.tensor(base), atol=1e-7, rtol=0)
    (w, _, _), = drive_step(lrw(strategy="uniform"), Comm(), [([1.0, 2.0, 3.0, 4.0], base)])[0]
    assert torch.equal(w, torch.tensor(base))


def test_padded_samples_get_zero_weight_and_no_say():
    # sample 2 has no valid token (reduction weight 0): its loss takes no part in min/max/normaliser
    (w, part, _), = drive_step(lrw(), Comm(), [([1.0, 2.0, 100.0, 3.0, 4.0], [0.25, 0.25, 0.0, 0.25, 0.25])])[0]
    torch.testing.assert_close(w, torch.tensor([0.119271, 0.232307, 0.0, 0.324211, 0.324211]), atol=2e-6, rtol=0)


def test_warmup_schedule_is_uniform_then_reweights():
    calls = {}

    def body(comm):
        hook = lrw(warmup_steps=2, r=0.4)
        ws = []
        for step in range(3):
            before = comm.calls
            (w, _, _), = drive_step(hook, comm, [([[1, 2], [3, 4]][comm.rank], [0.25, 0.25])], step=step, )[0]
            m = hook.metrics()
            ws.append((w, comm.calls - before, m.get(f"{hook.name}/temperature", math.inf), m[f"{hook.name}/active"]))
        return ws

    res = run_threads(body, 2)
    for step in (0, 1):  # warm-up at r = inf: the Trainer's weights, no collective in `loss`
        assert torch.equal(torch.cat([r[step][0] for r in res]), torch.full((4,), 0.25))
        assert res[0][step][2:] == (math.inf, 0.0)  # `temperature` not logged while infinite
        assert res[0][step][1] == 3  # only weight_stats' three all-reduces in after_step
    torch.testing.assert_close(torch.cat([r[2][0] for r in res]), torch.tensor(SPEC8[("linupper", 0.4)]), atol=2e-6, rtol=0)
    assert res[0][2][2:] == (0.4, 1.0)
    # fms-fsdp recipe: a finite warm-up temperature
    (w, _, _), = drive_step(lrw(warmup_steps=5, warmup_r=100.0), Comm(), [([1, 2, 3, 4], [0.25] * 4)])[0]
    f = torch.tensor([0.0, 2 / 3, 1, 1]) / 100
    torch.testing.assert_close(w, torch.softmax(f, 0), atol=1e-7, rtol=0)


def test_metrics_are_global_weight_statistics():
    w = torch.tensor(SPEC8[("linupper", 1.0)], dtype=torch.float64)
    res = run_threads(lambda comm: drive_step(lrw(), comm, [([[1, 2], [3, 4]][comm.rank], [0.25, 0.25])])[1], 2)
    ref = {"weight_mean": 0.25, "weight_min": 0.119271, "weight_max": 0.324211,
           "weight_std": float(((w - 0.25) ** 2).mean().sqrt()), "ess": float(1 / (w * w).sum()),
           "frac_downweighted": 0.5,  # 0.119 and 0.232 are below 1/4
           "loss_mean": 2.5, "loss_weighted": 2.853363, "temperature": 1.0, "active": 1.0}
    assert float(1 / (w * w).sum()) == pytest.approx(3.5917, abs=1e-4)
    for m in res:
        assert m.keys() == {f"loss_reweighting/{k}" for k in [*ref, "ess_fraction"]}
        for k, v in ref.items():
            assert m[f"loss_reweighting/{k}"] == pytest.approx(v, abs=2e-6), k
        assert m["loss_reweighting/ess_fraction"] == pytest.approx(ref["ess"] / 4)


def test_stats_every_reports_statistics_only_on_their_steps():
    hook = lrw(stats_every=2)
    assert drive_step(hook, Comm(), [([1, 2, 3, 4], [0.25] * 4)], step=0)[1] == {
        "loss_reweighting/temperature": 1.0, "loss_reweighting/active": 1.0}
    m = drive_step(hook, Comm(), [([1, 2, 3, 4], [0.25] * 4)], step=1)[1]  # after it, ctx.step = 2
    assert m["loss_reweighting/weight_max"] == pytest.approx(0.324211, abs=2e-6)


def test_plot_written_by_rank_zero_and_uploaded(tmp_path):
    uploads = []

    def body(comm):
        hook = lrw(plot_every=2)
        kw = {"run_dir": str(tmp_path), "artifact_fn": (lambda p, a: uploads.append((p, a))) if comm.rank == 0 else None}
        for step in range(2):
            drive_step(hook, comm, [([[1, 2], [3, 4]][comm.rank], [0.25, 0.25])], step=step, **kw)
        return hook.plots

    res = run_threads(body, 2)
    path = tmp_path / "reweighting" / "loss_reweighting_step00000002.png"
    assert res == [[str(path)], []] and uploads == [(str(path), "reweighting")]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------- dro_reweighting: vectors
@pytest.mark.parametrize("r", list(SPEC9))
def test_dro_spec_vectors_one_process_and_uneven_ranks(r):
    (w, _, grad), = drive_step(dro(r=r), Comm(), [([0.5, 1.0, 2.0], [1 / 3] * 3)])[0]
    torch.testing.assert_close(w, torch.tensor(SPEC9[r]), atol=2e-6, rtol=0)
    torch.testing.assert_close(grad, w)
    res = run_threads(lambda comm: drive_step(dro(r=r), comm, [([[0.5], [1.0, 2.0]][comm.rank], [[1 / 3], [1 / 3] * 2][comm.rank])]), 2)
    torch.testing.assert_close(torch.cat([x[0][0][0] for x in res]), w, atol=1e-7, rtol=0)
    # rank-averaged gradient = the one-process gradient
    torch.testing.assert_close(torch.cat([x[0][0][2] for x in res]) / 2, grad, atol=1e-7, rtol=0)


def test_params_are_validated():
    with pytest.raises(ConfigError, match="r"):
        load_config(None, ["hooks=[{name: dro_reweighting}]"])  # r is required
    with pytest.raises(ConfigError, match="strategy"):
        load_config(None, ["hooks=[{name: loss_reweighting, strategy: upper}]"])  # ambiguous name, not offered
    with pytest.raises(ConfigError, match="unknown parameter"):
        load_config(None, ["hooks=[{name: loss_reweighting, temperature: 2}]"])
    with pytest.raises(ConfigError, match="num_epochs"):
        load_config(None, ["hooks=[{name: ps_kd}]"])
    assert PsKd.replaces_loss and not Elr.replaces_loss  # ELR adds to whatever loss it is given
    cfg = load_config(None, ["hooks=[{name: ps_kd, num_epochs: 3}, {name: elr, preset: cifar100}, {name: loss_reweighting}]"])
    pskd, elr, _ = build_hooks(cfg.hooks)
    assert (elr.beta, elr.lam) == (0.9, 7.0) and pskd.params.alpha_T == 0.8


# ------------------------------------------------------------------- elr / ps_kd: vectors
def _store_ctx(comm, num_samples=4, epoch=0):
    return ctx_for(comm, num_samples=num_samples, epoch_fn=lambda: epoch)


def test_elr_spec_vectors_through_the_store():
    hook = Elr(Elr.Params())  # cifar10 preset: beta 0.7, lam 3
    ctx = _store_ctx(Comm())
    logits = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    ce = F.cross_entropy(logits, torch.tensor([0]), reduction="none")
    terms = hook.loss(ctx, logits, {"target": torch.tensor([0])}, LossTerms(ce, torch.ones(1), torch.tensor([2])))
    assert float(terms.per_sample.detach()) == pytest.approx(-0.091135, abs=2e-6)  # CE 0.407606 + 3 * (-0.166247)
    torch.testing.assert_close(hook.store.table[2], torch.tensor([0.199572, 0.073419, 0.027009]), atol=2e-6, rtol=0)
    assert hook.store.table[[0, 1, 3]].abs().sum() == 0  # other rows untouched
    # stored t = [0.5, 0.3, 0.2]: L = -1.385875; then logits [0, 3, 0]: R = -0.602385
    hook.store.write(torch.tensor([1]), torch.tensor([[0.5, 0.3, 0.2]]))
    terms = hook.loss(ctx, logits, {"target": torch.tensor([0])}, LossTerms(ce, torch.ones(1), torch.tensor([1])))
    assert float(terms.per_sample.detach()) == pytest.approx(-1.385875, abs=2e-6)
    logits2 = torch.tensor([[0.0, 3.0, 0.0]])
    ce2 = F.cross_entropy(logits2, torch.tensor([0]), reduction="none")
    terms = hook.loss(ctx, logits2, {"target": torch.tensor([0])}, LossTerms(ce2, torch.ones(1), torch.tensor([1])))
    assert float(terms.per_sample - ce2) == pytest.approx(3 * -0.602385, abs=6e-6)
    torch.testing.assert_close(hook.store.table[1], torch.tensor([0.398284, 0.471226, 0.130490]), atol=2e-6, rtol=0)
    hook.after_step(ctx)
    assert hook.metrics() == pytest.approx({"elr/ce": float(ce2), "elr/reg": 3 * -0.602385}, abs=6e-6)


def test_pskd_spec_vector_and_unvisited_rows():
    hook = PsKd(PsKd.Params(num_epochs=4))  # alpha_T 0.8: epoch 1 -> alpha = 0.8 * 2 / 4 = 0.4
    logits = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]], requires_grad=True)
    batch = {"target": torch.tensor([1, 1])}
    hook.loss(_store_ctx(Comm()), logits, batch, LossTerms(torch.zeros(2), torch.full((2,), 0.5), torch.tensor([0, 3])))
    assert torch.isnan(hook.store.table[[1, 2]]).all()  # epoch 0 only writes
    hook.store.write(torch.tensor([0]), torch.tensor([[0.2, 0.5, 0.3]]))
    terms = hook.loss(_store_ctx(Comm(), epoch=1), logits, batch,
                      LossTerms(torch.zeros(2), torch.full((2,), 0.5), torch.tensor([0, 1])))
    assert hook.metrics() == {"ps_kd/alpha": pytest.approx(0.4)}
    assert float(terms.per_sample[0].detach()) == pytest.approx(0.727606, abs=2e-6)  # targets [0.08, 0.80, 0.12]
    # row 1 was never visited: one-hot target, i.e. the plain cross-entropy
    assert float(terms.per_sample[1].detach()) == pytest.approx(float(F.cross_entropy(logits.detach()[1:2], torch.tensor([1]))), abs=1e-6)
    torch.testing.assert_close(hook.store.table[[0, 1]], torch.tensor([[0.244728, 0.665241, 0.090031]] * 2), atol=2e-6, rtol=0)


def test_store_hooks_need_num_samples_and_classification_logits():
    with pytest.raises(RuntimeError, match="num_samples"):
        Elr(Elr.Params()).loss(ctx_for(Comm()), torch.zeros(2, 3), {"target": torch.zeros(2, dtype=torch.long)},
                               LossTerms(torch.zeros(2), torch.full((2,), 0.5), torch.arange(2)))
    with pytest.raises(ValueError, match="classification logits"):
        PsKd(PsKd.Params(num_epochs=1)).loss(_store_ctx(Comm()), torch.zeros(2, 5, 3), {"target": torch.zeros(2, 5)},
                                             LossTerms(torch.zeros(2), torch.full((2,), 0.5), torch.arange(2)))


# ------------------------------------------------------------------- the 7B config at tiny scale
TINY_7B = ["model.preset=llama-tiny", "data.kind=tokens", "data.sources=[]", "data.seq_len=32", "scaling.use_gpu=false",
           "scaling.gpus_per_worker=0", "scaling.num_workers=1", "scaling.cpus_per_worker=1", "train.global_batch_size=8",
           "train.max_steps=2", "train.grad_accum_steps=1", "optim.warmup_steps=1", "hooks.0.plot_every=2"]


def test_7b_config_validates_and_runs_tiny_by_overrides(token_data, tmp_path):
    import torch.distributed as dist

    from distreg.runtime import checkpoint as ckpt
    from distreg.runtime.trainer import Trainer
    from distreg.testing import free_port

    path = REPO / "configs/llama7b_reweight.yaml"
    full = load_config(path)
    assert (full.model.preset, full.model.init_device, full.strategy.name) == ("llama2-7b", "meta", "fsdp2")
    assert full.strategy.mixed_precision.param_dtype == "bf16" and full.strategy.activation_checkpointing
    assert full.data.kind == "mixture" and full.checkpoint.dir.startswith("s3://") and full.tracking.uri is None
    assert full.scaling.use_gpu and full.scaling.gpus_per_worker == 1 and full.hooks[0].name == "loss_reweighting"
    cfg = load_config(path, [*TINY_7B, f"data.path={token_data}", f"run_dir={tmp_path}",
                             f"checkpoint.dir=file://{tmp_path}/ckpt"])
    assert cfg.model.init_device == "meta" and cfg.strategy.name == "fsdp2"  # not overridden
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        trainer = Trainer(cfg, Comm(), track=False)
        uploads = []
        trainer.ctx.artifact_fn = lambda p, a: uploads.append((p, a))
        result = trainer.fit()
        metrics = trainer.hooks[0].metrics()
    finally:
        dist.destroy_process_group()
    assert sorted(result.losses) == [1, 2] and all(math.isfinite(v) for v in result.losses.values())
    assert metrics["loss_reweighting/temperature"] == 100.0  # still in the 2000-step warm-up (r = 100)
    assert metrics["loss_reweighting/weight_mean"] == pytest.approx(1 / 8)
    assert 0 < metrics["loss_reweighting/frac_downweighted"] < 1 and 7.5 < metrics["loss_reweighting/ess"] <= 8
    assert uploads and uploads[0][1] == "reweighting" and Path(uploads[0][0]).is_file()
    assert ckpt.latest_checkpoint(f"file://{tmp_path}/ckpt")[0] == 2


def test_7b_config_dry_run_prints_the_plan(capsys):
    from distreg.cli import main

    assert main(["train", str(REPO / "configs/llama7b_reweight.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6.738B parameters" in out and "fsdp2 over 32 ranks" in out


# ------------------------------------------------------------------- multi-process: real Trainer
RW_COMMON = {"strategy.name": "ddp", "optim.name": "sgd", "optim.lr": 1.0, "optim.momentum": 0.0,
             "optim.schedule": "constant", "train.grad_clip": "null", "train.grad_accum_steps": 2}
RW_HOOKS = {"loss": "[{name: loss_reweighting, strategy: linupper, r: 0.5}]",
            "dro": "[{name: dro_reweighting, r: 0.5}]",
            "none": "[]"}


def rw_step(cfg) -> dict:
    """One Trainer step; loss, the step's weights by sample index and the gradient
    (SGD, lr 1, no momentum/clip/decay: before - after)."""
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(cfg, Comm(), track=False)
    before = gather_full_params(trainer.ctx.local_shards(), trainer.comm)
    loss, _, _ = trainer.train_step()
    after = gather_full_params(trainer.ctx.local_shards(), trainer.comm)
    out = {"loss": loss, "grad": {k: before[k] - after[k] for k in before}}
    if trainer.hooks:
        h = trainer.hooks[0]
        w = torch.cat(trainer.comm.all_gather_uneven(h.last_weights.double()))
        idx = torch.cat(trainer.comm.all_gather_uneven(h.last_index))
        out["weights"] = dict(zip(idx.tolist(), w.tolist()))
        out["metrics"] = h.metrics()
    return out


def rw_configs(data, root, world, kinds=("loss", "dro")):
    return {k: tiny_config(data, f"{root}/{k}_{world}", **RW_COMMON, **{"scaling.num_workers": world, "hooks": RW_HOOKS[k]})
            for k in kinds}


def rw_worker(data, root) -> dict:
    import torch.distributed as dist

    return {k: rw_step(cfg) for k, cfg in rw_configs(data, root, dist.get_world_size()).items()}


# ---- the classification task for ELR / PS-KD --------------------------------------------------
N_CLS, N_SAMPLES, DIM = 3, 24, 6


class ToySource:
    """A data source with the `distreg.data` contract: a fixed 24-sample, 3-class task,
    world-size-independent position (distreg.data.position rules)."""

    unit = "img"

    def __init__(self, global_batch, grad_accum, rank, world_size, seed):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(N_SAMPLES, DIM, generator=g)
        self.y = torch.randint(0, N_CLS, (N_SAMPLES,), generator=g)
        self.num_samples = N_SAMPLES
        self.global_batch, self.grad_accum, self.rank, self.world_size, self.seed = global_batch, grad_accum, rank, world_size, seed
        self.epoch, self.consumed = 0, 0

    def step_indices(self) -> torch.Tensor:
        from distreg.data.position import epoch_permutation, step_start

        self.epoch, self.consumed = step_start(self.epoch, self.consumed, self.global_batch, self.num_samples)
        idx = epoch_permutation(self.num_samples, self.seed, self.epoch, True)[self.consumed:self.consumed + self.global_batch]
        self.consumed += self.global_batch
        return idx

    def next_step(self):
        from distreg.data.position import rank_slices

        return [{"input": self.x[i], "target": self.y[i], "index": i.clone()}
                for i in rank_slices(self.step_indices(), self.grad_accum, self.rank, self.world_size)]

    def metrics(self):
        return {"data/epoch": float(self.epoch)}

    def state_dict(self):
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state):
        self.epoch, self.consumed = state["epoch"], state["consumed"]


def toy_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, N_CLS))


def _patch_toy(patch):
    import distreg.runtime.trainer as T

    patch(T, "build_model", lambda cfg, seed, device="cpu", init=True: toy_model(seed))
    patch(T, "build_data", lambda cfg, rank, world, comm=None: ToySource(
        cfg.train.global_batch_size, cfg.train.grad_accum_steps, rank, world, cfg.train.seed))


STORE_HOOKS = "[{name: ps_kd, num_epochs: 2}, {name: elr, beta: 0.7, lam: 3.0}]"


def store_config(root, name, world, **extra):
    return tiny_config("unused", f"{root}/{name}", **{
        "strategy.name": "ddp", "optim.name": "sgd", "optim.lr": 0.5, "optim.schedule": "constant",
        "train.grad_clip": "null", "train.grad_accum_steps": 2, "train.max_steps": 6, "scaling.num_workers": world,
        "hooks": STORE_HOOKS, **extra})


def full_tables(trainer) -> dict:
    """The whole store of each hook, reassembled from every rank's slice (test only)."""
    out = {}
    for h in trainer.hooks:
        parts = trainer.comm.all_gather_uneven(h.store.table.float())
        out[h.name] = torch.cat(parts)
    return out


def store_runs(root, world) -> dict:
    """6 steps = 2 epochs straight; and 4 steps, checkpoint, resume, 2 more."""
    from distreg.runtime.trainer import Trainer

    a = Trainer(store_config(root, "straight", world), Comm(), track=False)
    straight = a.fit().losses
    b = Trainer(store_config(root, "split", world), Comm(), track=False)
    first = b.fit(stop_at=4).losses
    at_stop = full_tables(b)
    c = Trainer(store_config(root, "split", world), Comm(), track=False)
    second = c.fit(resume=True).losses
    return {"straight": straight, "first": first, "second": second, "at_stop": at_stop,
            "tables": full_tables(a), "resumed_tables": full_tables(c), "num_samples": a.ctx.num_samples,
            "metrics": {h.name: h.metrics() for h in a.hooks}}


def two_rank_worker(data, root) -> dict:
    out = {k: rw_step(cfg) for k, cfg in rw_configs(data, root, 2).items()}

    def patch(mod, name, value):
        setattr(mod, name, value)

    _patch_toy(patch)
    out["store"] = store_runs(root, 2)
    return out


def reference_store_run() -> dict:
    """Plain torch, one process, the spec formulas: PS-KD soft targets + ELR term, 6 SGD
    steps on the full global batch of 8."""
    src = ToySource(8, 1, 0, 1, 0)
    model = toy_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    P = torch.full((N_SAMPLES, N_CLS), float("nan"))
    T = torch.zeros(N_SAMPLES, N_CLS)
    losses = {}
    for step in range(1, 7):
        idx = src.step_indices()
        x, y = src.x[idx], src.y[idx]
        z = model(x)
        onehot = F.one_hot(y, N_CLS).float()
        alpha = 0.8 * (src.epoch + 1) / 2
        prev = onehot if src.epoch == 0 else torch.where(torch.isnan(P[idx]), onehot, P[idx])
        soft = (1 - alpha) * onehot + alpha * prev
        pskd = -(soft * F.log_softmax(z, -1)).sum(-1)
        p = F.softmax(z, -1).clamp(1e-4, 1 - 1e-4)
        t_new = 0.7 * T[idx] + 0.3 * p.detach() / p.detach().sum(-1, keepdim=True)
        loss = (pskd + 3.0 * torch.log(1 - (t_new * p).sum(-1))).mean()
        P[idx] = F.softmax(z.detach(), -1)
        T[idx] = t_new
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses[step] = float(loss)
    return {"losses": losses, "tables": {"ps_kd": P, "elr": T}}


@pytest.fixture(scope="module")
def runs(token_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reweighting_hooks"))
    single = {k: rw_step(cfg) for k, cfg in rw_configs(token_data, root, 1, ("loss", "dro", "none")).items()}
    with pytest.MonkeyPatch.context() as mp:
        _patch_toy(mp.setattr)
        single["store"] = store_runs(f"{root}/single", 1)
    two = run_distributed(two_rank_worker, 2, token_data, f"{root}/w2")
    four = run_distributed(rw_worker, 4, token_data, f"{root}/w4")
    return single, two, four


@pytest.mark.parametrize("kind", ["loss", "dro"])
def test_reweighting_rank_invariance_1_2_4_ranks(runs, kind):
    single, two, four = runs
    ref = single[kind]
    assert sorted(ref["weights"]) == sorted(set(ref["weights"])) and len(ref["weights"]) == 8
    assert sum(ref["weights"].values()) == pytest.approx(1.0, abs=1e-6)
    # it reweights: not the uniform 1/8, and another loss and gradient than no hook at all
    assert max(abs(w - 1 / 8) for w in ref["weights"].values()) > 1e-3
    assert abs(ref["loss"] - single["none"]["loss"]) > 1e-4
    assert max(float((ref["grad"][k] - single["none"]["grad"][k]).abs().max()) for k in ref["grad"]) > 1e-4
    for res in [*two, *four]:
        got = res[kind]
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6)
        assert got["weights"].keys() == ref["weights"].keys()
        for i, w in ref["weights"].items():
            assert got["weights"][i] == pytest.approx(w, abs=1e-6), i
        for k, g in ref["grad"].items():
            torch.testing.assert_close(got["grad"][k], g, atol=1e-6, rtol=0, msg=f"{kind}: {k}")
        for k, v in ref["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, abs=1e-6, rel=1e-6), k


def test_single_process_weights_are_the_core_weights_of_each_global_micro_batch(token_data, runs, tmp_path):
    """Recompute the 1-process step by hand: per-sample losses of the initial model on the
    step's two micro-batches, LinUpper (r 0.5) over each, halved (uniform token counts)."""
    from distreg.data import build_data
    from distreg.models import build_model
    from distreg.runtime.loss import per_sample_loss

    single = runs[0]
    cfg = rw_configs(token_data, str(tmp_path), 1, ("loss",))["loss"]
    model = build_model(cfg.model, cfg.train.seed)
    want = {}
    with torch.no_grad():
        for b in build_data(cfg, 0, 1).next_step():
            w = linupper_weights(per_sample_loss(model(b["input"]), b["target"]), r=0.5) / 2
            want.update(zip(b["index"].tolist(), w.tolist()))
    got = single["loss"]["weights"]
    assert got.keys() == want.keys()
    for i in want:
        assert got[i] == pytest.approx(want[i], abs=1e-6)


def test_elr_pskd_two_epochs_two_ranks_equal_single_process_and_reference(runs):
    single, two, _ = runs
    ref = reference_store_run()
    s = single["store"]
    assert s["num_samples"] == N_SAMPLES  # the Trainer passed the data source's num_samples
    for step, v in ref["losses"].items():
        assert s["straight"][step] == pytest.approx(v, abs=1e-5), step
    for name, table in ref["tables"].items():
        assert not torch.isnan(table).any()  # every sample visited in the 2 epochs (24 = 3 x 8)
        torch.testing.assert_close(s["tables"][name], table, atol=1e-5, rtol=0, msg=name)
    assert ref["losses"][6] < ref["losses"][1]
    for res in two:
        got = res["store"]
        for step, v in s["straight"].items():
            assert got["straight"][step] == pytest.approx(v, abs=1e-6), step
        for name, table in s["tables"].items():
            torch.testing.assert_close(got["tables"][name], table, atol=1e-6, rtol=0, msg=name)
        assert got["metrics"]["ps_kd"] == {"ps_kd/alpha": pytest.approx(0.8)}
        assert got["metrics"]["elr"] == pytest.approx(s["metrics"]["elr"], abs=1e-6)


@pytest.mark.parametrize("world", [1, 2])
def test_store_state_survives_checkpoint_resume(runs, world):
    single, two, _ = runs
    for got in ([single["store"]] if world == 1 else [r["store"] for r in two]):
        assert sorted(got["first"]) == [1, 2, 3, 4] and sorted(got["second"]) == [5, 6]
        for step in range(1, 7):
            v = got["first"][step] if step <= 4 else got["second"][step]
            assert v == pytest.approx(got["straight"][step], abs=1e-6), step
        for name in got["tables"]:
            torch.testing.assert_close(got["resumed_tables"][name], got["tables"][name], atol=1e-6, rtol=0)
            # the stop happened mid-epoch 1: the stored rows were needed (and differ from the end state)
            assert not torch.allclose(got["at_stop"][name].nan_to_num(), got["tables"][name], atol=1e-4)
