"""`openmind-bench aggregate`, `collect-results`, `benchmark-table` and `scorecard`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openmind_bench import config


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
    """Add the `aggregate` and `collect-results` sub-commands (defaults: the config schema's)."""
    defaults = config.defaults()
    registry, section = defaults["downstream_registry"], defaults["aggregate"]
    p = subparsers.add_parser(
        "aggregate",
        help="benchmark table, bootstrap rank stability and figures from a long results CSV",
        description=(
            "Read RESULTS.csv (columns method, architecture, schedule, dataset, metric, value and "
            "optional fold, case) and write benchmark_table.{csv,md,tex}, ranks_bootstrap.csv, "
            "bootstrap_intervals.csv and plots/*.png into OUT."
        ),
    )
    p.add_argument("--results", required=True, type=Path, help="long-format results CSV")
    p.add_argument(
        "--registry",
        type=Path,
        default=Path(registry),
        help=f"downstream dataset registry (YAML) giving ID/OOD domains and dataset order (default: {registry}); "
        "if absent, the ID/OOD means stay empty",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--external-checkpoints", type=Path,
                   help="the external checkpoints' provenance that `collect-results --external-out` wrote: "
                   "their rows are marked and their sources listed below the tables")
    p.add_argument("--compute", type=Path,
                   help="the runs' compute ledgers (a compute.csv that `benchmark-table` wrote): copied to "
                   "OUT/compute.csv, a Cost column in the Markdown table and plots/compute_hours.png")
    p.add_argument("--bootstrap", type=_positive, default=section["bootstrap_samples"],
                   help=f"bootstrap samples (default: {section['bootstrap_samples']})")
    p.add_argument("--seed", type=_non_negative, default=section["seed"], help=f"bootstrap seed (default: {section['seed']})")
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
    c.add_argument("--external-out", type=Path,
                   help="also write the external checkpoints' provenance ({method label: provenance}, JSON) here, "
                   "for `aggregate --external-checkpoints`")
    c.set_defaults(func=collect_command)

    b = subparsers.add_parser(
        "benchmark-table",
        help="collect every metrics.json below ROOT and aggregate (what `snakemake benchmark_table` runs)",
    )
    b.add_argument("--root", type=Path, default=Path("results/downstream"), help="folder of the fine-tuning results")
    b.add_argument("--registry", type=Path, default=Path(registry), help=f"dataset registry (default: {registry})")
    b.add_argument("--out", type=Path, default=Path("results/benchmark"), help="output directory")
    b.add_argument("--bootstrap", type=_positive, default=section["bootstrap_samples"])
    b.add_argument("--seed", type=_non_negative, default=section["seed"])
    b.add_argument("--leakage", type=Path, default=Path("results/curation/leakage.tsv"),
                   help="leakage pairs whose counts the tables' footnote gives (skipped when absent)")
    b.set_defaults(func=benchmark_table_command)

    s = subparsers.add_parser(
        "scorecard",
        help="one external checkpoint against the scratch baselines of its architecture (CSV + Markdown)",
        description="Write OUT_DIR/scorecard_{NAME}.csv and .md from the checkpoint's metrics.json files and "
        "those of the scratch runs of its architecture (other runs among METRICS are left out).",
    )
    s.add_argument("metrics", nargs="*", type=Path, help="metrics.json files")
    s.add_argument("--root", type=Path, help="also take every {dataset}/{run}/fold_{k}/metrics.json below this folder")
    s.add_argument("--checkpoint", required=True, help="the external checkpoint's name (config `checkpoints`)")
    s.add_argument("--out-dir", required=True, type=Path, help="output directory")
    s.add_argument("--registry", type=Path, default=Path(registry),
                   help=f"dataset registry giving ID/OOD domains (default: {registry}; if absent, no ID/OOD means)")
    s.set_defaults(func=scorecard_command)


def aggregate_command(args: argparse.Namespace) -> int:
    from openmind_bench.aggregate import ResultsFormatError, run
    from openmind_bench.aggregate.collect import CollectError, read_external_checkpoints
    from openmind_bench.registry import RegistryError

    try:
        from openmind_bench.aggregate.compute import read_table

        external = read_external_checkpoints(args.external_checkpoints) if args.external_checkpoints else None
        run(args.results, args.out, registry=args.registry, bootstrap_samples=args.bootstrap, seed=args.seed,
            external=external, compute=read_table(args.compute) if args.compute else None)
    except (CollectError, ResultsFormatError, RegistryError) as e:
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
        write_results(sorted(set(paths)), args.out, external_out=args.external_out)
    except CollectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def benchmark_table_command(args: argparse.Namespace) -> int:
    from openmind_bench.aggregate import ResultsFormatError, benchmark_table
    from openmind_bench.aggregate.collect import CollectError, find_metrics_files
    from openmind_bench.registry import RegistryError

    try:
        benchmark_table(find_metrics_files(args.root), args.out, registry=args.registry,
                        bootstrap_samples=args.bootstrap, seed=args.seed, leakage=args.leakage)
    except (CollectError, ResultsFormatError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def scorecard_command(args: argparse.Namespace) -> int:
    from openmind_bench.aggregate.collect import CollectError, find_metrics_files
    from openmind_bench.aggregate.scorecard import ScorecardError, scorecard_paths, write_scorecard
    from openmind_bench.registry import RegistryError

    paths = list(args.metrics)
    if args.root is not None:
        paths += find_metrics_files(args.root)
    out_csv, out_md = scorecard_paths(args.out_dir, args.checkpoint)
    try:
        write_scorecard(sorted(set(paths)), args.checkpoint, out_csv, out_md,
                        registry=args.registry)
    except (CollectError, ScorecardError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
