"""Shared scenarios for the reweighting tests: run under thread ranks (ThreadComm) and once
under real gloo ranks (`gloo_main`, spawned by test_reweighting_gloo.py), and compared with
single-process and float64 numpy references. Module level so spawned ranks can import it."""
from __future__ import annotations

import numpy as np
import torch

from distreg.reweighting import (
    ShardedSampleStore,
    elr_step,
    kl_dro_normalizer_update,
    kl_dro_objective,
    pskd_step,
    reweighted_loss,
    sample_weights,
    weight_stats,
)

# ------------------------------------------------------------ float64 numpy references
def np_loss_based(name, losses, valid=None, r=1.0, delta=1.0):
    """Spec §8 steps 1-4, written independently of the library."""
    l = np.asarray(losses, dtype=np.float64)
    v = np.ones(l.shape, bool) if valid is None else np.asarray(valid, bool)
    l = np.where(v, l, 0.0)
    lo, hi = l[v].min(), l[v].max()
    span = max(hi - lo, 1e-6)
    h = (2 * delta * l - delta * (hi + lo)) / span
    f = {
        "linupper": np.minimum(h + delta, delta),
        "quadratic": 1 - h**2 / delta**2,
        "mid": 1 - h**2 / delta**2,
        "extremes": np.abs(h),
        "linear": 0.5 * h + 0.5 * delta,
        "uniform": np.zeros_like(h),
    }[name]
    e = np.where(v, np.exp((f - f[v].max()) / r), 0.0)
    return e / e.sum()


def np_dro(losses, valid=None, r=1.0, log_normalizer=None):
    l = np.asarray(losses, dtype=np.float64)
    v = np.ones(l.shape, bool) if valid is None else np.asarray(valid, bool)
    l = np.where(v, l, 0.0)
    if log_normalizer is not None:
        return np.where(v, np.exp(l / r - log_normalizer) / v.sum(), 0.0)
    e = np.where(v, np.exp((l - l[v].max()) / r), 0.0)
    return e / e.sum()


def close(a, b, atol=1e-6, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                               rtol=rtol, atol=atol)


# ------------------------------------------------------------------------- weights
_GEN = torch.Generator().manual_seed(0)
LOSSES = torch.rand(13, generator=_GEN, dtype=torch.float64).float() * 5
VALID = torch.ones(13, dtype=torch.bool)
VALID[[4, 11]] = False
LOSSES[4] = float("nan")  # a padded duplicate with a garbage loss
WEIGHT_SPLITS = {1: [13], 2: [5, 8], 3: [0, 6, 7], 4: [4, 0, 4, 5]}
CASES = [(n, {"r": r}) for n in ["linupper", "quadratic", "extremes", "linear"] for r in (1.0, 0.3)]
CASES += [("uniform", {}), ("kl_dro", {"r": 0.5}), ("kl_dro", {"r": 0.5, "log_normalizer": 7.5})]


def weights_checks(comm, sizes, mode):
    """Every strategy on this rank's slice: (weights, W·Σwℓ, d/dℓ), DRO objective and grad,
    EMA normaliser, global stats."""
    rk = comm.rank
    l, v = torch.split(LOSSES, sizes)[rk], torch.split(VALID, sizes)[rk]
    out = []
    for name, params in CASES:
        w = sample_weights(name, l, v, comm, mode=mode, **params)
        lg = l.clone().requires_grad_()
        loss = reweighted_loss(lg, w, comm)
        loss.backward()
        out.append((w, loss.item(), lg.grad.clone()))
    lg = l.clone().requires_grad_()
    obj = kl_dro_objective(lg, v, comm, r=0.5)
    obj.backward()
    z = kl_dro_normalizer_update(0.7, l, v, comm, r=0.5, beta=0.3)
    stats = weight_stats(sample_weights("quadratic", l, v, comm), l, comm, v)
    return out, (obj.item(), lg.grad.clone()), z, stats


def assert_weights_match(ref, ranks, mode):
    """`ranks` (per-rank `weights_checks` results) == `ref` (1-rank result) == numpy."""
    world = len(ranks)
    ref_out, ref_obj, ref_z, ref_stats = ref
    lnum, vnum = LOSSES.numpy(), VALID.numpy()
    for c, (name, params) in enumerate(CASES):
        w_ref, loss_ref, g_ref = ref_out[c]
        if name == "kl_dro":
            close(w_ref, np_dro(lnum, vnum, **params))
        else:
            close(w_ref, np_loss_based(name, lnum, vnum, **params))
        assert abs(float(w_ref.sum()) - 1) < 1e-6 or "log_normalizer" in params
        w = torch.cat([r[0][c][0] for r in ranks])
        if mode == "allgather":
            assert torch.equal(w, w_ref), name  # bitwise: same computation on the full vector
        else:
            close(w, w_ref, rtol=1e-6)
        # mean over ranks of W·Σ_local wℓ = single-process loss; rank-averaged grads = w
        assert abs(np.mean([r[0][c][1] for r in ranks]) - loss_ref) < 1e-6 * max(1.0, abs(loss_ref)), name
        close(torch.cat([r[0][c][2] for r in ranks]) / world, g_ref, rtol=1e-6)
        close(g_ref, w_ref)
    assert max(abs(r[1][0] - ref_obj[0]) for r in ranks) < 1e-6  # DRO value replicated on every rank
    close(torch.cat([r[1][1] for r in ranks]) / world, ref_obj[1], rtol=1e-6)
    assert all(abs(r[2] - ref_z) < 1e-12 for r in ranks)
    assert ref_stats["n"] == int(vnum.sum())
    for key, val in ref_stats.items():
        assert all(abs(r[3][key] - val) < 1e-6 for r in ranks), key


