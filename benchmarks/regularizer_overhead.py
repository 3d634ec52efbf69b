"""Step-time overhead of each regularizer hook on the tiny Llama: one Trainer per hook
(plus one without hooks) built in the same process(es), timed in interleaved blocks so
machine noise hits all alike; prints one table of step time ratios vs no hooks (median,
and mean, which includes periodic work such as `hessian_trace` every N steps).

    python benchmarks/regularizer_overhead.py [--steps 30] [--block 5]
    python benchmarks/regularizer_overhead.py --world 2 --strategy fsdp2     # 2 gloo ranks
    python benchmarks/regularizer_overhead.py --world 2 --strategy fsdp2 --preset llama-small \
        --hooks orthogonality nuclear_norm trained_rank_pruning group_envelope sorsa --steps 32 --block 4

Each rank is a spawned gloo process (`distreg.testing.run_distributed`, also for one
rank); times are rank 0's. Steps run as in `Trainer.fit` (`step_on_device`: hook metrics
computed and read back on logging steps only, every `train.log_every` = 10). Hooks run at
their documented defaults, including `every` / `period` (orthogonality every 4, nuclear_norm
every 16, trained_rank_pruning period 8): the *mean* ratio is their amortised cost - use a
`--steps` that is a multiple of 16 so each hook gets its share of applications; the median
shows the steps in between. `hessian_trace` runs every `--hessian-every` steps (its cost
per estimate is 1 + 2 m probe forwards); `distillation` runs one teacher of the student's size
(trained one step first); `sorsa` adapts every block projection at rank 16; `sara` trains
the smallest 10 % of each 2-D weight.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOOKS = {
    "none": [],
    "orthogonality": [{"name": "orthogonality", "coef": 1e-3}],
    "nuclear_norm": [{"name": "nuclear_norm", "coef": 1e-4}],
    "trained_rank_pruning": [{"name": "trained_rank_pruning", "nuclear_weight": 3e-4}],
    "wdr": [{"name": "wdr"}],
    "mba_l2": [{"name": "mba_l2", "lam": 1e-3}],
    "group_envelope": [{"name": "group_envelope", "lam": 1e-3, "k_fraction": 0.5}],
    "perp_grad": [{"name": "perp_grad"}],
    "stablemax": [{"name": "stablemax"}],
    "z_loss_logit": [{"name": "z_loss_logit"}],
    "z_loss_spherical": [{"name": "z_loss_spherical", "a": 1.0, "b": 1.0}],
    "collapse_monitor": [{"name": "collapse_monitor"}],
    "hessian_trace": [{"name": "hessian_trace", "every": 10, "max_probes": 3}],
    "normalized_softmax": [{"name": "normalized_softmax"}],
    "tcm": [{"name": "tcm"}],
    "sorsa": [{"name": "sorsa", "rank": 16}],
    "distillation": [{"name": "distillation", "teachers": [{"checkpoint": "TEACHER"}]}],
    "sara": [{"name": "sara", "fraction": 0.1, "min_dim": 32}],
}


def worker(data: str, root: str, args: dict) -> dict:
    import torch

    from distreg.config import load_config
    from distreg.runtime.comm import Comm
    from distreg.runtime.trainer import Trainer

    torch.set_num_threads(1)
    strategy = {"ddp": ["strategy.name=ddp"], "fsdp2": ["strategy.name=fsdp2"],
                "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"]}[args["strategy"]]
    # the distillation teacher: a tiny Llama of the same shape, trained for one step
    if "distillation" in args["hooks"]:
        teacher = load_config(None, [f"data.path={data}", f"run_dir={root}/teacher", f"data.seq_len={args['seq_len']}",
                                     f"scaling.num_workers={args['world']}", f"train.global_batch_size={args['batch']}",
                                     "train.max_steps=1", *strategy, *args["model"]])
        Trainer(teacher, Comm(), track=False).fit()
    trainers = {}
    for name, hooks in HOOKS.items():
        if name not in args["hooks"]:
            continue
        hooks = json.loads(json.dumps(hooks).replace('"TEACHER"', json.dumps(f"{root}/teacher/checkpoints")))
        cfg = load_config(None, [
            f"data.path={data}", f"run_dir={root}/{name}", f"data.seq_len={args['seq_len']}",
            f"scaling.num_workers={args['world']}", f"train.global_batch_size={args['batch']}",
            f"train.max_steps={100 * args['steps']}", "optim.warmup_steps=0", *strategy, *args["model"],
            f"hooks={json.dumps(hooks)}",
        ])
        t = Trainer(cfg, Comm(), track=False)
        for h in t.hooks:
            h.on_train_start(t.ctx)
        for _ in range(2):  # warm-up
            t.train_step()
        trainers[name] = t
    log_every = next(iter(trainers.values())).cfg.train.log_every
    times = {name: [] for name in trainers}
    for r in range(args["steps"] // args["block"]):
        for name, t in trainers.items():
            for _ in range(args["block"]):
                t0 = time.perf_counter()
                t.step_on_device()  # as fit(): metrics on logging steps only, read back there
                if t.step % log_every == 0:
                    t.step_metrics.flush()
                    for h in t.hooks:
                        h.metrics()
                times[name].append(time.perf_counter() - t0)
        if Comm().rank == 0:  # running medians after each round (long runs on a busy machine)
            base = statistics.median(times["none"])
            print(f"round {r + 1}: " + ", ".join(f"{n} {statistics.median(ts) / base:.2f}" for n, ts in times.items()),
                  flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30, help="timed steps per hook")
    ap.add_argument("--block", type=int, default=5, help="steps per interleaved block")
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--strategy", choices=["ddp", "fsdp2", "zero3"], default="ddp")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hessian-every", type=int, default=10)
    ap.add_argument("--preset", default="llama-tiny", help="model.preset (llama-small: the issue-14 target)")
    ap.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=list(HOOKS),
                    help="hooks to time (the no-hook baseline always runs)")
    args = ap.parse_args()
    HOOKS["hessian_trace"][0]["every"] = args.hessian_every
    args.hooks = ["none"] + [h for h in args.hooks if h != "none"]
    args.model = [f"model.preset={args.preset}"]
    if args.preset != "llama-tiny":  # sorsa at its documented default rank (128 > llama-tiny's width)
        HOOKS["sorsa"] = [{"name": "sorsa"}]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from distreg.data.tokens import synth_tokens
    from distreg.testing import run_distributed

    tmp = tempfile.mkdtemp()
    vocab = 32000 if args.preset != "llama-tiny" else 256
    synth_tokens(f"{tmp}/tokens", num_tokens=200_000, vocab_size=vocab)
    times = run_distributed(worker, args.world, f"{tmp}/tokens", tmp, vars(args))[0]
    base, base_mean = statistics.median(times["none"]), statistics.fmean(times["none"])
    print(f"Llama ({args.preset}, seq {args.seq_len}, global batch {args.batch}), {args.strategy} x {args.world}, "
          f"{args.steps} timed steps per hook in blocks of {args.block}")
    print("\n| hook | median step (ms) | mean (ms) | median ratio vs no hooks | mean ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, ts in times.items():
        med, mean = statistics.median(ts), statistics.fmean(ts)
        print(f"| {name} | {1e3 * med:.1f} | {1e3 * mean:.1f} | {med / base:.2f} | {mean / base_mean:.2f} |")


if __name__ == "__main__":
    main()
