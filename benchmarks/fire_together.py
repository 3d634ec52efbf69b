"""`fire_together` (FTWT mask predictors): validation accuracy vs estimated FLOPs saved.

    python benchmarks/fire_together.py [--steps 40] [--seeds 0,1] [--thresholds 1.0,0.95,0.9,0.8]
                                       [--classes 4] [--train-per-class 32] [--image-size 32]

Data: a synthetic ImageNet made here (`distreg data synth-imagenet` + the shard
conversion), 32 px. Model: torchvision resnet18, every BasicBlock conv gated (16 convs:
conv1 scored after its ReLU, conv2 before the residual add, as the reference does).
For each seed, each mass threshold r and masks off / on in the training forward (the
reference applies them in training): train `--steps` single-process steps (SGD, the
predictors trained decoupled; no gradient clipping by default, since a global clip would
let the predictor loss rescale the backbone's step), then evaluate the *same* model on the
validation split with the predicted masks off and on (off, on, off, on ... over the
variants and seeds); medians over seeds. Printed per r: accuracy masks off,
masks on, their ratio, the predicted keep fraction (mean k / filters), the MACs saved in
the gated convs (output filters only) and in the whole network (gated savings / all
conv + linear MACs), and the predictor's training mask accuracy at the last step.
Measured here (2 shared cores, defaults, 8 min): masks off in training -> the backbone is
the same for every r (val accuracy 0.91 / 0.97 per seed) and masks at eval only drop it to
chance except at r = 1 (0.69); masks in training, r = 0.8: masked accuracy 0.92 with 55 %
of the filters kept, 41 % of the gated MACs and 38 % of the network's saved (r = 0.9:
0.92, 21 % / 19 %). One run (seed 1, r = 1, masks in training) diverged without clipping.
A tiny synthetic task trained for a few dozen steps: accuracies are near chance and the
numbers show the mechanics (how much r prunes, what the masks cost in accuracy), not the
paper's results.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distreg.config import load_config  # noqa: E402
from distreg.data.images import ImageSamples  # noqa: E402
from distreg.runtime.comm import Comm  # noqa: E402
from distreg.runtime.trainer import Trainer  # noqa: E402
from distreg.sparsity.fire_together import conv_macs  # noqa: E402

LAYERS = {f"layer{i}.{b}.conv{c}": ("relu" if c == 1 else "identity")
          for i in range(1, 5) for b in range(2) for c in (1, 2)}


def make_data(root: str, classes: int, per_class: int) -> tuple[str, str]:
    from distreg.data.imagenet_convert import convert_imagenet
    from distreg.data.synth_imagenet import synth_imagenet

    synth_imagenet(f"{root}/src", num_classes=classes, train_per_class=per_class, val_per_class=8,
                   min_size=32, max_size=48)
    convert_imagenet(f"{root}/src", f"{root}/shards", shard_size=64, processes=1, log=lambda *_: None)
    return f"{root}/shards/train", f"{root}/shards/val"


def dense_macs(model: nn.Module, x: torch.Tensor, hook) -> dict[str, float]:
    """Per-sample multiply-accumulates of every Conv2d / Linear in one eval forward."""
    out, handles = {}, []
    for name, mod in model.named_modules():
        if name.startswith("fire_together"):
            continue
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=name: out.__setitem__(n, conv_macs(m.in_channels, m.out_channels, o.shape[2:],
                                                                     m.kernel_size[0] * m.kernel_size[1], m.groups))))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=name: out.__setitem__(n, float(m.in_features * m.out_features))))
    model.eval()
    with torch.no_grad():
        model(x[:1])
    model.train()
    hook.pop_eval()  # not an evaluation
    for h in handles:
        h.remove()
    return out


def evaluate(model: nn.Module, hook, val: dict, masks: bool) -> dict[str, float]:
    hook.params.apply_at_eval = masks
    model.eval()
    with torch.no_grad():
        pred = model(val["input"]).argmax(dim=1)
    model.train()
    return {"acc": (pred == val["target"]).double().mean().item(), **hook.pop_eval()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--thresholds", default="1.0,0.9,0.8")
    ap.add_argument("--apply-in-training", default="false,true", help="masks in the training forward (reference: true)")
    ap.add_argument("--grad-clip", default="null", help="train.grad_clip (null: the backbone's training does not "
                                                         "depend on the predictors at all)")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--train-per-class", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    thresholds = [float(r) for r in args.thresholds.split(",")]
    modes = [m.strip().lower() == "true" for m in args.apply_in_training.split(",")]
    variants = [(r, m) for m in modes for r in thresholds]
    with tempfile.TemporaryDirectory() as tmp:
        train_path, val_path = make_data(tmp, args.classes, args.train_per_class)
        samples = ImageSamples(val_path, image_size=args.image_size, train=False)
        val = samples.__getitems__([(0, i) for i in range(len(samples))])
        rows: dict[tuple, list[dict]] = {v: [] for v in variants}
        for seed in seeds:
            for r, masked_training in variants:
                hook = {"name": "fire_together", "layers": LAYERS, "mass_threshold": r, "pool": "avg",
                        "softmax": True, "apply_in_training": masked_training}
                cfg = load_config("configs/imagenet_tiny.yaml", [f"{k}={v}" for k, v in {
                    "data.path": train_path, "run_dir": f"{tmp}/run_{seed}_{r}_{masked_training}", "model.num_classes": args.classes,
                    "data.image_size": args.image_size, "train.global_batch_size": 16,
                    "train.max_steps": args.steps, "train.seed": seed, "train.grad_clip": args.grad_clip, "scaling.num_workers": 1,
                    "checkpoint.every": 0, "train.log_every": 1000, "hooks": json.dumps([hook])}.items()])
                trainer = Trainer(cfg, Comm(), track=False)
                h = trainer.hooks[0]
                for _ in range(args.steps):
                    trainer.train_step()
                model = trainer.strategy.module
                macs = dense_macs(model, val["input"], h)
                gated = sum(v for k, v in macs.items() if k in LAYERS) / sum(macs.values())
                off, on = evaluate(model, h, val, False), evaluate(model, h, val, True)
                rows[(r, masked_training)].append({"acc_off": off["acc"], "acc_on": on["acc"], "keep": on["keep_fraction"],
                                "saved_gated": on["flops_reduction"], "saved_net": on["flops_reduction"] * gated,
                                "mask_acc": h.values["mask_accuracy"]})
                print(f"seed {seed} r {r} masks in training {masked_training}: {rows[(r, masked_training)][-1]}",
                      flush=True)
    med = lambda v, k: statistics.median(x[k] for x in rows[v])  # noqa: E731
    print(f"\nresnet18, {args.image_size} px synthetic ImageNet ({args.classes} classes), {args.steps} steps, "
          f"medians over seeds {seeds}; chance = {1 / args.classes:.3f}")
    print(f"{'train masked':>12} {'r':>5} {'acc off':>8} {'acc on':>8} {'on/off':>7} {'keep':>6} {'saved gated':>12} {'saved net':>10} "
          f"{'mask acc':>9}")
    for v in variants:
        ratio = med(v, "acc_on") / med(v, "acc_off") if med(v, "acc_off") else float("nan")
        print(f"{str(v[1]):>12} {v[0]:5.2f} {med(v, 'acc_off'):8.3f} {med(v, 'acc_on'):8.3f} {ratio:7.3f} "
              f"{med(v, 'keep'):6.3f} {med(v, 'saved_gated'):12.3f} {med(v, 'saved_net'):10.3f} {med(v, 'mask_acc'):9.3f}")


if __name__ == "__main__":
    main()