# --------------------------------------------------------------------------- store
STORE_N, STORE_W = 11, 3


def row_value(i: int) -> list[float]:
    return [i + 0.5, 10.0 * i, -float(i) / 3]


def read_sets(world: int) -> list[list[int]]:
    """Per-rank read requests: different sizes, one empty, duplicates, any order."""
    sets = [list(range(STORE_N))[::-1] + [0, 0], [], [3, 3, 10, 1], [7]]
    return [sets[r % len(sets)] for r in range(world)]


def store_checks(comm):
    """Writes from every rank into rows owned by others, rank-specific reads, duplicate
    rule, masked writes, state_dict round trip, bf16 storage."""
    rk, world = comm.rank, comm.world_size
    st = ShardedSampleStore(STORE_N, STORE_W, comm)
    mine = [i for i in range(STORE_N) if i % world == rk]
    st.write(torch.tensor(mine, dtype=torch.long), torch.tensor([row_value(i) for i in mine]))
    first = st.read(torch.tensor(read_sets(world)[rk], dtype=torch.long))
    # duplicates: every rank writes row 5 (last rank wins); rank 0 writes row 6 twice (2nd wins)
    idx, val = [5], [[100.0 + rk] * STORE_W]
    if rk == 0:
        idx += [6, 6]
        val += [[1.0] * STORE_W, [2.0] * STORE_W]
    # a padded duplicate (valid False) must not be written
    idx.append(8)
    val.append([-999.0] * STORE_W)
    valid = torch.ones(len(idx), dtype=torch.bool)
    valid[-1] = False
    st.write(torch.tensor(idx), torch.tensor(val), valid)
    full = st.read(torch.arange(STORE_N) if rk == 0 else torch.zeros(0, dtype=torch.long))
    sd = st.state_dict()
    st2 = ShardedSampleStore(STORE_N, STORE_W, comm)
    st2.load_state_dict(sd)
    again = st2.read(torch.arange(STORE_N))
    bf = ShardedSampleStore(STORE_N, STORE_W, comm, dtype=torch.bfloat16)
    bf.write(torch.tensor(mine, dtype=torch.long), torch.tensor([row_value(i) for i in mine]))
    bf_read = bf.read(torch.arange(STORE_N))
    return {"first": first, "full": full, "again": again, "sd": sd, "bf": bf_read, "range": st.local_range}


def assert_store_ok(ranks):
    """Check per-rank `store_checks` results against a plain python model of the table."""
    world = len(ranks)
    table = torch.tensor([row_value(i) for i in range(STORE_N)])
    for rk, res in enumerate(ranks):
        req = read_sets(world)[rk]
        assert res["first"].shape == (len(req), STORE_W) and res["first"].dtype == torch.float32
        close(res["first"], table[req] if req else torch.zeros(0, STORE_W), rtol=0, atol=0)
    after = table.clone()
    after[5] = 100.0 + world - 1
    after[6] = 2.0
    close(ranks[0]["full"], after, rtol=0, atol=0)
    assert all(r["full"].shape == (0, STORE_W) for r in ranks[1:])
    for r in ranks:
        close(r["again"], after, rtol=0, atol=0)
        close(r["bf"], table.bfloat16().float(), rtol=0, atol=0)
        assert not torch.equal(r["bf"], table)  # bf16 really rounds
    # owner ranges: contiguous, ceil(N/W) rows each, covering [0, N)
    ranges = [r["range"] for r in ranks]
    assert ranges[0][0] == 0 and ranges[-1][1] == STORE_N
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # re-shard: a 1-rank store restored from every rank's state dict holds the full table
    single = ShardedSampleStore(STORE_N, STORE_W)
    single.load_state_dict([r["sd"] for r in ranks])
    close(single.read(torch.arange(STORE_N)), after, rtol=0, atol=0)


# -------------------------------------------------------------------- ELR / PS-KD
N, C, EPOCHS, BETA, LAM, ALPHA_T = 10, 4, 2, 0.7, 3.0, 0.8
_G2 = torch.Generator().manual_seed(1)
LABELS = torch.randint(0, C, (N,), generator=_G2)
LOGITS = torch.randn(EPOCHS, N, C, generator=_G2) * 2  # "model output" of sample i at epoch e
PERMS = [torch.randperm(N, generator=_G2) for _ in range(EPOCHS)]
STEP_SIZES = [4, 4, 2]
RANK_SPLITS = {1: [[4], [4], [2]], 2: [[1, 3], [4, 0], [1, 1]], 3: [[2, 0, 2], [1, 2, 1], [0, 1, 1]]}


