"""JPEG decode on the GPU (data.decode_device: cuda) vs the CPU, images/s per rank.

ImageBatches (num_workers=0, read-ahead on) over a synthetic ImageNet-format split of
real JPEGs (ImageNet-like sizes, default 300-500 px), val transform (resize + centre
crop 224) so both paths do the same work; decode_device cpu and cuda take turns,
medians over repeats, ratio cuda/cpu from the same run. Also checks that both paths
give the same labels and pixels within nvjpeg-vs-libjpeg rounding. Without a GPU it
says so and measures the CPU path only (exit 0), so GPU check scripts can call it
anywhere:
    PYTHONPATH=$PWD python benchmarks/gpu_decode.py [--images 512] [--batch 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-size", type=int, default=300)
    ap.add_argument("--max-size", type=int, default=500)
    args = ap.parse_args()

    import torch

    from distreg.data.images import ImageBatches, ImageSamples
    from distreg.data.imagenet_convert import convert_imagenet
    from distreg.data.synth_imagenet import synth_imagenet

    tmp = tempfile.mkdtemp(prefix="gpu-decode-")
    classes = 8
    synth_imagenet(f"{tmp}/src", num_classes=classes, train_per_class=args.images // classes, val_per_class=1,
                   min_size=args.min_size, max_size=args.max_size)
    convert_imagenet(f"{tmp}/src", f"{tmp}/shards", shard_size=256, processes=1, log=lambda *_: None)
    split = f"{tmp}/shards/train"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if len(devices) == 1:
        print("gpu_decode: no CUDA device: measuring the CPU path only (the cuda path was NOT run)")

    def epoch(device: str) -> tuple[float, list]:
        src = ImageBatches(ImageSamples(split, 224, train=False, decode_device=device), args.batch, 1, 0, 1,
                           seed=0, shuffle=False)
        n = len(src.samples) // args.batch
        batches = []
        start = time.perf_counter()
        for _ in range(n):
            batch = src.next_step()[0]
            if device == "cuda":
                torch.cuda.synchronize()
            batches.append(batch)
        rate = n * args.batch / (time.perf_counter() - start)
        src.close()
        return rate, batches

    try:
        return _measure(epoch, devices, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(epoch, devices: list[str], args) -> int:
    import torch

    epoch(devices[-1])  # warm-up (CUDA context, nvjpeg handles)
    rates: dict[str, list[float]] = {d: [] for d in devices}
    last: dict[str, list] = {}
    for _ in range(args.repeats):
        for d in devices:
            rate, last[d] = epoch(d)
            rates[d].append(rate)
    cpu = statistics.median(rates["cpu"])
    print(f"{'decode':6} {'images/s':>10} {'ratio vs cpu':>13}   ({args.images} JPEGs {args.min_size}-{args.max_size} px, "
          f"batch {args.batch}, val transform 224, medians of {args.repeats})")
    for d in devices:
        r = statistics.median(rates[d])
        print(f"{d:6} {r:10.0f} {r / cpu:13.2f}")
    if "cuda" in last:
        worst = max((g["input"].cpu() - c["input"]).abs().max().item() for g, c in zip(last["cuda"], last["cpu"]))
        same = all(torch.equal(g["target"], c["target"]) for g, c in zip(last["cuda"], last["cpu"]))
        print(f"cuda vs cpu: labels equal {same}, max pixel difference {worst:.3f} (normalised units)")
        return 0 if same and worst < 0.2 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
