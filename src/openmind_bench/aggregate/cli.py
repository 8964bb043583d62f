"""`openmind-bench aggregate` and `openmind-bench collect-results`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openmind_bench.aggregate.registry import DEFAULT_PATH


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers) -> None:
    """Add the `aggregate` and `collect-results` sub-commands."""
    p = subparsers.add_parser(
        "aggregate",
        help="benchmark table, bootstrap rank stability and figures from a long results CSV",
        description=(
            "Read RESULTS.csv (columns method, architecture, strategy, dataset, metric, value and "
            "optional fold, case) and write benchmark_table.{csv,md,tex}, ranks_bootstrap.csv, "
            "bootstrap_intervals.csv and plots/*.png into OUT."
        ),
    )
    p.add_argument("--results", required=True, type=Path, help="long-format results CSV")
    p.add_argument(
        "--registry",
        type=Path,
        default=Path(DEFAULT_PATH),
        help=f"downstream dataset registry (YAML) giving ID/OOD domains and dataset order (default: {DEFAULT_PATH}); "
        "if absent, the ID/OOD means stay empty",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--bootstrap", type=_positive, default=1000, help="bootstrap samples (default: 1000)")
    p.add_argument("--seed", type=_non_negative, default=0, help="bootstrap seed (default: 0)")
    p.set_defaults(func=aggregate_command)

    c = subparsers.add_parser(
        "collect-results",
        help="gather fine-tuning metrics.json files into the long results CSV",
        description="Write the long results CSV that `aggregate` reads from per-run metrics.json files.",
    )
    c.add_argument("metrics", nargs="*", type=Path, help="metrics.json files")
    c.add_argument(
        "--root",
        type=Path,
        help="also take every {dataset}/{run}/fold_{k}/metrics.json below this folder (e.g. results/downstream)",
    )
    c.add_argument("--out", required=True, type=Path, help="results CSV to write")
    c.set_defaults(func=collect_command)


def aggregate_command(args: argparse.Namespace) -> int:
    from openmind_bench.aggregate import RegistryError, ResultsFormatError, run

    try:
        run(args.results, args.out, registry=args.registry, bootstrap_samples=args.bootstrap, seed=args.seed)
    except (ResultsFormatError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def collect_command(args: argparse.Namespace) -> int:
    from openmind_bench.aggregate.collect import (
        CollectError,
        find_metrics_files,
        write_results,
    )

    paths = list(args.metrics)
    if args.root is not None:
        paths += find_metrics_files(args.root)
    try:
        write_results(sorted(set(paths)), args.out)
    except CollectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