def run_epochs(comm):
    """Two epochs of ELR and PS-KD through sharded stores. The last rank appends a padded
    duplicate (valid False, garbage logits) in the last step of each epoch."""
    rk, world = comm.rank, comm.world_size
    elr = ShardedSampleStore(N, C, comm)
    pk = ShardedSampleStore(N, C, comm)
    steps = []
    for e in range(EPOCHS):
        pos = 0
        for s, size in enumerate(STEP_SIZES):
            gidx = PERMS[e][pos : pos + size]
            pos += size
            sizes = RANK_SPLITS[world][s]
            lo = sum(sizes[:rk])
            idx = gidx[lo : lo + sizes[rk]]
            z = LOGITS[e, idx]
            y = LABELS[idx]
            valid = torch.ones(len(idx), dtype=torch.bool)
            if world > 1 and rk == world - 1 and s == len(STEP_SIZES) - 1:
                idx = torch.cat([idx, gidx[:1]])
                z = torch.cat([z, torch.full((1, C), 50.0)])
                y = torch.cat([y, torch.tensor([0])])
                valid = torch.cat([valid, torch.tensor([False])])
            z1 = z.clone().requires_grad_()
            l1, parts = elr_step(elr, idx, z1, y, valid, beta=BETA, lam=LAM)
            l1.backward()
            z2 = z.clone().requires_grad_()
            l2, tgt = pskd_step(pk, idx, z2, y, e, EPOCHS, valid, alpha_T=ALPHA_T)
            l2.backward()
            steps.append({
                "elr": l1.item(), "ce": parts["ce"].item(), "pskd": l2.item(),
                "g_elr": z1.grad[valid].clone(), "g_pskd": z2.grad[valid].clone(), "targets": tgt[valid].clone(),
            })
    everything = torch.arange(N) if rk == 0 else torch.zeros(0, dtype=torch.long)
    return {"steps": steps, "elr_table": elr.read(everything), "pskd_table": pk.read(everything)}


def _np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_epochs():
    """float64 numpy single-process reference straight from the spec formulas (§3, §4)."""
    t = np.zeros((N, C))
    P = np.zeros((N, C))
    logits = LOGITS.double().numpy()
    labels = LABELS.numpy()
    steps = []
    for e in range(EPOCHS):
        pos = 0
        alpha = ALPHA_T * (e + 1) / EPOCHS
        for size in STEP_SIZES:
            idx = PERMS[e][pos : pos + size].numpy()
            pos += size
            z, y = logits[e, idx], labels[idx]
            sm = _np_softmax(z)
            logsm = np.log(sm)
            onehot = np.eye(C)[y]
            # ELR
            p = np.clip(sm, 1e-4, 1 - 1e-4)
            t[idx] = BETA * t[idx] + (1 - BETA) * p / p.sum(axis=1, keepdims=True)
            ce = -logsm[np.arange(size), y].mean()
            reg = np.log(1 - (t[idx] * p).sum(axis=1)).mean()
            # PS-KD
            prev = onehot if e == 0 else P[idx]
            tgt = (1 - alpha) * onehot + alpha * prev
            lp = -(tgt * logsm).sum(axis=1).mean()
            g_pskd = (sm - tgt) / size  # d/dz of the mean soft-target CE
            P[idx] = sm
            steps.append({"elr": ce + LAM * reg, "ce": ce, "pskd": lp, "targets": tgt, "g_pskd": g_pskd})
    return {"steps": steps, "elr_table": t, "pskd_table": P}


def assert_epochs_match(ranks, single):
    """`ranks` (per-rank `run_epochs`) vs the 1-rank run `single` and the numpy reference."""
    world = len(ranks)
    ref = np_epochs()
    for s, rs in enumerate(ref["steps"]):
        got = [r["steps"][s] for r in ranks]
        for key in ("elr", "ce", "pskd"):
            assert abs(np.mean([g[key] for g in got]) - rs[key]) < 1e-6, (s, key)
            assert abs(single["steps"][s][key] - rs[key]) < 1e-6, (s, key)
        close(torch.cat([g["targets"] for g in got]), rs["targets"])
        close(torch.cat([g["g_pskd"] for g in got]) / world, rs["g_pskd"])
        close(torch.cat([g["g_elr"] for g in got]) / world, single["steps"][s]["g_elr"], rtol=1e-5)
    for key in ("elr_table", "pskd_table"):
        close(ranks[0][key], ref[key])
        close(ranks[0][key], single[key], rtol=1e-6)
        assert all(r[key].shape == (0, C) for r in ranks[1:])


# ------------------------------------------------------------------------ gloo entry
def gloo_main():
    """Everything the real 2-rank gloo run checks, batched into one spawn."""
    from distreg.runtime.comm import Comm

    comm = Comm()
    sizes = WEIGHT_SPLITS[comm.world_size]
    return {
        "weights": {m: weights_checks(comm, sizes, m) for m in ("allreduce", "allgather")},
        "store": store_checks(comm),
        "epochs": run_epochs(comm),
    }
