"""DSnoT + Wanda core (`distreg.sparsity.dsnot`) and the `distreg prune dsnot` command.

Core: the spec's one-row test vector (section 5); hand-built cases for N:M and for the
reference's cursor quirk; statistics by hand, against the reference's running update
(`WrappedGPT.add_batch`) and sharded over thread ranks; the vectorised cycle against a
per-row plain-Python loop of the spec and against a literal transcription of the
reference's unstructured branch (zyxxmu/DSnoT `lib/prune.py`).
Command: a tiny Llama checkpoint from a 2-step training run, pruned with --world-size 1
and 2 (one spawn): same masks, exact per-row sparsity, block 0's q-projection mask
recomputed independently, loadable output, report; bad flags named.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from distreg.cli import main
from distreg.sparsity.dsnot import (
    CalibrationStats,
    all_reduce_stats,
    dsnot_rows,
    prune_rows,
    skipped,
    wanda_mask,
)
from tests.threadcomm import run_threads

F64 = torch.float64

# --------------------------------------------------------------------------- spec vectors


def test_spec_one_row_vector():
    w = torch.tensor([[1.0, -0.5, 0.2, 0.4]])
    mu, s, v = torch.tensor([0.1, 0.5, 0.2, 0.1]), torch.tensor([4.0, 1, 1, 4]), torch.tensor([1.0, 1, 0.5, 2])
    # Wanda A = |W| sqrt(S) = [2.0, 0.5, 0.2, 0.8] -> pruned {1, 2}
    keep = wanda_mask(w, s, 0.5)
    assert keep.tolist() == [[True, False, False, True]]
    for quirk in (False, True):
        res = dsnot_rows(w, keep, mu, v, s, max_cycles=50, threshold=0.1, fidelity_cursor_quirk=quirk)
        # c = [0.1, -0.25, 0.04, 0.04], e = -0.21; cycle 1: grow 1 (c/v = -0.25, front), prune 3
        # (back of the prune list [0, 3]), |e| > 0.1 -> e = 0.08; cycle 2: |e| <= 0.1, stop
        torch.testing.assert_close(res.error_before, torch.tensor([-0.21], dtype=F64))
        torch.testing.assert_close(res.error_after, torch.tensor([0.08], dtype=F64))
        assert res.keep.tolist() == [[True, True, False, False]]  # pruned {2, 3}
        assert res.cycles == 2 and res.swaps.tolist() == [1]
    assert torch.equal(w * res.keep, torch.tensor([[1.0, -0.5, 0.0, 0.0]]))


def test_nm_hand_case():
    # 2:4, S = v = 1 (Wanda = |W|, growth key = c). Initial: block 0 prunes {2, 3}, block 1 {6, 4}.
    w = torch.tensor([[1.0, -0.5, 0.2, 0.4, 0.3, -0.6, 0.1, 0.9]])
    c = torch.tensor([-0.1, -0.05, 0.2, 0.05, -0.02, 0.04, 0.07, 0.01])
    ones = torch.ones(8)
    keep = wanda_mask(w, ones, nm="2:4")
    assert keep.tolist() == [[True, True, False, False, False, True, False, True]]
    for quirk in (False, True):
        res = dsnot_rows(w, keep, c / w[0], ones, ones, 50, 0.01, nm="2:4", fidelity_cursor_quirk=quirk)
        # e = 0.2 + 0.05 - 0.02 + 0.07 = 0.3 > 0: growth from the back of [4, 3, 6, 2]
        # cycle 1: grow 2 (0.2), prune the smallest kept |W| of block 0 = 1 (c -0.05): e = 0.05
        # cycle 2: grow 6 (0.07), block 1's smallest kept = 5 (c 0.04): e = 0.02
        # cycle 3: grow 3 (0.05), block 0's only finite kept = 0 (c -0.1): e would be -0.13,
        #          the sign flips -> rejected (the N:M branch always checks the sign)
        assert res.keep.tolist() == [[True, False, True, False, False, False, True, True]]
        torch.testing.assert_close(res.error_after, torch.tensor([0.02], dtype=F64))
        assert res.cycles == 3 and res.swaps.tolist() == [2]


def test_cursor_quirk_hand_case():
    # Row A: kept {0, 1}, e = 0.35: grow 2 (c 0.2), prune 1 (c -0.06) -> e = 0.09, stops at cycle 2.
    # Row B: e = -0.05 is rejected in cycle 1, but the loop runs a 2nd cycle for row A. In the
    # reference B's growth front cursor then sits on kept position 0 (value 0 in its list:
    # [2, 0, 1, 3]) and the rejected row writes "pruned" there: B loses a kept weight.
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, -0.2, 0.1]])
    mu, ones = torch.tensor([-0.1, -0.2, 1.0, 1.5]), torch.ones(4)
    keep = wanda_mask(w, ones, 0.5)
    valid = dsnot_rows(w, keep, mu, ones, ones, 50, 0.1)
    quirk = dsnot_rows(w, keep, mu, ones, ones, 50, 0.1, fidelity_cursor_quirk=True)
    assert valid.keep.tolist() == [[True, False, True, False], [True, True, False, False]]
    assert quirk.keep.tolist() == [[True, False, True, False], [False, True, False, False]]
    assert valid.cycles == quirk.cycles == 2
    torch.testing.assert_close(valid.error_after, torch.tensor([0.09, -0.05], dtype=F64))
    # with mu_1 = -0.1 row A runs a 3rd cycle and B's prune cursor leaves its 2-entry list
    mu[1] = -0.1
    with pytest.raises(ValueError, match="prune cursor of row 1 left its list in cycle 3"):
        dsnot_rows(w, keep, mu, ones, ones, 50, 0.1, fidelity_cursor_quirk=True)
    assert (~dsnot_rows(w, keep, mu, ones, ones, 50, 0.1).keep).sum(1).tolist() == [2, 2]


def test_skip_layer_names():
    assert skipped("layers.0.feed_forward.w1.weight", "mlp") and skipped("mlp.gate_proj", "mlp")
    assert not skipped("layers.0.attention.wq.weight", "mlp")
    assert skipped("layers.0.attention.wq.weight", "self_attn") and skipped("self_attn.q_proj", "self_attn")
    assert not skipped("layers.0.feed_forward.w1.weight", "no_skip")
    with pytest.raises(ValueError, match="skip_layer"):
        skipped("x", "ffn")


# --------------------------------------------------------------------------- statistics


def test_statistics_by_hand():
    # one column; sequence 1 = [1, 3] (mean 2, population var 1), sequence 2 = [2, 4, 6] (mean 4, var 8/3)
    st = CalibrationStats(1)
    st.add(torch.tensor([[1.0], [3.0]]))
    st.add(torch.tensor([[[2.0], [4.0], [6.0]]]))
    assert st.sequences == 2 and st.tokens == 5
    assert st.mean.item() == pytest.approx(16 / 2)  # sum x / N_s
    assert st.scaler.item() == pytest.approx(66 / 2)  # sum x^2 / N_s
    assert st.var.item() == pytest.approx((2 * 1 + 3 * 8 / 3) / 5)  # = 2, not the pooled 2.96


def reference_running_stats(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's `WrappedGPT.add_batch`, one sequence per call (as its calibration
    loop does), transcribed in float64."""
    d = seqs[0].shape[-1]
    scaler, summ, var = torch.zeros(d, dtype=F64), torch.zeros(d, dtype=F64), torch.zeros(d, dtype=F64)
    nsamples = ntokens = 0
    for x in seqs:
        inp = x.to(F64).unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, d).t()
        var_inp = torch.var(inp, dim=1, unbiased=False)
        num = inp.shape[1]
        var = var_inp if ntokens == 0 else (var * ntokens + var_inp * num) / (ntokens + num)
        ntokens += num
        scaler *= nsamples / (nsamples + tmp)
        summ *= nsamples / (nsamples + tmp)
        nsamples += tmp
        scaler += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
        summ += torch.sum(inp, dim=1) / nsamples
    return scaler, summ, var


