"""`strategy.compile: true` with inductor: compiled = eager after a few steps (the test
suite checks the same with the `aot_eager` backend, inductor's C++ build being too slow
for CI), and the step time of both, interleaved, medians.

    python benchmarks/compile_parity.py [--strategy fsdp2] [--world 2] [--steps 3]
                                        [--timed 6] [--preset llama-tiny] [--backend inductor]

Per rank: an eager and a compiled Trainer on the same data (SGD with momentum, gradient
accumulation 2, the `orthogonality` hook writing gradients; not AdamW, whose first
update g/(|g|+eps) turns inductor's different rounding of near-zero gradients into
weight differences of order lr - see tests/test_parity.py); after `--steps` steps the losses and
the full weights are compared (tolerance 1e-5); then `--timed` more steps alternate
eager / compiled.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(data: str, root: str, args: dict) -> dict:
    import torch

    from distreg.config import load_config
    from distreg.runtime.comm import Comm
    from distreg.testing import gather_full_params
    from distreg.runtime.trainer import Trainer

    torch.set_num_threads(1)
    strategy = {"ddp": ["strategy.name=ddp"], "fsdp2": ["strategy.name=fsdp2"],
                "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"]}[args["strategy"]]
    trainers, losses = {}, {}
    for name, extra in (("eager", []), ("compiled", ["strategy.compile=true",
                                                     f"strategy.compile_backend={args['backend']}"])):
        cfg = load_config(None, [f"data.path={data}", f"run_dir={root}/{name}", "data.seq_len=32",
                                 f"model.preset={args['preset']}", f"scaling.num_workers={args['world']}",
                                 "train.global_batch_size=8", "train.grad_accum_steps=2", "optim.name=sgd",
                                 "optim.momentum=0.9", "optim.lr=0.1",
                                 "optim.warmup_steps=0", "train.max_steps=1000",
                                 "hooks=[{name: orthogonality, coef: 0.01}]", *strategy, *extra])
        t = Trainer(cfg, Comm(), track=False)
        for h in t.hooks:
            h.on_train_start(t.ctx)
        t0 = time.perf_counter()
        losses[name] = [t.train_step()[0] for _ in range(args["steps"])]
        losses[name + "_first_steps_s"] = time.perf_counter() - t0
        trainers[name] = t
    params = {n: gather_full_params(t.ctx.local_shards(), t.comm) for n, t in trainers.items()}
    diff = max(float((params["eager"][k] - params["compiled"][k]).abs().max()) for k in params["eager"])
    times = {n: [] for n in trainers}
    for _ in range(args["timed"]):
        for n, t in trainers.items():
            t0 = time.perf_counter()
            t.train_step()
            times[n].append(time.perf_counter() - t0)
    return {"losses": losses, "max_weight_diff": diff, "times": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", choices=["ddp", "fsdp2", "zero3"], default="fsdp2")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timed", type=int, default=6)
    ap.add_argument("--preset", default="llama-tiny")
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from distreg.data.tokens import synth_tokens
    from distreg.testing import run_distributed

    tmp = tempfile.mkdtemp(prefix="compile_parity_")
    synth_tokens(f"{tmp}/tokens", num_tokens=100_000, vocab_size=256 if args.preset == "llama-tiny" else 32000)
    r = run_distributed(worker, args.world, f"{tmp}/tokens", tmp, vars(args))[0]
    le, lc = r["losses"]["eager"], r["losses"]["compiled"]
    loss_diff = max(abs(a - b) for a, b in zip(le, lc))
    print(f"{args.preset}, {args.strategy} x {args.world}, backend {args.backend}")
    print(f"losses eager    {le}\nlosses compiled {lc}")
    print(f"max |loss diff| {loss_diff:.2e}, max |weight diff| {r['max_weight_diff']:.2e} "
          f"-> {'OK' if loss_diff <= 1e-5 and r['max_weight_diff'] <= 1e-5 else 'MISMATCH'} (tolerance 1e-5)")
    print(f"first {args.steps} steps (compile included): eager {r['losses']['eager_first_steps_s']:.1f} s, "
          f"compiled {r['losses']['compiled_first_steps_s']:.1f} s")
    e, c = statistics.median(r["times"]["eager"]), statistics.median(r["times"]["compiled"])
    print(f"step time after warm-up (median of {args.timed}, interleaved): eager {e * 1e3:.0f} ms, "
          f"compiled {c * 1e3:.0f} ms, compiled / eager {c / e:.2f}")


if __name__ == "__main__":
    main()
