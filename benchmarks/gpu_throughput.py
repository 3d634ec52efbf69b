"""Throughput table for one device (run by benchmarks/gpu_check.sh).

Llama at ~1.1B parameters (TinyLlama shape: dim 2048, 22 layers, 32 heads, 4 KV heads,
ffn 5632, vocab 32000), bf16, world size 1: fsdp2 eager, fsdp2 compiled (when
`strategy.compile` exists in this distreg), DeepSpeed ZeRO-3 -- tokens/s, MFU
(distreg/runtime/mfu.py) and peak memory; then one MoE layer (E=8, top-1, 4096 tokens)
forward+backward with each router. The Llama settings run one after the other (three
1.1B models with fp32 master weights and Adam state would not fit one device together);
medians over rounds of steps, after warm-up. Prints what it could not run and why.

    python benchmarks/gpu_throughput.py [--cpu-dry-run]

--cpu-dry-run: tiny sizes on the CPU with gloo, to exercise the script without a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distreg.config import StrategyConfig, load_config  # noqa: E402
from distreg.data.tokens import synth_tokens  # noqa: E402
from distreg.runtime import mfu  # noqa: E402
from distreg.testing import free_port  # noqa: E402

NOT_RUN: list[str] = []


def init_world(device: torch.device) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)


def llama_settings(dry: bool) -> dict:
    if dry:
        return {"model.preset": "null", "model.vocab_size": 256, "model.dim": 64, "model.n_layers": 2,
                "model.n_heads": 4, "model.n_kv_heads": 2, "model.ffn_dim": 176, "model.max_seq_len": 64,
                "data.seq_len": 64, "train.global_batch_size": 2}
    return {"model.preset": "null", "model.vocab_size": 32000, "model.dim": 2048, "model.n_layers": 22,
            "model.n_heads": 32, "model.n_kv_heads": 4, "model.ffn_dim": 5632, "model.max_seq_len": 2048,
            "data.seq_len": 2048, "train.global_batch_size": 4}


def build(name: str, extra: list[str], data: str, run_dir: str, dry: bool, device: torch.device):
    from distreg.runtime.comm import Comm
    from distreg.runtime.trainer import Trainer

    base = {**llama_settings(dry), "data.path": data, "run_dir": run_dir, "scaling.num_workers": 1,
            "scaling.use_gpu": str(device.type == "cuda").lower(), "optim.warmup_steps": 0,
            "strategy.mixed_precision.param_dtype": "bf16", "strategy.mixed_precision.reduce_dtype": "fp32",
            "train.max_steps": 1000, "train.log_every": 1000}
    cfg = load_config(None, [f"{k}={v}" for k, v in base.items()] + extra)
    return Trainer(cfg, Comm(), device, track=False)


def time_steps(trainer, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` steps, device work included (one sync at the end)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step_on_device()
    trainer.step_metrics.flush()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def llama_table(dry: bool, device: torch.device, rounds: int, steps: int) -> None:
    tmp = tempfile.mkdtemp(prefix="distreg_gpu_check_")
    vocab = llama_settings(dry)["model.vocab_size"]
    synth_tokens(f"{tmp}/tokens", num_tokens=200_000 if dry else 2_000_000, vocab_size=vocab)
    settings = {"fsdp2 eager": ["strategy.name=fsdp2"]}
    if "compile" in StrategyConfig.model_fields:
        settings["fsdp2 compiled"] = ["strategy.name=fsdp2", "strategy.compile=true"]
    else:
        NOT_RUN.append("fsdp2 compiled: this distreg has no strategy.compile (issue 14 item 4 not merged yet)")
    settings["zero3"] = ["strategy.name=deepspeed", "strategy.zero_stage=3"]
    import gc

    from distreg.models.llama import llama_args

    times, mems, cfg = {}, {}, None
    for name, extra in settings.items():
        trainer = None
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            trainer = build(name, extra, f"{tmp}/tokens", f"{tmp}/{name.replace(' ', '_')}", dry, device)
            cfg = trainer.cfg
            time_steps(trainer, 2, device)  # warm-up (compilation, allocator)
            times[name] = [time_steps(trainer, steps, device) for _ in range(rounds)]
            mems[name] = mfu.peak_memory_gb(device)
        except Exception as e:  # noqa: BLE001 -- report and go on
            NOT_RUN.append(f"{name}: {type(e).__name__}: {e}".splitlines()[0][:300])
            traceback.print_exc()
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not times:
        return
    flops = mfu.model_flops_per_token(cfg)
    peak = mfu.peak_flops(mfu.device_name(device), cfg.train.peak_tflops)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    m = cfg.model
    n_params = llama_args(None, vocab_size=m.vocab_size, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads,
                          n_kv_heads=m.n_kv_heads, ffn_dim=m.ffn_dim, max_seq_len=m.max_seq_len).num_params()
    print(f"\nLlama {n_params / 1e6:,.1f}M params, bf16, world size 1, batch {cfg.train.global_batch_size} x "
          f"{cfg.data.seq_len}, device: {mfu.device_name(device) or 'CPU'}, {flops / 1e9:.3f} GFLOP/token, "
          f"medians of {rounds} rounds of {steps} steps")
    print(f"{'setting':<18}{'s/step':>10}{'tokens/s':>12}{'MFU':>8}{'peak mem GiB':>14}")
    for name, ts in times.items():
        dt = statistics.median(ts)
        u = f"{tokens / dt * flops / peak:.1%}" if peak else "n/a"
        mem = mems.get(name)
        print(f"{name:<18}{dt:>10.3f}{tokens / dt:>12,.0f}{u:>8}{(f'{mem:.1f}' if mem is not None else 'n/a'):>14}")
    if not peak:
        NOT_RUN.append("MFU: no peak FLOP/s for this device (set train.peak_tflops)")


def moe_table(dry: bool, device: torch.device, reps: int) -> None:
    from distreg.models.moe import MoEFeedForward, available_routers

    tokens, dim, ffn, experts = (256, 32, 64, 8) if dry else (4096, 2048, 5632 // 4, 8)
    x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = {}
    for router in available_routers():
        try:
            layer = MoEFeedForward(dim, ffn, num_experts=experts, top_k=1, router=router).to(device, x.dtype)
            times = []
            for i in range(reps + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                layer(x.unsqueeze(0)).float().sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
            rows[router] = statistics.median(times)
        except Exception as e:  # noqa: BLE001
            NOT_RUN.append(f"MoE layer, router {router}: {type(e).__name__}: {e}".splitlines()[0][:300])
    if not rows:
        return
    base = rows.get("topk")
    print(f"\nMoE layer fwd+bwd, {tokens} tokens, E={experts}, top-1, dim {dim}, {x.dtype}, medians of {reps}")
    print(f"{'router':<22}{'ms':>10}{'/ topk':>10}")
    for router, t in rows.items():
        print(f"{router:<22}{t * 1e3:>10.2f}{(f'{t / base:.2f}' if base else 'n/a'):>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU (no GPU needed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if args.cpu_dry_run:
        device = torch.device("cpu")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        args.rounds, args.steps = 2, 2
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        print("no CUDA device: nothing measured (use --cpu-dry-run to exercise the script)")
        sys.exit(2)
    init_world(device)
    for part in (lambda: llama_table(args.cpu_dry_run, device, args.rounds, args.steps),
                 lambda: moe_table(args.cpu_dry_run, device, 5)):
        try:
            part()
        except Exception as e:  # noqa: BLE001
            NOT_RUN.append(f"{type(e).__name__}: {e}".splitlines()[0][:300])
            traceback.print_exc()
    print("\nnot run:" if NOT_RUN else "\neverything ran")
    for line in NOT_RUN:
        print(f"  - {line}")


if __name__ == "__main__":
    main()
