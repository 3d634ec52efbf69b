"""`distreg bench run | compare`."""
from __future__ import annotations

import sys


def _compare(args) -> int:
    from distreg.bench.compare import compare
    from distreg.bench.record import BenchError

    try:
        return compare(args.suite, args.baseline, args.last, args.tracking_uri, args.run)
    except BenchError as e:
        print(f"distreg bench compare: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from distreg.bench.runner import run_suite

    run_suite(args.suite, args.out, args.tracking_uri, args.overrides)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="run a benchmark suite")
    p.add_argument("suite")
    p.add_argument("--out", default="runs/bench", help="where the entries' run directories go (path or fsspec URL)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every entry (repeatable), e.g. --set train.max_steps=5; "
                        "{entry} stands for the entry's name")
    p.set_defaults(fn=_run)
    p = sub.add_parser("compare", help="compare a suite run to the median of earlier ones; exit 1 on regression, "
                                       "2 on a usage/lookup error")
    p.add_argument("suite")
    p.add_argument("--run", default=None, help="MLflow run id of the suite run to check (default: the latest)")
    p.add_argument("--baseline", default=None, help="MLflow run id of one baseline suite run (default: the median "
                                                    "of the last N on the same hardware)")
    p.add_argument("--last", "--best-of", dest="last", type=int, default=None,
                   help="baseline: the last N suite runs on the same hardware (default: the suite's baseline_runs); "
                        "--best-of is the old name")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(fn=_compare)
