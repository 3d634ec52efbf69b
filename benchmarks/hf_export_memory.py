"""Peak memory of `distreg export hf` (streamed, shard by shard) against reading the
whole checkpoint first (`runtime.weights.load_model_weights`, what a non-streaming
exporter holds), on DCP checkpoints of the 7B preset at reduced width (dim 512, 8 heads,
its vocabulary) and two depths: the streamed peak must not grow with the depth. Plus the
meta-device estimate (`export_plan`) for the real 7B preset.

    PYTHONPATH=$PWD python benchmarks/hf_export_memory.py [--dim 512] [--layers 16 32] [--shard-mb 64] [--repeats 1]

Each measurement runs in a fresh process; a thread samples its resident set every 2 ms
and the peak above the resident set just before the call is reported. Streamed and
whole runs alternate (A B A B ...); medians over repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

SAVE = """
import sys, torch, torch.distributed.checkpoint as dcp
from distreg.config import load_config
from distreg.models import build_model
from distreg.runtime.checkpoint import MARKER
cfg = load_config(None, sys.argv[2:])
model = build_model(cfg.model, 0)
dcp.save({"model": model.state_dict()}, storage_writer=dcp.FileSystemWriter(sys.argv[1] + "/model"), no_dist=True)
open(sys.argv[1] + "/" + MARKER, "w").close()
"""

MEASURE = """
import os, sys, threading, time, json, psutil, warnings
warnings.filterwarnings("ignore")
from distreg.config import load_config
from distreg.interop.hf_export import export_hf
from distreg.runtime.weights import load_model_weights
mode, ckpt, out, shard = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = load_config(None, sys.argv[5:])
proc = psutil.Process()
peak, done = [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
base = proc.memory_info().rss
t = threading.Thread(target=sample); t.start()
start = time.time()
if mode == "stream":
    export_hf(cfg, ckpt, out, "bf16", shard, record=False)
else:
    weights = load_model_weights(ckpt)
done[0] = True; t.join()
print(json.dumps({"peak_extra": peak[0] - base, "seconds": time.time() - start}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shard-mb", type=int, default=64)
    ap.add_argument("--layers", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    from distreg.config import load_config
    from distreg.interop.hf_export import export_plan
    from distreg.models import build_model

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    mib = 2**20
    for n_layers in a.layers:
        # llama2-7b's vocabulary; width scaled down
        overrides = ["model.preset=llama2-7b", f"model.dim={a.dim}", f"model.ffn_dim={a.dim * 11008 // 4096}",
                     "model.n_heads=8", "model.n_kv_heads=8", f"model.n_layers={n_layers}"]
        with tempfile.TemporaryDirectory() as root:
            ckpt = f"{root}/step_00000001"
            subprocess.run([sys.executable, "-c", SAVE, ckpt, *overrides], check=True, env=env, capture_output=True)
            model = build_model(load_config(None, overrides).model, 0, "meta")
            fp32 = sum(p.numel() for p in model.parameters()) * 4
            results = {"stream": [], "whole": []}
            for r in range(a.repeats):
                for mode in ("stream", "whole"):  # interleaved
                    out = subprocess.run([sys.executable, "-c", MEASURE, mode, ckpt, f"{root}/out{r}",
                                          str(a.shard_mb * 2**20), *overrides],
                                         check=True, env=env, capture_output=True, text=True).stdout
                    results[mode].append(json.loads(out.strip().splitlines()[-1]))
            plan = export_plan({n: p.shape for n, p in model.named_parameters()}, "bf16", a.shard_mb * 2**20)
        stream = statistics.median(x["peak_extra"] for x in results["stream"])
        whole = statistics.median(x["peak_extra"] for x in results["whole"])
        print(f"{n_layers} blocks, dim {a.dim}: model {fp32 / mib:.0f} MiB fp32; bf16 shards <= {a.shard_mb} MiB; "
              f"streamed export peak {stream / mib:.0f} MiB (estimate {plan.peak_bytes / mib:.0f}), whole-model read "
              f"peak {whole / mib:.0f} MiB; streamed / whole = {stream / whole:.3f}")
    full = build_model(load_config(None, ["model.preset=llama2-7b"]).model, 0, "meta")
    shapes = {n: p.shape for n, p in full.named_parameters()}
    for shard_gb in (5, 1):
        p = export_plan(shapes, "bf16", shard_gb * 2**30)
        print(f"llama2-7b, bf16, --max-shard-size {shard_gb}GB: {len(p.shards)} files, estimated peak "
              f"{p.peak_bytes / 2**30:.2f} GiB (model: {sum(s.numel() for s in shapes.values()) * 4 / 2**30:.1f} GiB fp32)")


if __name__ == "__main__":
    main()
