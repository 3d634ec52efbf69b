"""Trainer step overhead: distreg's Trainer.train_step (no hooks) against a hand-written
PyTorch loop on the same model, optimizer, schedule, clipping and batches, in one run.

    python benchmarks/overhead.py [--steps 60] [--dim 256] [--layers 4]

Both loops run in this process, alternating blocks of steps so that machine noise hits
both alike; the ratio of median step times is printed (aim: <= 1.05).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60, help="timed steps per loop")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)

    tmp = tempfile.mkdtemp()
    synth_tokens(f"{tmp}/tokens", num_tokens=400_000, vocab_size=256)
    cfg = load_config(None, [
        f"data.path={tmp}/tokens", f"run_dir={tmp}/run", f"data.seq_len={args.seq_len}",
        "scaling.num_workers=1", "strategy.name=ddp", f"train.global_batch_size={args.batch}",
        f"train.max_steps={10 * args.steps}", "model.preset=null", "model.vocab_size=256",
        f"model.dim={args.dim}", f"model.n_layers={args.layers}", "model.n_heads=8", "model.n_kv_heads=4",
        f"model.ffn_dim={int(args.dim * 8 / 3)}", f"model.max_seq_len={args.seq_len}",
    ])

    trainer = Trainer(cfg, track=False)

    # The hand-written loop: what a user would write without distreg.
    model = build_model(cfg.model, cfg.train.seed)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.train.max_steps)
    data = TokenBatches(TokenDataset(cfg.data.path, cfg.data.seq_len), args.batch, 1, 0, 1, cfg.train.seed)

    def hand_step() -> float:
        batch = data.next_step()[0]
        logits = model(batch["input"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def timed(fn, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    timed(hand_step, 5)
    timed(trainer.train_step, 5)
    hand, ours = [], []
    for _ in range(args.steps // 10):
        hand += timed(hand_step, 10)
        ours += timed(trainer.train_step, 10)
    h, d = statistics.median(hand), statistics.median(ours)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M params, batch {args.batch} x {args.seq_len} tokens, 1 CPU thread")
    print(f"{'loop':<24}{'median step (ms)':>18}{'p90 (ms)':>12}")
    for name, xs in (("hand-written PyTorch", hand), ("distreg Trainer", ours)):
        print(f"{name:<24}{statistics.median(xs) * 1e3:>18.2f}{sorted(xs)[int(0.9 * len(xs))] * 1e3:>12.2f}")
    print(f"ratio distreg / hand-written: {d / h:.3f}")


if __name__ == "__main__":
    main()
