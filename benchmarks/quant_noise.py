"""Does training against quantization noise (QuantNAS) make the real b-bit model better?

Tiny Llama on the synthetic token corpus, world size 1, in process: for each seed, train
the same steps (a) without hooks, (b) with `quant_noise` at 4 bits, (c) at 8 bits; then on
held-out batches (the windows after the training ones, never trained on) report the loss
of the float model and of the model whose Linear weights are really quantized to 4 and 8
bits (per-tensor uniform affine, round to nearest). Runs are interleaved per seed.

    python benchmarks/quant_noise.py [--steps 80] [--seeds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from torch import nn

from distreg.config import load_config
from distreg.data.tokens import synth_tokens
from distreg.regularizers.quant_noise import fake_quantize
from distreg.runtime.comm import Comm
from distreg.runtime.loss import per_sample_loss, valid_counts
from distreg.runtime.trainer import Trainer

VARIANTS = {"none": None, "noise4": 4, "noise8": 8}
EVAL_BITS = (4, 8)


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: list[dict], bits: int | None) -> float:
    saved = {}
    if bits is not None:
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                saved[name] = mod.weight.detach().clone()
                mod.weight.copy_(fake_quantize(mod.weight, bits))
    model.eval()
    tot = cnt = 0.0
    for b in batches:
        n = valid_counts(b["target"]).double()
        tot += float((per_sample_loss(model(b["input"]), b["target"]).double() * n).sum())
        cnt += float(n.sum())
    model.train()
    for name, w in saved.items():
        model.get_submodule(name).weight.copy_(w)
    return tot / cnt


def run(data: str, root: str, seed: int, bits: int | None, steps: int) -> dict:
    hooks = [] if bits is None else [{"name": "quant_noise", "bits": bits}]
    cfg = load_config(None, [f"data.path={data}", f"run_dir={root}", "data.seq_len=64", "train.global_batch_size=16",
                             f"train.seed={seed}", f"train.max_steps={steps}", "optim.lr=3e-3", "optim.warmup_steps=5",
                             "scaling.num_workers=1", "strategy.name=ddp", f"hooks={json.dumps(hooks)}"])
    trainer = Trainer(cfg, Comm(), track=False)
    for h in trainer.hooks:
        h.on_train_start(trainer.ctx)
    for _ in range(steps):
        trainer.train_step()
    heldout = [b for _ in range(8) for b in trainer.data.next_step()]
    model = trainer.strategy.module
    for h in trainer.hooks:  # the float model is evaluated as deployed: no noise
        h.mode = "clean"
    return {"float": heldout_loss(model, heldout, None), **{f"q{b}": heldout_loss(model, heldout, b) for b in EVAL_BITS}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/tokens"
        synth_tokens(data, num_tokens=400_000, vocab_size=256, num_shards=2)
        results = {v: [] for v in VARIANTS}
        for seed in range(args.seeds):
            for variant, bits in VARIANTS.items():  # interleaved per seed
                results[variant].append(run(data, f"{tmp}/{variant}-{seed}", seed, bits, args.steps))
    cols = ["float", *[f"q{b}" for b in EVAL_BITS]]
    print(f"held-out loss after {args.steps} steps, median over {args.seeds} seeds (min..max)")
    print(f"{'trained with':<14}" + "".join(f"{c:>24}" for c in cols) + f"{'q4 - float':>14}")
    for variant, rows in results.items():
        cells = []
        for c in cols:
            vals = [r[c] for r in rows]
            cells.append(f"{statistics.median(vals):.4f} ({min(vals):.4f}..{max(vals):.4f})")
        gap = statistics.median(r["q4"] - r["float"] for r in rows)
        print(f"{variant:<14}" + "".join(f"{c:>24}" for c in cells) + f"{gap:>14.4f}")


if __name__ == "__main__":
    main()