def test_statistics_equal_the_reference_running_update_and_batching_does_not_matter():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn(t, 6, generator=g) * 2 + torch.randn(6, generator=g) for t in (5, 9, 5, 7)]
    one = CalibrationStats(6)
    for x in seqs:
        one.add(x)
    s, mu, v = reference_running_stats(seqs)
    torch.testing.assert_close(one.scaler, s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one.mean, mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one.var, v, rtol=1e-12, atol=1e-12)
    batched = CalibrationStats(6)
    batched.add(torch.stack([seqs[0], seqs[2]]))  # equal lengths batch together, per sequence
    batched.add(seqs[1])
    batched.add(seqs[3].float())
    torch.testing.assert_close(batched.pack(), one.pack(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("world", [2, 3])
def test_statistics_sharded_over_thread_ranks_equal_one_rank(world):
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randn(8, 5, generator=g) + 0.5 for _ in range(7)]
    w = torch.randn(6, 5, generator=g)

    def body(comm):
        stats = [CalibrationStats(5), CalibrationStats(5)]
        for x in seqs[comm.rank::comm.world_size]:  # uneven shares (7 sequences)
            stats[0].add(x)
            stats[1].add(x.square())
        all_reduce_stats(stats, comm)
        return stats

    single = body(type("One", (), {"rank": 0, "world_size": 1})())
    for got in run_threads(body, world):
        for a, b in zip(got, single):
            torch.testing.assert_close(a.pack(), b.pack(), rtol=1e-12, atol=1e-12)
            assert torch.equal(prune_rows(w, a, 0.5, threshold=0.0).keep, prune_rows(w, b, 0.5, threshold=0.0).keep)


# --------------------------------------------------------------------------- vectorised vs loops


def loop_reference(w, keep, mu, v, s, max_cycles, tau, same_sign=False, nm=None):
    """The spec's cycle, one row at a time in plain Python floats (valid-candidate lists).
    Returns per row (keep, e_before, e_after, swaps, cycles the row took part in)."""
    out = []
    d = len(mu)
    for wr, kr in zip(w.tolist(), keep.tolist()):
        c = [wr[j] * mu[j] for j in range(d)]
        ratio = [0.0 if c[j] == 0 else c[j] / v[j] for j in range(d)]
        wanda = [abs(wr[j]) * math.sqrt(s[j]) for j in range(d)]
        kr = list(kr)
        pruned = [j for j in range(d) if not kr[j]]
        grow = sorted(pruned, key=lambda j: (ratio[j], j))
        kept = [j for j in range(d) if kr[j]]
        plist = (sorted([j for j in kept if c[j] < 0], key=lambda j: (wanda[j], j))
                 + sorted([j for j in kept if c[j] == 0], key=lambda j: (wanda[j], j))
                 + sorted([j for j in kept if c[j] > 0], key=lambda j: (-wanda[j], -j)))
        score = [wanda[j] if kr[j] else math.inf for j in range(d)]
        e = e0 = sum(c[j] for j in pruned)
        gf, gb, pf, pb = 0, len(grow) - 1, 0, len(plist) - 1
        swaps = cycles = 0
        while cycles < max_cycles:
            cycles += 1
            if gf > gb:
                break
            g = grow[gb] if e > 0 else grow[gf]
            if nm is None:
                if pf > pb:
                    break
                p = plist[pb] if e < 0 else plist[pf]
            else:
                block = range(g - g % nm[1], g - g % nm[1] + nm[1])
                p = min(block, key=lambda j: (score[j], j))
                if score[p] == math.inf:
                    break
            after = e + c[p] - c[g]
            sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
            if not abs(e) > tau or ((same_sign or nm) and sign(after) != sign(e0)):
                break
            kr[g], kr[p], score[p] = True, False, math.inf
            swaps += 1
            gb, gf = (gb - 1, gf) if e > 0 else (gb, gf + 1)
            pb, pf = (pb - 1, pf) if e < 0 else (pb, pf + 1)
            e = after
        out.append((kr, e0, e, swaps, cycles))
    return out


def random_layer(seed, rows, d, zero_cols=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, d, generator=g)
    mu = torch.randn(d, generator=g) * 0.3
    mu[:zero_cols] = 0.0
    v = torch.rand(d, generator=g) * 1.8 + 0.2
    s = torch.rand(d, generator=g) * 1.5 + 0.5
    return w, mu, v, s


@pytest.mark.parametrize("tau,max_cycles,same_sign,nm", [
    (0.1, 50, False, None), (0.0, 50, False, None), (0.05, 4, True, None), (0.0, 50, False, (2, 4)),
    (0.05, 6, False, (1, 4)),
])
def test_vectorised_rows_equal_the_per_row_loop(tau, max_cycles, same_sign, nm):
    w, mu, v, s = random_layer(3, 40, 24)
    keep = wanda_mask(w, s, 0.5 if nm is None else nm[0] / nm[1], nm=nm)
    res = dsnot_rows(w, keep, mu, v, s, max_cycles, tau, same_sign=same_sign, nm=nm)
    ref = loop_reference(w.double(), keep, mu.double().tolist(), v.double().tolist(), s.double().tolist(),
                         max_cycles, tau, same_sign, nm)
    assert res.keep.tolist() == [r[0] for r in ref]
    torch.testing.assert_close(res.error_before, torch.tensor([r[1] for r in ref], dtype=F64))
    torch.testing.assert_close(res.error_after, torch.tensor([r[2] for r in ref], dtype=F64))
    assert res.swaps.tolist() == [r[3] for r in ref] and res.swaps.sum() > 10
    assert res.cycles == max(r[4] for r in ref)
    # exact per-row sparsity (and N:M pattern) survives every swap
    pruned = ~res.keep
    if nm is None:
        assert (pruned.sum(1) == 12).all()
    else:
        assert (pruned.view(40, -1, nm[1]).sum(-1) == nm[0]).all()
    # rows are independent: any split into row blocks gives the same rows
    parts = [dsnot_rows(w[a:b], keep[a:b], mu, v, s, max_cycles, tau, same_sign=same_sign, nm=nm)
             for a, b in ((0, 7), (7, 23), (23, 40))]
    assert torch.equal(torch.cat([p.keep for p in parts]), res.keep)
    assert max(p.cycles for p in parts) == res.cycles


def return_reorder_indice(input_tensor):
    """Transcribed from the reference (`lib/prune.py`)."""
    positive_tensor, negative_tensor = input_tensor.clone(), input_tensor.clone()
    positive_mask, negative_mask = positive_tensor > 0, negative_tensor < 0
    positive_indices = torch.arange(0, input_tensor.shape[1]).to(F64).repeat(input_tensor.shape[0], 1)
    negative_indices = torch.arange(0, input_tensor.shape[1]).to(F64).repeat(input_tensor.shape[0], 1)
    positive_indices[~positive_mask] = float("inf")
    negative_indices[~negative_mask] = float("inf")
    positive_value, _ = torch.sort(positive_indices, dim=1)
    negative_value, _ = torch.sort(negative_indices, dim=1)
    positive_value = torch.flip(positive_value, dims=[1])
    negative_value[negative_value == float("inf")] = 0
    positive_value[positive_value == float("inf")] = 0
    return (positive_value + negative_value).to(torch.int64)


def reference_unstructured(weight, scaler_row, sum_metric_row, var, sparsity_ratio, max_cycle_time, update_threshold):
    """The reference's unstructured DSnoT branch (initial_method wanda, pow_of_var_regrowing 1,
    without_same_sign True), transcribed in float64 with its variable names. Returns the
    keep-mask and the cycle count."""
    weight = weight.to(F64)
    DSnoT_metric = weight * sum_metric_row.reshape((1, -1))
    initial_metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    weight_mask = torch.zeros_like(initial_metric) == 1
    _, sorted_initial_indice = torch.sort(initial_metric, dim=-1, stable=True)
    sparsity_num = int(initial_metric.shape[1] * sparsity_ratio)
    res_sparsity_num = sorted_initial_indice.shape[1] - sparsity_num
    initial_prune_indices, initial_res_indices = torch.split(sorted_initial_indice, [sparsity_num, res_sparsity_num], 1)
    weight_mask.scatter_(1, initial_prune_indices, True)
    metric_for_regrowing = DSnoT_metric.clone()
    wanda_metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    metric_for_regrowing.scatter_(1, initial_res_indices, 0)
    reconstruction_error = torch.sum(metric_for_regrowing, dim=1, keepdim=True)
    metric_for_regrowing /= torch.pow(var.reshape((1, -1)), 1)
    _, regrowing_indices_block = torch.sort(metric_for_regrowing, dim=1, stable=True)
    wanda_metric.scatter_(1, initial_prune_indices, float("inf"))
    wanda_res_indices, _ = torch.split(torch.sort(wanda_metric, dim=1, stable=True)[1],
                                       [res_sparsity_num, sparsity_num], 1)
    reorder = return_reorder_indice(torch.gather(DSnoT_metric, 1, wanda_res_indices))
    pruning_indices_block = torch.gather(wanda_res_indices, 1, reorder)
    rows = reconstruction_error.shape[0]
    ii_grow = torch.zeros((rows, 2), dtype=torch.long)
    ii_grow[:, 1] = regrowing_indices_block.shape[-1] - 1
    step_grow = torch.ones((rows, 2), dtype=torch.long)
    step_grow[:, 1] = -1
    ii_prune = torch.zeros((rows, 2), dtype=torch.long)
    ii_prune[:, 1] = pruning_indices_block.shape[-1] - 1
    step_prune = torch.ones((rows, 2), dtype=torch.long)
    step_prune[:, 1] = -1
    update_mask = torch.ones_like(reconstruction_error, dtype=torch.bool)
    cycle_time = 0
    while not (torch.all(update_mask == False) or cycle_time >= max_cycle_time):  # noqa: E712
        cycle_time += 1
        which = (reconstruction_error > 0).int().to(torch.int64)
        at = torch.gather(ii_grow, 1, which)
        regrowing_indice = torch.gather(regrowing_indices_block, 1, at)
        regrowing_metric = DSnoT_metric.gather(1, regrowing_indice)
        ii_grow.scatter_(1, which, at + step_grow.gather(1, which))
        which = (reconstruction_error < 0).int().to(torch.int64)
        at = torch.gather(ii_prune, 1, which)
        pruning_indice = torch.gather(pruning_indices_block, 1, at)
        pruning_metric = DSnoT_metric.gather(1, pruning_indice)
        ii_prune.scatter_(1, which, at + step_prune.gather(1, which))
        update_mask = update_mask & (abs(reconstruction_error) > update_threshold)
        weight_mask.scatter_(1, pruning_indice, update_mask)
        weight_mask.scatter_(1, regrowing_indice, ~update_mask)
        reconstruction_error += torch.where(update_mask, pruning_metric, torch.zeros_like(pruning_metric))
        reconstruction_error -= torch.where(update_mask, regrowing_metric, torch.zeros_like(regrowing_metric))
    return ~weight_mask, cycle_time


@pytest.mark.parametrize("zero_cols,tau", [(0, 0.1), (4, 0.02)])
def test_quirk_mode_equals_the_transcribed_reference(zero_cols, tau):
    # d = 32, max 10 cycles: every cursor stays inside the reference's lists (16 and 32 long);
    # mu = 0 columns give c = 0 kept entries, which the reference's reorder replaces by the
    # prune list's first entry.
    w, mu, v, s = random_layer(5, 48, 32, zero_cols)
    ref_keep, ref_cycles = reference_unstructured(w, s.double(), mu.double(), v.double(), 0.5, 10, tau)
    res = prune_rows(w, _stats_of(s, mu, v), 0.5, max_cycles=10, threshold=tau, fidelity_cursor_quirk=True)
    assert torch.equal(res.keep, ref_keep) and res.cycles == ref_cycles
    if zero_cols == 0:
        # rows whose four sign regions (pruned c < 0 / c > 0 in the growth list, kept c < 0 /
        # c > 0 in the prune list) are longer than the cycles run never reach an invalid
        # candidate: there the valid-candidate lists give the reference's masks
        ref_keep, _ = reference_unstructured(w, s.double(), mu.double(), v.double(), 0.5, 3, tau)
        valid = prune_rows(w, _stats_of(s, mu, v), 0.5, max_cycles=3, threshold=tau)
        init = wanda_mask(w, s, 0.5)
        c = w.double() * mu.double()
        regions = torch.stack([(~init & (c < 0)).sum(1), (~init & (c > 0)).sum(1),
                               (init & (c < 0)).sum(1), (init & (c > 0)).sum(1)]).min(0).values
        inside = regions >= 3
        assert inside.sum() >= 30
        assert torch.equal(valid.keep[inside], ref_keep[inside])


def _stats_of(s, mu, v) -> CalibrationStats:
    """Statistics with the given S, mu, v (one 'sequence', tokens = 1)."""
    d = s.numel()
    return CalibrationStats(d).load_packed(torch.cat([s.double(), mu.double(), v.double(),
                                                      torch.tensor([1.0, 1.0], dtype=F64)]))


def test_prune_rows_initial_methods_and_errors():
    w, mu, v, s = random_layer(7, 5, 8)
    st = _stats_of(s, mu, v)
    mag = prune_rows(w, st, 0.5, initial="magnitude", dsnot=False)
    ref = torch.ones_like(mag.keep).scatter_(1, w.abs().sort(dim=1, stable=True).indices[:, :4], False)
    assert torch.equal(mag.keep, ref) and mag.cycles == 0
    assert torch.equal(prune_rows(w, st, 0.5, dsnot=False).keep, wanda_mask(w, s, 0.5))
    assert (~prune_rows(w, st, 0.29, dsnot=False).keep).sum(1).tolist() == [2] * 5  # int(8 * 0.29)
    with pytest.raises(ValueError, match="sparsity"):
        wanda_mask(w, s, 1.0)
    with pytest.raises(ValueError, match="N:M"):
        wanda_mask(w, s, nm="4:2")
    with pytest.raises(ValueError, match="divisible by M=3"):
        wanda_mask(w, s, nm="1:3")
    with pytest.raises(ValueError, match="no calibration sequences"):
        prune_rows(w, CalibrationStats(8), 0.5)


# --------------------------------------------------------------------------- the command

CALIB = 2  # global batches of 8 sequences


@pytest.fixture(scope="module")
def checkpoint(token_data, tmp_path_factory):
    from distreg.runtime.comm import Comm
    from distreg.runtime.trainer import Trainer
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("dsnot_cmd")
    cfg = tiny_config(token_data, str(root / "run"), **{"scaling.num_workers": 1, "train.max_steps": 2,
                                                        "strategy.name": "ddp"})
    Trainer(cfg, Comm(), track=False).fit()
    config = root / "cfg.yaml"
    config.write_text(f"run_dir: {root / 'run'}\ndata: {{path: {token_data}, seq_len: 32}}\n"
                      "train: {global_batch_size: 8}\n")
    return root, str(config), str(root / "run" / "checkpoints")


def prune_cmd(config, ckpt, out, *extra):
    return main(["prune", "dsnot", config, "--checkpoint", ckpt, "--sparsity", "0.5", "--out", str(out),
                 "--calib-batches", str(CALIB), *extra])


@pytest.fixture(scope="module")
def pruned(checkpoint):
    root, config, ckpt = checkpoint
    for world in (1, 2):
        assert prune_cmd(config, ckpt, root / f"w{world}", "--skip-layer", "no_skip", "--world-size", str(world)) == 0
    assert prune_cmd(config, ckpt, root / "nm", "--nm", "2:4") == 0  # default skip_layer mlp
    return root


def test_command_world_size_2_equals_1_and_rows_are_exactly_sparse(pruned, capsys):
    m1, m2 = (torch.load(pruned / f"w{w}" / "masks.pt") for w in (1, 2))
    assert len(m1) == 14 and m1.keys() == m2.keys()  # 2 blocks x (wq wk wv wo w1 w3 w2)
    for name, keep in m1.items():
        assert torch.equal(keep, m2[name]), name
        assert ((~keep).sum(1) == keep.shape[1] // 2).all(), name
    r1, r2 = (json.loads((pruned / f"w{w}" / "report.json").read_text()) for w in (1, 2))
    assert r1["world_size"] == 1 and r2["world_size"] == 2 and r1["calibration"]["sequences"] == 16
    for name, e in r1["layers"].items():
        assert e["method"] == "dsnot" and e["sparsity"] == 0.5
        assert e["cycles"] == r2["layers"][name]["cycles"] and e["swaps"] == r2["layers"][name]["swaps"]
        assert e["error_after"] == pytest.approx(r2["layers"][name]["error_after"], rel=1e-9, abs=1e-12)
    assert sum(e["swaps"] for e in r1["layers"].values()) > 0
    assert sum(e["error_after"] for e in r1["layers"].values()) < sum(e["error_before"] for e in r1["layers"].values())


def test_command_output_is_the_masked_checkpoint(pruned, checkpoint, token_data):
    from distreg.models import build_model
    from distreg.runtime.weights import load_model_weights
    from tests.conftest import tiny_config

    _, _, ckpt = checkpoint
    dense = load_model_weights(ckpt)
    state = torch.load(pruned / "w1" / "model.pt")
    masks = torch.load(pruned / "w1" / "masks.pt")
    model = build_model(tiny_config(token_data, str(pruned / "x")).model, 0, "cpu", init=False)
    model.load_state_dict(state)
    for name, t in state.items():
        expected = dense[name] * masks[name] if name in masks else dense[name]
        assert torch.equal(t, expected), name


def test_command_block0_q_projection_recomputed_independently(pruned, checkpoint, token_data):
    """Block 0's inputs do not depend on pruning: its wq mask is prune_rows on the
    statistics of attention_norm(embeddings) of the first two global batches."""
    from distreg.config import load_config
    from distreg.data import build_data
    from distreg.models import build_model
    from distreg.runtime.weights import load_into

    _, config, ckpt = checkpoint
    cfg = load_config(config)
    data = build_data(cfg, 0, 1)
    tokens = torch.cat([mb["input"] for _ in range(CALIB) for mb in data.next_step()])
    model = build_model(cfg.model, 0, "cpu", init=False)
    load_into(model, ckpt)
    with torch.no_grad():
        x = model.layers[0].attention_norm(model.tok_embeddings(tokens))
    stats = CalibrationStats(x.shape[-1])
    stats.add(x)
    res = prune_rows(model.layers[0].attention.wq.weight, stats, 0.5)
    assert torch.equal(res.keep, torch.load(pruned / "w1" / "masks.pt")["layers.0.attention.wq.weight"])


def test_command_nm_and_default_skip_layer(pruned):
    masks = torch.load(pruned / "nm" / "masks.pt")
    report = json.loads((pruned / "nm" / "report.json").read_text())
    for name, keep in masks.items():
        assert ((~keep).view(keep.shape[0], -1, 4).sum(-1) == 2).all(), name
        e = report["layers"][name]
        if ".feed_forward." in name:  # the reference's default skip_layer "mlp": Wanda only
            assert e["method"] == "wanda" and e["cycles"] == 0 and e["error_after"] == e["error_before"]
        else:
            assert e["method"] == "dsnot"
    assert report["options"]["nm"] == "2:4" and report["options"]["skip_layer"] == "mlp"


@pytest.mark.parametrize("args,where", [
    (["--sparsity", "1.5"], "--sparsity"),
    (["--nm", "4:2"], "--nm"),
    (["--max-cycles", "-1"], "--max-cycles"),
    (["--threshold", "x"], "--threshold"),
    (["--world-size", "0"], "--world-size"),
    (["--skip-layer", "ffn"], "--skip-layer"),
])
def test_bad_flags_are_named_by_argparse(checkpoint, tmp_path, capsys, args, where):
    _, config, ckpt = checkpoint
    base = ["prune", "dsnot", config, "--checkpoint", ckpt, "--sparsity", "0.5", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main(base + args)
    assert e.value.code == 2 and where in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "dsnot", config, "--checkpoint", ckpt, "--sparsity", "0.5"])
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("args,where", [
    (["--nm", "2:4", "--sparsity", "0.3"], "--sparsity must be 0.5"),
    (["--world-size", "3"], "--world-size 3: train.global_batch_size=8"),
    (["--checkpoint", "/nonexistent/ckpt"], "--checkpoint: /nonexistent/ckpt: no complete checkpoint"),
    (["--set", "model.n_layers=1"], "--checkpoint:.*unexpected"),
    (["--set", "model.kind=torchvision"], "model.kind='torchvision'"),
    (["--set", "data.path=/nonexistent/tokens"], "data.path"),
    (["--out", "__FILE__"], "--out .*not a directory"),
])
def test_bad_values_are_named(checkpoint, tmp_path, capsys, args, where):
    import re

    _, config, ckpt = checkpoint
    afile = tmp_path / "a_file"
    afile.write_text("x")
    args = [str(afile) if a == "__FILE__" else a for a in args]
    base = {"--checkpoint": ckpt, "--sparsity": "0.5", "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base:
            base[flag] = value
    rest = [a for pair in zip(args[::2], args[1::2]) if pair[0] not in base for a in pair]
    argv = ["prune", "dsnot", config, *[a for kv in base.items() for a in kv], *rest]
    assert main(argv) == 2
    assert re.search(where, capsys.readouterr().err), where
    assert not (tmp_path / "o" / "report.json").exists()


def test_pruned_output_continues_training_with_fixed_masks(pruned, token_data):
    """The documented follow-up: `model.init_from: out/model.pt` + the dsnot hook holding
    `out/masks.pt`: training starts from the pruned weights and keeps their zeros."""
    from distreg.runtime.comm import Comm
    from distreg.runtime.trainer import Trainer
    from distreg.testing import gather_full_params
    from tests.conftest import tiny_config

    out = pruned / "w1"
    hooks = f'[{{name: dsnot, mask_file: "{out / "masks.pt"}"}}]'
    cfg = tiny_config(token_data, str(pruned / "finetune"), **{
        "scaling.num_workers": 1, "strategy.name": "ddp", "train.max_steps": 2, "model.init_from": str(out / "model.pt"),
        "hooks": hooks})
    trainer = Trainer(cfg, Comm(), track=False)
    state, masks = torch.load(out / "model.pt"), torch.load(out / "masks.pt")
    start = gather_full_params(trainer.ctx.local_shards(), trainer.comm)
    for name, full in start.items():
        assert torch.equal(full.view(state[name].shape), state[name]), name
    trainer.fit()
    end = gather_full_params(trainer.ctx.local_shards(), trainer.comm)
    for name, keep in masks.items():
        w = end[name].view(keep.shape)
        assert (w[~keep] == 0).all(), name
        assert not torch.equal(w, state[name]), name  # it trained
