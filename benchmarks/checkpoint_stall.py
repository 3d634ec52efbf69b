"""Step-time stall of a checkpoint: synchronous vs `checkpoint.async: true`, same run,
interleaved, against local disk and against an S3-compatible server (moto, started on
127.0.0.1 by this script and stopped at the end).

    python benchmarks/checkpoint_stall.py [--preset llama-small] [--strategy fsdp2] [--world 2]
                                          [--every 4] [--rounds 3] [--targets local s3]

Two Trainers per rank (same model and data), one with synchronous and one with
asynchronous checkpoints. Per target, each round times three blocks of `--every` steps:
`none` (the steps alone, sync trainer), `sync` (a save, then the steps) and `async` (a
save, the steps while it uploads, then waiting for it to complete - so a slow upload is
charged in full). stall = block time - `none` block time of the same round; the table
gives medians over rounds, the save call's own duration (what the step waits for at
the save), and the checkpoint size. Times are rank 0's; ratios are what carries over
from this shared machine. AdamW state included: a checkpoint holds ~3x the fp32 weights.

The async stall is split in two: `in steps` (the save call plus what the background
write costs the steps that run beside it: CPU, memory bandwidth, the GIL) and `wait`
(the upload outlasting the `--every` steps: in training, the next save - or the end of
the run - blocks for that long). A `wait` above 0 means the save interval is shorter than
the upload: set `checkpoint.every` so that every x step time > upload time (`upload`
column: save call to upload complete), and the async stall is the `in steps` part alone.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                         region_name="us-east-1").create_bucket(Bucket="ckpt")
            return proc, url
        except Exception:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("moto_server did not start")


def dir_size(url: str) -> int:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return sum(fs.du(path, total=False).values()) if fs.exists(path) else 0


def worker(data: str, root: str, args: dict) -> dict:
    import torch

    from distreg.config import load_config
    from distreg.runtime.comm import Comm
    from distreg.runtime.trainer import Trainer

    torch.set_num_threads(1)
    comm = Comm()
    strategy = {"fsdp2": ["strategy.name=fsdp2"], "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"]}
    trainers = {}
    for mode in ("sync", "async"):
        cfg = load_config(None, [
            f"data.path={data}", f"run_dir={root}/{mode}", "data.seq_len=64", f"model.preset={args['preset']}",
            f"scaling.num_workers={args['world']}", "train.global_batch_size=8", "train.max_steps=100000",
            "optim.warmup_steps=0", "checkpoint.keep_last=1", f"checkpoint.async={mode == 'async'}",
            *strategy[args["strategy"]]])
        t = Trainer(cfg, comm, track=False)
        t.train_step()  # warm-up
        trainers[mode] = t
    out = {}
    for target in args["targets"]:
        base = f"{root}/ckpt" if target == "local" else "s3://ckpt/run"
        for mode, t in trainers.items():
            t.cfg.checkpoint.dir = f"{base}/{mode}"
        res = {"none": [], "sync": [], "async": [], "sync_call": [], "async_call": [], "async_wait": []}
        try:
            for _ in range(args["rounds"]):
                for mode in ("none", "sync", "async"):
                    t = trainers["sync" if mode == "none" else mode]
                    comm.barrier()
                    t0 = time.perf_counter()
                    if mode != "none":
                        t.save()
                        res[f"{mode}_call"].append(time.perf_counter() - t0)
                    for _ in range(args["every"]):
                        t.train_step()
                    t1 = time.perf_counter()
                    t.wait_for_checkpoint()  # the upload still running after the steps
                    if mode == "async":
                        res["async_wait"].append(time.perf_counter() - t1)
                    comm.barrier()
                    res[mode].append(time.perf_counter() - t0)
        except Exception as e:  # a failed save fails on every rank (DCP reduces errors): report, go on
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        res["size"] = dir_size(trainers["sync"].cfg.checkpoint_dir) if comm.rank == 0 else 0
        out[target] = res
        if comm.rank == 0:
            print(row(target, res), flush=True)
    return out


HEADER = ("| target | checkpoint (MB) | steps alone (s) | sync: save call (s) | sync stall (s) | "
          "async: save call (s) | async stall in steps (s) | async: wait for upload (s) | async upload (s) | "
          "async / sync stall | async in steps / sync stall |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def row(target: str, r: dict) -> str:
    if not r["async"]:
        return f"| {target} | failed: {r.get('error')} | | | | | | | | | |"
    n = len(r["async"])
    none = statistics.median(r["none"][:n])
    stall = {m: statistics.median([b - a for a, b in zip(r["none"], r[m])]) for m in ("sync", "async")}
    in_steps = statistics.median([b - w - a for a, b, w in zip(r["none"], r["async"], r["async_wait"])])
    wait = statistics.median(r["async_wait"])
    # the upload ran from the save call to the end of the wait: the whole async block
    # (an upper bound when nothing was left to wait for)
    upload = statistics.median(r["async"])
    def ratio(x):
        return x / stall["sync"] if stall["sync"] > 0 else float("nan")
    return (f"| {target} | {r['size'] / 2**20:.0f} | {none:.2f} | {statistics.median(r['sync_call']):.2f} | "
            f"{stall['sync']:.2f} | {statistics.median(r['async_call']):.2f} | {in_steps:.2f} | {wait:.2f} | "
            f"{'<= ' if wait < 0.01 else ''}{upload:.2f} | {ratio(stall['async']):.2f} | {ratio(in_steps):.2f} |"
            + (f" (after {n} rounds: {r['error']})" if "error" in r else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-small")
    ap.add_argument("--strategy", choices=["fsdp2", "zero3"], default="fsdp2")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--every", type=int, default=4, help="steps per block (checkpoint period)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--targets", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    moto = None
    try:
        if "s3" in args.targets:
            moto, url = start_moto()
            # s3fs (through fsspec's environment config) in every spawned rank
            os.environ["FSSPEC_S3_ENDPOINT_URL"] = url
            os.environ["FSSPEC_S3_KEY"] = "testing"
            os.environ["FSSPEC_S3_SECRET"] = "testing"
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        from distreg.data.tokens import synth_tokens
        from distreg.testing import run_distributed

        tmp = tempfile.mkdtemp(prefix="ckpt_stall_")
        vocab = 256 if args.preset == "llama-tiny" else 32000
        synth_tokens(f"{tmp}/tokens", num_tokens=200_000, vocab_size=vocab)
        res = run_distributed(worker, args.world, f"{tmp}/tokens", tmp, vars(args))[0]
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)
    print(f"{args.preset}, {args.strategy} x {args.world}, a checkpoint every {args.every} steps, "
          f"{args.rounds} interleaved rounds (medians, rank 0)")
    print("\n" + HEADER)
    for target, r in res.items():
        print(row(target, r))


if __name__ == "__main__":
    main()
