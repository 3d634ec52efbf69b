"""Trainer step overhead: distreg's Trainer step (no hooks, as `fit` runs it: metrics
read back every 10 steps) against hand-written loops on the same model, optimizer,
schedule, clipping and batches, in one run:

- 1 process: a plain PyTorch loop;
- fsdp2 x 2 (gloo ranks): a hand-written `fully_shard` loop (every block + root);
- ZeRO-3 x 2: a plain `deepspeed.initialize` engine loop.

    python benchmarks/overhead.py [--steps 60] [--dim 256] [--layers 4] [--only single,fsdp2,zero3]

Each pair runs in the same process(es), alternating blocks of 10 steps so that machine
noise hits both alike; medians over the blocks, ratios printed (aim: <= 1.05). The hand
loops read their loss back every 10 steps too (like any logging loop).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distreg.config import load_config  # noqa: E402
from distreg.data.tokens import TokenBatches, TokenDataset, synth_tokens  # noqa: E402
from distreg.models import build_model  # noqa: E402
from distreg.runtime.optim import build_optimizer, build_scheduler  # noqa: E402
from distreg.runtime.trainer import Trainer  # noqa: E402

LOG_EVERY = 10


def bench_config(tmp: str, args, strategy: list[str], workers: int):
    return load_config(None, [
        f"data.path={tmp}/tokens", f"run_dir={tmp}/run", f"data.seq_len={args.seq_len}",
        f"scaling.num_workers={workers}", f"train.global_batch_size={args.batch}",
        f"train.max_steps={10 * args.steps}", "model.preset=null", "model.vocab_size=256",
        f"model.dim={args.dim}", f"model.n_layers={args.layers}", "model.n_heads=8", "model.n_kv_heads=4",
        f"model.ffn_dim={int(args.dim * 8 / 3)}", f"model.max_seq_len={args.seq_len}", f"train.log_every={LOG_EVERY}",
        *strategy,
    ])


def interleaved(ours, hand, steps: int) -> tuple[list[float], list[float]]:
    """Blocks of LOG_EVERY steps, A B A B ...; per-step times (block time / block size,
    so the once-per-block read back is spread over its steps)."""
    def block(fn) -> float:
        t0 = time.perf_counter()
        for i in range(LOG_EVERY):
            fn(i == LOG_EVERY - 1)
        return (time.perf_counter() - t0) / LOG_EVERY

    block(ours), block(hand)  # warm-up
    a, b = [], []
    for _ in range(max(1, steps // LOG_EVERY)):
        a.append(block(ours))
        b.append(block(hand))
    return a, b


def trainer_step(trainer):
    def f(log: bool) -> None:
        trainer.step_on_device(prefetch=True)  # as `fit` runs it: the next step's batches fetched at the end
        if log:
            trainer.step_metrics.flush()  # the logging step's one reduction + read back
    return f


def distributed_pair(kind: str, tmp: str, args) -> dict:
    """On each of 2 gloo ranks: the Trainer and the hand-written loop, interleaved."""
    import torch.distributed as dist

    from distreg.runtime.comm import Comm

    torch.set_num_threads(1)
    strategy = (["strategy.name=fsdp2"] if kind == "fsdp2" else ["strategy.name=deepspeed", "strategy.zero_stage=3"])
    cfg = bench_config(tmp, args, strategy, 2)
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = Trainer(cfg, Comm(), track=False)
    data = TokenBatches(TokenDataset(cfg.data.path, cfg.data.seq_len), args.batch, 1, rank, world, cfg.train.seed)
    model = build_model(cfg.model, cfg.train.seed)
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for blk in model.layers:
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = build_optimizer(model, cfg.optim)
        sched = build_scheduler(opt, cfg.optim, cfg.train.max_steps)

        def hand(log: bool) -> None:
            batch = data.next_step()[0]
            loss = F.cross_entropy(model(batch["input"]).flatten(0, 1).float(), batch["target"].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if log:
                loss.item()
    else:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim),
                                               config=trainer.strategy.ds_config(), dist_init_required=False)

        def hand(log: bool) -> None:
            batch = data.next_step()[0]
            loss = F.cross_entropy(engine(batch["input"]).flatten(0, 1).float(), batch["target"].flatten())
            engine.backward(loss)
            engine.step()
            if log:
                loss.item()

    ours, theirs = interleaved(trainer_step(trainer), hand, args.steps)
    return {"ours": ours, "hand": theirs}


def report(name: str, hand: list[float], ours: list[float], label: str) -> float:
    h, d = statistics.median(hand), statistics.median(ours)
    print(f"{label:<34}{h * 1e3:>14.2f}{d * 1e3:>16.2f}{d / h:>10.3f}")
    return d / h


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60, help="timed steps per loop")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", default="single,fsdp2,zero3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    only = args.only.split(",")

    tmp = tempfile.mkdtemp()
    synth_tokens(f"{tmp}/tokens", num_tokens=400_000, vocab_size=256)
    rows = []
    if "single" in only:
        rows.append(single_pair(tmp, args))
    for kind in ("fsdp2", "zero3"):
        if kind in only:
            from distreg.testing import run_distributed

            out = run_distributed(distributed_pair, 2, kind, tmp, args)[0]
            rows.append((f"{kind} x 2 (gloo)", out["hand"], out["ours"],
                         "hand-written fully_shard" if kind == "fsdp2" else "plain deepspeed.initialize"))
    print(f"model: dim {args.dim}, {args.layers} layers, global batch {args.batch} x {args.seq_len} tokens, "
          f"1 CPU thread per rank; medians of {max(1, args.steps // LOG_EVERY)} interleaved blocks of {LOG_EVERY}")
    print(f"{'setting (peer)':<34}{'peer ms/step':>14}{'distreg ms/step':>16}{'ratio':>10}")
    for label, hand, ours, peer in rows:
        report(f"{label} ({peer})", hand, ours, f"{label}")
    for label, hand, ours, peer in rows:
        print(f"  {label}: peer = {peer}")


def single_pair(tmp: str, args):
    cfg = bench_config(tmp, args, ["strategy.name=ddp"], 1)
    trainer = Trainer(cfg, track=False)

    # The hand-written loop: what a user would write without distreg.
    model = build_model(cfg.model, cfg.train.seed)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.max_steps)
    data = TokenBatches(TokenDataset(cfg.data.path, cfg.data.seq_len), args.batch, 1, 0, 1, cfg.train.seed)

    def hand_step(log: bool) -> None:
        batch = data.next_step()[0]
        logits = model(batch["input"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log:
            loss.item()

    ours, hand = interleaved(trainer_step(trainer), hand_step, args.steps)
    params = sum(p.numel() for p in model.parameters())
    return (f"1 process ({params / 1e6:.2f}M)", hand, ours, "hand-written PyTorch loop")


if __name__ == "__main__":
    main()
