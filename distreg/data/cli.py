"""`distreg data ...` subcommands. Heavy modules are imported inside each command, so
`distreg --help` stays fast and spawned worker processes start light."""
from __future__ import annotations

import functools
import os
import sys


def _reports_data_errors(fn):
    """A DataError (bad input, named in the message) ends the command with that message,
    not a traceback."""
    @functools.wraps(fn)
    def run(args) -> int:
        from distreg.data.errors import DataError

        try:
            return fn(args)
        except DataError as e:
            print(f"distreg: data error: {e}", file=sys.stderr)
            return 1
    return run


def _synth_tokens(args) -> int:
    from distreg.data.tokens import synth_tokens

    synth_tokens(args.out, num_tokens=args.tokens, vocab_size=args.vocab_size, num_shards=args.shards, seed=args.seed)
    print(f"wrote {args.tokens} tokens in {args.shards} shards to {args.out}")
    return 0


@_reports_data_errors
def _synth_imagenet(args) -> int:
    from distreg.data.synth_imagenet import synth_imagenet

    counts = synth_imagenet(args.dest, num_classes=args.classes, train_per_class=args.train_per_class,
                            val_per_class=args.val_per_class, min_size=args.min_size, max_size=args.max_size,
                            val_layout=args.val_layout, seed=args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val JPEGs of {args.classes} classes to {args.dest}")
    return 0


def _where(nodes: dict[str, int]) -> str:
    """Where the tasks ran: Ray node ids (counted), or this machine."""
    ray_nodes = {k: v for k, v in nodes.items() if k not in ("driver", "pool")}
    return f" (tasks on {len(ray_nodes)} Ray node(s): {sorted(ray_nodes.values())})" if ray_nodes else ""


@_reports_data_errors
def _imagenet_to_shards(args) -> int:
    from distreg.data.imagenet_convert import convert_imagenet

    from distreg.data.convert_run import use_ray

    s = convert_imagenet(args.src, args.dest, shard_size=args.shard_size, processes=args.processes, seed=args.seed,
                         val_labels=args.val_labels, verify=args.verify, ray=use_ray(args.ray),
                         max_in_flight=args.max_in_flight, mlflow_uri=args.mlflow_uri,
                         progress_every=args.progress_every)
    splits = ", ".join(f"{k}: {v} images" for k, v in s["splits"].items())
    print(f"{args.dest}: {splits}; {s['written']} shards written, {s['skipped']} already complete"
          f"{_where(s['nodes'])}")
    return 0


@_reports_data_errors
def _tokenize(args) -> int:
    from distreg.data.tokenize import tokenize_corpus

    from distreg.data.convert_run import use_ray

    s = tokenize_corpus(args.src, args.dest, tokenizer=args.tokenizer, eos_token=args.eos_token,
                        text_key=args.text_key, shard_tokens=args.shard_tokens,
                        task_bytes=int(args.task_mb * 2**20), processes=args.processes, ray=use_ray(args.ray),
                        max_in_flight=args.max_in_flight, verify=args.verify, mlflow_uri=args.mlflow_uri,
                        progress_every=args.progress_every)
    print(f"{args.dest}: {s['num_tokens']} tokens of {s['num_documents']} documents in {s['num_shards']} shards "
          f"(vocab {s['vocab_size']}, eos {s['eos_id']}); {s['written']} tasks written, {s['skipped']} already complete"
          f"{_where(s['nodes'])}")
    return 0


def _add_job_args(p) -> None:
    """Where a conversion runs and how it reports (shared by tokenize / imagenet-to-shards)."""
    p.add_argument("--ray", action="store_true",
                   help="run tasks on the Ray cluster of RAY_ADDRESS (or a new local one); implied by RAY_ADDRESS")
    p.add_argument("--max-in-flight", type=int, default=None, help="tasks submitted at once (default 2 x CPUs)")
    p.add_argument("--mlflow-uri", default=None, help="log progress (files, bytes, rate, ETA) to this MLflow server")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")


def add_data_commands(sub) -> None:
    p = sub.add_parser("synth-tokens", help="write a small learnable token corpus")
    p.add_argument("out", help="directory or fsspec URL")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_synth_tokens)

    p = sub.add_parser("synth-imagenet", help="write a small ImageNet-format tree of real JPEGs")
    p.add_argument("dest", help="directory or fsspec URL")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=16)
    p.add_argument("--val-per-class", type=int, default=4)
    p.add_argument("--min-size", type=int, default=40, help="smallest image side (pixels)")
    p.add_argument("--max-size", type=int, default=64, help="largest image side (pixels)")
    p.add_argument("--val-layout", choices=["csv", "devkit", "folders"], default="csv",
                   help="flat val/ + LOC_val_solution.csv, flat val/ + the devkit's ground truth and meta.mat, "
                        "or val/<wnid>/ folders")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_synth_imagenet)

    p = sub.add_parser("imagenet-to-shards", help="ILSVRC-2012 tree -> webdataset tar shards + manifest (restartable)")
    p.add_argument("src", help="ILSVRC tree (train/<wnid>/*.JPEG, val/...); path or fsspec URL")
    p.add_argument("dest", help="output directory or fsspec URL (DEST/classes.json, DEST/<split>/...)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0, help="sample order before sharding")
    p.add_argument("--val-labels", default=None, help="val labels: LOC_val_solution.csv, '<image> <wnid>' lines, or the devkit's "
                        "ILSVRC2012_validation_ground_truth.txt (meta.mat beside it) or folder (default: look under "
                        "SRC for ILSVRC2012_devkit_t12/data, then LOC_val_solution.csv)")
    p.add_argument("--verify", action="store_true", help="on restart, re-check the checksum of complete shards")
    _add_job_args(p)
    p.set_defaults(fn=_imagenet_to_shards)

    p = sub.add_parser("tokenize", help="text/jsonl files -> token shards (restartable)")
    p.add_argument("src", help="file, directory or glob of .txt/.jsonl (compressed ok); path or fsspec URL")
    p.add_argument("dest", help="output directory or fsspec URL")
    p.add_argument("--tokenizer", required=True, help="path/URL of a Hugging Face tokenizer.json, or 'bytes'")
    p.add_argument("--eos-token", default=None, help="end-of-document token (default: autodetect)")
    p.add_argument("--text-key", default="text", help="jsonl field holding the text")
    p.add_argument("--shard-tokens", type=int, default=2**27, help="tokens per shard at most")
    p.add_argument("--task-mb", type=float, default=256, help="input megabytes per parallel task")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--verify", action="store_true", help="on restart, re-check the checksum of complete shards")
    _add_job_args(p)
    p.set_defaults(fn=_tokenize)

    from distreg.data.stdlib_corpus import add_command as add_stdlib_corpus

    add_stdlib_corpus(sub, _reports_data_errors)

def main(argv: list[str] | None = None) -> int:
    """`python -m distreg.data.cli COMMAND ...`: the `distreg data` commands without the
    rest of the CLI (which imports torch: seconds a conversion driver does not need)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distreg.data.cli", description="distreg data commands")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
