"""The `dsnot` hook: Wanda + DSnoT masks from training forwards, then held fixed.

In-process (thread ranks holding FSDP2-like row blocks or ZeRO-3-like flat slices, the
latter cutting rows so the gather route runs): the gathered masks equal the core
(`prune_rows`) on the whole weights with single-rank statistics; metrics; forwards
without grad and checkpoint recomputations are not counted; resume mid-calibration;
`mask_file` mode; parameter validation.
Multi-process (one 2-rank spawn): ddp / fsdp2 / ZeRO-3 on the tiny Llama, 3 steps, masks
after step 1 equal the single-process run's, which equal the core on that run's weights
and statistics; masked weights are exactly zero after 3 steps.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from distreg.hooks.dsnot import DSnoTHook
from distreg.runtime.comm import Comm
from distreg.sparsity.dsnot import CalibrationStats, prune_rows
from distreg.testing import gather_full_params, gather_masks, run_distributed
from tests.conftest import tiny_config
from tests.hooks.test_sparsity_hooks import Fake
from tests.threadcomm import run_threads

NAMES = ("layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight")


class TinyNet(nn.Module):
    """Two participating linears (Llama names) fed the same input, and an output head the
    default `include: [layers.*]` leaves out."""

    def __init__(self):
        super().__init__()
        block = nn.Module()
        block.attention, block.feed_forward = nn.Module(), nn.Module()
        block.attention.wq = nn.Linear(12, 5, bias=False)  # 60 elements: flat slices cut rows
        block.feed_forward.w1 = nn.Linear(12, 7, bias=False)
        self.layers = nn.ModuleList([block])
        self.output = nn.Linear(12, 3, bias=False)

    def forward(self, x):
        b = self.layers[0]
        return b.attention.wq(x).sum() + b.feed_forward.w1(x).sum() + self.output(x).sum()


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    fulls = {"layers.0.attention.wq.weight": torch.randn(5, 12, generator=g),
             "layers.0.feed_forward.w1.weight": torch.randn(7, 12, generator=g),
             "output.weight": torch.randn(3, 12, generator=g)}
    seqs = [torch.randn(2, 6, 12, generator=g) * 0.7 + torch.randn(12, generator=g) for _ in range(6)]
    return fulls, seqs


def gather(per_rank: list[dict], fulls: dict, key: str) -> dict[str, torch.Tensor]:
    return {n: torch.cat([r[key][n] for r in per_rank]).view(fulls[n].shape) for n in NAMES}


PARAMS = {"sparsity": 0.5, "skip_layer": "no_skip", "threshold": 0.05, "plot": False}


def calibrate(comm, mode, fulls, seqs, params, split_at=None):
    """Train start at step 0, this rank's share of the sequences forwarded at step 0 (and
    step 1 with calib_steps 2), masks at after_step."""
    f = Fake({k: v.clone() for k, v in fulls.items()}, comm, mode, model=TinyNet())
    hook = DSnoTHook(DSnoTHook.Params(**params))
    hook.on_train_start(f.ctx)
    mine = seqs[comm.rank::comm.world_size]
    for step in range(params.get("calib_steps", 1)):
        for x in (mine if params.get("calib_steps", 1) == 1 else mine[step::2]):
            f.ctx.model(x)
        f.ctx.step = step + 1
        if split_at == step + 1:  # checkpoint here, continue in a fresh hook
            state = hook.state_dict()
            hook = DSnoTHook(DSnoTHook.Params(**params))
            hook.load_state_dict(state)
            hook.on_train_start(f.ctx)
        hook.after_step(f.ctx)
    return {"masks": {n: hook.masks[n] for n in NAMES}, "weights": {n: f.local[n] for n in NAMES},
            "metrics": hook.metrics(), "names": hook.names}


def reference(fulls, seqs, **kw):
    stats = CalibrationStats(12)
    for x in seqs:
        stats.add(x)
    return {n: prune_rows(fulls[n], stats, 0.5, dsnot=True, threshold=0.05, **kw) for n in NAMES}


@pytest.mark.parametrize("world,mode", [(1, "rows"), (2, "rows"), (3, "rows"), (2, "flat"), (3, "flat")])
def test_masks_equal_the_core_on_any_split(world, mode):
    fulls, seqs = data()
    ref = reference(fulls, seqs)
    res = run_threads(calibrate, world, mode, fulls, seqs, PARAMS)
    masks, weights = gather(res, fulls, "masks"), gather(res, fulls, "weights")
    assert res[0]["names"] == list(NAMES)  # nn.Linear weights under layers.*, not the head
    swaps = 0
    for n in NAMES:
        assert torch.equal(masks[n], ref[n].keep), n
        assert torch.equal(weights[n], fulls[n] * ref[n].keep), n
        swaps += int(ref[n].swaps.sum())
    assert swaps > 0
    rows = sum(r.keep.shape[0] for r in ref.values())
    m = res[0]["metrics"]
    assert all(r["metrics"] == m for r in res)
    assert m["dsnot/global"] == 0.5 and m["dsnot/target"] == 0.5
    assert m["dsnot/swaps"] == swaps and m["dsnot/cycles"] == max(r.cycles for r in ref.values())
    assert m["dsnot/error_before"] == pytest.approx(sum(float(r.error_before.abs().sum()) for r in ref.values()) / rows)
    assert m["dsnot/error_after"] == pytest.approx(sum(float(r.error_after.abs().sum()) for r in ref.values()) / rows)


def test_skip_layer_default_and_nm():
    fulls, seqs = data()
    res = run_threads(calibrate, 2, "rows", fulls, seqs, {"nm": "1:4", "threshold": 0.05, "plot": False})
    masks = gather(res, fulls, "masks")
    stats = CalibrationStats(12)
    for x in seqs:
        stats.add(x)
    for n in NAMES:  # skip_layer mlp: feed_forward keeps its plain Wanda 1:4 mask
        ref = prune_rows(fulls[n], stats, 0.25, nm="1:4", threshold=0.05, dsnot="feed_forward" not in n)
        assert torch.equal(masks[n], ref.keep), n
        assert ((~masks[n]).view(-1, 4).sum(1) == 1).all()


def test_forwards_without_grad_and_recomputations_are_not_counted():
    fulls, seqs = data()
    f = Fake(fulls, Comm(), "rows", model=TinyNet())
    hook = DSnoTHook(DSnoTHook.Params(**PARAMS))
    hook.on_train_start(f.ctx)
    x = seqs[0].requires_grad_(True)
    torch.utils.checkpoint.checkpoint(f.ctx.model, x, use_reentrant=False).backward()  # recomputed in backward
    with torch.no_grad():
        f.ctx.model(seqs[1])
    st = hook.calib["layers.0.attention.wq.weight"]
    assert st.sequences == 2 and st.tokens == 12  # the one batch of 2 sequences x 6 tokens


def test_resume_mid_calibration_gives_the_same_masks():
    fulls, seqs = data()
    params = dict(PARAMS, calib_steps=2)
    straight = run_threads(calibrate, 2, "flat", fulls, seqs, params)
    resumed = run_threads(calibrate, 2, "flat", fulls, seqs, params, 1)
    for a, b in zip(straight, resumed):
        assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in NAMES)
    assert torch.equal(gather(straight, fulls, "masks")[NAMES[0]], reference(fulls, seqs)[NAMES[0]].keep)


def test_mask_file_mode(tmp_path):
    fulls, _ = data()
    g = torch.Generator().manual_seed(3)
    saved = {n: torch.rand(fulls[n].shape, generator=g) > 0.4 for n in NAMES}
    torch.save(saved, tmp_path / "masks.pt")

    def body(comm):
        f = Fake({k: v.clone() for k, v in fulls.items()}, comm, "flat", model=TinyNet())
        hook = DSnoTHook(DSnoTHook.Params(mask_file=str(tmp_path / "masks.pt"), plot=False))
        hook.on_train_start(f.ctx)
        f.local[NAMES[0]] += 1.0  # an optimizer step moves every weight; after_step re-masks
        f.ctx.step = 1
        hook.after_step(f.ctx)
        return {"masks": {n: hook.masks[n] for n in NAMES}, "weights": {n: f.local[n] for n in NAMES}}

    res = run_threads(body, 3)
    masks, weights = gather(res, fulls, "masks"), gather(res, fulls, "weights")
    for n in NAMES:
        assert torch.equal(masks[n], saved[n])
        assert torch.equal(weights[n] == 0, ~saved[n]), n
    torch.save({NAMES[0]: saved[NAMES[0]]}, tmp_path / "partial.pt")
    f = Fake(fulls, Comm(), "rows", model=TinyNet())
    with pytest.raises(ValueError, match="no mask for layers.0.feed_forward.w1.weight"):
        DSnoTHook(DSnoTHook.Params(mask_file=str(tmp_path / "partial.pt"))).on_train_start(f.ctx)


def test_params_validated_in_yaml():
    from distreg.config import ConfigError, load_config

    assert load_config(None, ['hooks=[{name: dsnot, nm: "2:4"}]']).hooks[0].name == "dsnot"
    for bad, msg in (("{name: dsnot}", "set sparsity"),
                     ('{name: dsnot, nm: "2:4", sparsity: 0.3}', "sparsity must be 0.5"),
                     ("{name: dsnot, sparsity: 1.0}", "sparsity"), ('{name: dsnot, nm: "4:2"}', "N:M"),
                     ("{name: dsnot, sparsity: 0.5, skip_layer: ffn}", "skip_layer"),
                     ("{name: dsnot, sparsity: 0.5, calib_step: 2}", "unknown parameter")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [f"hooks=[{bad}]"])
    f = Fake({"layers.0.table": torch.zeros(3, 12)}, Comm(), "rows", model=TinyNet())  # 2-D, no nn.Linear
    with pytest.raises(ValueError, match="no nn.Linear weight matches"):
        DSnoTHook(DSnoTHook.Params(sparsity=0.5)).on_train_start(f.ctx)


# --------------------------------------------------------------------------- real strategies (one spawn)

STEPS = 3
HOOK = {"name": "dsnot", "sparsity": 0.5, "skip_layer": "no_skip", "threshold": 0.05, "at_step": 0, "calib_steps": 1,
        "plot": False}
STRATEGIES = {
    "ddp": {"strategy.name": "ddp"},
    "fsdp2": {"strategy.name": "fsdp2"},
    "zero3": {"strategy.name": "deepspeed", "strategy.zero_stage": 3},
}




def train(cfg, capture: bool = False) -> dict:
    from distreg.runtime.trainer import Trainer

    trainer = Trainer(cfg, Comm(), track=False)
    ctx, hook = trainer.ctx, trainer.hooks[0]
    captured: dict = {}
    if capture:  # single process: the weights and statistics the masks were computed from
        compute = hook.compute_masks

        def spy(c, shards):
            captured["weights"] = {s.name: s.data().detach().clone().view(s.full_shape) for s in shards}
            keeps = compute(c, shards)
            captured["stats"] = dict(hook.calib)
            return keeps

        hook.compute_masks = spy
    hook.on_train_start(ctx)
    losses = []
    for t in range(STEPS):
        losses.append(trainer.train_step()[0])
        if t == 0:
            at_mask = gather_masks(hook, ctx)
    return {"losses": losses, "masks": at_mask, "end_masks": gather_masks(hook, ctx), "metrics": hook.metrics(),
            "params": gather_full_params(ctx.local_shards(), trainer.comm), **captured}


def two_rank_worker(data: str, root: str) -> dict:
    hooks = json.dumps([HOOK])
    return {name: train(tiny_config(data, f"{root}/{name}", **{"scaling.num_workers": 2, "hooks": hooks, **extra}))
            for name, extra in STRATEGIES.items()}


@pytest.fixture(scope="module")
def runs(token_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dsnot_hook"))
    cfg = tiny_config(token_data, f"{root}/single", **{"scaling.num_workers": 1, "hooks": json.dumps([HOOK]),
                                                       **STRATEGIES["ddp"]})
    return train(cfg, capture=True), run_distributed(two_rank_worker, 2, token_data, root)


def test_single_process_masks_are_the_core_on_its_weights_and_statistics(runs):
    single, _ = runs
    assert len(single["masks"]) == 14  # every nn.Linear of the 2 blocks, not the output head
    swaps = 0
    for name, keep in single["masks"].items():
        ref = prune_rows(single["weights"][name], single["stats"][name], 0.5, threshold=0.05)
        assert torch.equal(keep, ref.keep), name
        assert ((~keep).sum(1) == keep.shape[1] // 2).all(), name
        swaps += int(ref.swaps.sum())
        # the calibration step's global batch: 8 sequences of 32 tokens
        assert single["stats"][name].sequences == 8 and single["stats"][name].tokens == 8 * 32
    assert single["metrics"]["dsnot/swaps"] == swaps > 0
    assert single["metrics"]["dsnot/error_after"] < single["metrics"]["dsnot/error_before"]


@pytest.mark.parametrize("name", ["single", *STRATEGIES])
def test_masks_hold_after_three_steps(runs, name):
    single, ranks = runs
    for got in ([single] if name == "single" else [r[name] for r in ranks]):
        for pname, keep in got["masks"].items():
            assert torch.equal(got["end_masks"][pname], keep), pname  # fixed after the computation
            assert torch.equal(got["params"][pname] == 0, ~keep), f"{name}: {pname}"
        assert got["metrics"]["dsnot/global"] == 0.5


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_rank_invariance_against_single_process(runs, name):
    single, ranks = runs
    for got in (r[name] for r in ranks):
        assert got["masks"].keys() == single["masks"].keys()
        for pname, keep in single["masks"].items():
            assert torch.equal(got["masks"][pname], keep), f"{name}: {pname}"
        for key in ("dsnot/swaps", "dsnot/cycles", "dsnot/global"):
            assert got["metrics"][key] == single["metrics"][key], key
        for key in ("dsnot/error_before", "dsnot/error_after"):
            assert got["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5), key
        assert got["losses"] == pytest.approx(single["losses"], abs=1e-5)
