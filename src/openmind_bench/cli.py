"""`openmind-bench`: every stage as a sub-command, for use outside Snakemake.

Each stage package that has a CLI exposes `register(subparsers)`; this module only collects
them, so adding a stage is one line in STAGES.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from openmind_bench import __version__
from openmind_bench.logs import log_to

# stage modules with a `register(subparsers)` function, in pipeline order
STAGES = [
    "openmind_bench.demo.cli",
    "openmind_bench.sources.cli",
    "openmind_bench.sources.s3_mirror",
    "openmind_bench.bids.cli",
    "openmind_bench.dwi.cli",
    "openmind_bench.masks.cli",
    "openmind_bench.preprocess.cli",
    "openmind_bench.curation.cli",
    "openmind_bench.pretrain.cli",
    "openmind_bench.downstream.data_cli",
    "openmind_bench.downstream.cli",
    "openmind_bench.qc_cli",
    "openmind_bench.aggregate.cli",
    "openmind_bench.checkpoints.cli",
    "openmind_bench.checkpoints.evaluate",
    "openmind_bench.profiles",
    "openmind_bench.estimate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openmind-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--log", help="also write the log to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name in STAGES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # stage not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with log_to(args.log, level=logging.DEBUG if args.verbose else logging.INFO):
        try:
            return int(args.func(args) or 0)
        except (ValueError, RuntimeError, OSError) as e:
            logging.getLogger("openmind_bench").error("%s", e)
            return 1


if __name__ == "__main__":
    sys.exit(main())
