"""`distreg` command line: train, config show, data synth-tokens, mlflow-sync."""
from __future__ import annotations

import argparse
import sys

from distreg.config import ConfigError, load_config
from distreg.data.cli import add_data_commands


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.max_steps=100")


def _train(args) -> int:
    from distreg.data import check_data
    from distreg.data.tokens import DataError

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from distreg.plan import format_plan, plan

        print(format_plan(plan(cfg)))
        return 0
    # Check the data before any worker starts: a missing path is named here, not in a
    # worker's traceback.
    try:
        check_data(cfg)
        if cfg.eval.enabled:  # the held-out data too (eval:)
            from distreg.data.heldout import build_heldout

            build_heldout(cfg, 0, 1)
    except DataError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    from distreg.launch import launch, print_summary

    print_summary(launch(cfg, resume=args.resume))
    return 0


def _plan(args) -> int:
    from distreg.plan import format_plan, plan

    print(format_plan(plan(load_config(args.config, args.overrides), args.world_size)))
    return 0


def _config_show(args) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _mlflow_sync(args) -> int:
    from distreg.tracking.mlflow_tracker import sync_fallback

    print(f"uploaded {sync_fallback(args.run_dir, args.uri)} records from {args.run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distreg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config on Ray (local cluster, or RAY_ADDRESS)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the model and per-rank memory plan; train nothing")
    p.set_defaults(fn=_train)

    p = sub.add_parser("plan", help="model size and per-rank memory under the configured sharding (meta device)")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, default=None, help="default: scaling.num_workers")
    p.set_defaults(fn=_plan)

    from distreg import eval_cli

    p = sub.add_parser("eval", help="held-out metrics of a checkpoint (any strategy, any world size)")
    eval_cli.add_arguments(p)
    p.set_defaults(fn=eval_cli.run)

    from distreg import submit

    p = sub.add_parser("submit", help="submit a config to a Ray cluster as a Ray job")
    submit.add_arguments(p)
    p.set_defaults(fn=submit.run)

    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    p = cfg.add_parser("show", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(fn=_config_show)

    add_data_commands(sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True))

    from distreg import bench

    bench.add_commands(sub.add_parser("bench", help="benchmark suites").add_subparsers(dest="bench_command", required=True))

    from distreg import adapters, prune

    prune.add_commands(sub.add_parser("prune", help="training-free pruning of a checkpoint").add_subparsers(
        dest="prune_command", required=True))
    adapters.add_commands(sub.add_parser("adapters", help="adapter tools (merge into plain weights)").add_subparsers(
        dest="adapters_command", required=True))

    from distreg.interop import hf_export

    hf_export.add_commands(sub.add_parser("export", help="export a checkpoint to another format").add_subparsers(
        dest="export_command", required=True))

    from distreg import self_distill

    self_distill.add_command(sub)

    p = sub.add_parser("mlflow-sync", help="upload metrics a tracking outage kept in <run_dir>")
    p.add_argument("run_dir")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or the run's sqlite)")
    p.set_defaults(fn=_mlflow_sync)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"distreg: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
