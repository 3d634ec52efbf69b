"""`hpm` (Hard Patches Mining) vs plain random-mask MAE on synthetic ImageNet.

    python benchmarks/hpm.py [--steps 200] [--seeds 0,1] [--batch 32] [--ema 0.9,0.99]
                             [--datasets stripes,patches]

Data, made here (the ILSVRC tree + `imagenet-to-shards`, 32 px, 10 classes x 32 images):
`stripes`, the standard synthetic ImageNet (class colour + stripes + pixel noise), and
`patches` (distreg.data.synth_patches: left half smooth ramps, right half noise, so patch
difficulty is predictable). Model: `model.kind: mae` defaults (patch 8, 16 patches, 75 %
masked, width 64, 2 + 1 blocks, normalised-pixel loss), AdamW 1e-3, single process.

Per dataset and seed, interleaved (plain, hpm, plain, hpm ...): train `--steps` steps, then
on a fixed evaluation set (the first 64 training images, centre crop) with fixed *random*
masks (a seed of their own), the mean masked-patch reconstruction loss (the same measure
for both: HPM's training loss is on the harder patches it chooses) and, for HPM, the
predictor's ranking accuracy over masked-patch pairs (0.5 = chance), plus the training
step time. Medians over seeds; ratios hpm / plain.

HPM settings: `schedule_steps` = `--steps` (the reference grows the hard fraction over the
whole run), `max_hard_fraction` 0.5 and ranking weight 1 (reference), `ema_ramp_steps` =
steps / 8 (reference: 100 of 800 epochs). The EMA decays are NOT the reference's 0.999 ->
0.9999 by default: over a few hundred steps such a teacher stays near its initial weights
(0.999^200 = 0.82), so the short run uses `--ema 0.9,0.99` (pass 0.999,0.9999 for the
reference's). Measured here (defaults, 2 shared cores, ~2 min): stripes: eval recon plain
0.1948, hpm 0.1949 (ratio 1.001), ranking accuracy 0.491 (chance: the patches' losses are
pixel noise); patches: plain 0.7615, hpm 0.7722 (ratio 1.014), ranking accuracy 0.621;
step time ratio 1.3 / 2.3 (the teacher forward; noisy on the shared machine). A tiny model
for a few hundred CPU steps: the numbers show the mechanics,
not the paper's downstream (fine-tuning) results, which this does not measure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distreg.config import load_config  # noqa: E402
from distreg.models.mae import random_visible  # noqa: E402
from distreg.regularizers.hpm import masked_values, ranking_counts  # noqa: E402
from distreg.runtime.comm import Comm  # noqa: E402
from distreg.runtime.loss import per_sample_loss  # noqa: E402
from distreg.runtime.trainer import Trainer  # noqa: E402

EVAL_SEED = 12345


def make_data(root: str, kind: str) -> str:
    from distreg.data.imagenet_convert import convert_imagenet
    from distreg.data.synth_imagenet import synth_imagenet
    from distreg.data.synth_patches import synth_patch_imagenet

    if kind == "patches":
        synth_patch_imagenet(f"{root}/src", num_classes=10, train_per_class=32)
    else:
        synth_imagenet(f"{root}/src", num_classes=10, train_per_class=32, val_per_class=1, min_size=32, max_size=48)
    convert_imagenet(f"{root}/src", f"{root}/shards", shard_size=64, processes=1, log=lambda *_: None)
    return f"{root}/shards/train"


def config(data: str, run_dir: str, args, seed: int, hpm: bool, transform: str = "train"):
    hooks = [{"name": "hpm", "schedule_steps": args.steps, "ema_ramp_steps": max(1, args.steps // 8),
              "ema_decay_start": args.ema[0], "ema_decay_end": args.ema[1]}] if hpm else []
    sets = {"data.path": data, "run_dir": run_dir, "model.kind": "mae", "data.image_size": 32,
            "data.transform": transform, "train.global_batch_size": args.batch, "train.grad_accum_steps": 1,
            "train.max_steps": args.steps, "train.seed": seed, "optim.name": "adamw", "optim.lr": 1e-3,
            "optim.weight_decay": 0.05, "optim.warmup_steps": args.steps // 10, "optim.schedule": "cosine",
            "train.log_every": 10**6, "checkpoint.every": 0, "scaling.num_workers": 1, "strategy.name": "ddp",
            "hooks": json.dumps(hooks)}
    return load_config("configs/imagenet_tiny.yaml", [f"{k}={v}" for k, v in sets.items()])


def eval_batches(data: str, root: str, args) -> list[dict]:
    from distreg.data import build_data

    cfg = config(data, f"{root}/eval", args, 0, False, transform="val")
    cfg.train.global_batch_size = 64
    cfg.data.shuffle = False
    return build_data(cfg, 0, 1).next_step()


@torch.no_grad()
def evaluate(model, batches: list[dict]) -> dict:
    losses, correct, pairs = [], 0, 0
    for b in batches:
        n = model.num_patches
        visible = random_visible(EVAL_SEED, 0, b["index"], n, 0.75)
        out = model(b["input"], visible)
        losses.append(per_sample_loss(out, b["target"]))
        if "loss_pred" in out:
            m = n - visible.shape[1]
            c, p = ranking_counts(masked_values(out["loss_pred"], out["mask"], m),
                                  masked_values(out["patch_loss"], out["mask"], m))
            correct, pairs = correct + int(c.sum()), pairs + int(p.sum())
    return {"recon": float(torch.cat(losses).mean()), "rank_acc": correct / pairs if pairs else None}


def run(data: str, root: str, args, seed: int, hpm: bool, batches) -> dict:
    trainer = Trainer(config(data, f"{root}/{'hpm' if hpm else 'plain'}{seed}", args, seed, hpm), Comm(), track=False)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.step_on_device(metrics_due=False)
    trainer.step_metrics.flush()
    dt = (time.perf_counter() - t0) / args.steps
    model = trainer.strategy.module.module if hasattr(trainer.strategy.module, "module") else trainer.strategy.module
    model.eval()
    return {**evaluate(model, batches), "step_s": dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ema", default="0.9,0.99")
    ap.add_argument("--datasets", default="stripes,patches")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: fastest on a shared 2-core box)")
    args = ap.parse_args()
    args.ema = tuple(float(x) for x in args.ema.split(","))
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"steps {args.steps}, batch {args.batch}, seeds {seeds}, EMA decay {args.ema[0]} -> {args.ema[1]}")
    with tempfile.TemporaryDirectory(prefix="hpm-bench-") as tmp:
        for kind in args.datasets.split(","):
            data = make_data(f"{tmp}/{kind}", kind)
            batches = eval_batches(data, f"{tmp}/{kind}", args)
            res = {"plain": [], "hpm": []}
            for seed in seeds:  # interleaved: plain, hpm, plain, hpm ...
                for name in ("plain", "hpm"):
                    r = run(data, f"{tmp}/{kind}", args, seed, name == "hpm", batches)
                    res[name].append(r)
                    acc = f"  ranking acc {r['rank_acc']:.3f}" if r["rank_acc"] is not None else ""
                    print(f"  {kind:8s} seed {seed} {name:5s}: eval recon {r['recon']:.4f}{acc}  "
                          f"step {1000 * r['step_s']:.1f} ms", flush=True)
            med = {k: {m: statistics.median(x[m] for x in v) for m in ("recon", "step_s")} for k, v in res.items()}
            acc = statistics.median(x["rank_acc"] for x in res["hpm"])
            print(f"{kind}: median eval recon plain {med['plain']['recon']:.4f}  hpm {med['hpm']['recon']:.4f}  "
                  f"(ratio {med['hpm']['recon'] / med['plain']['recon']:.3f}); hpm ranking accuracy {acc:.3f}; "
                  f"step time ratio {med['hpm']['step_s'] / med['plain']['step_s']:.2f}")


if __name__ == "__main__":
    main()
