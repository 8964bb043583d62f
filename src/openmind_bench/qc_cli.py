"""`openmind-bench qc-gather`: concatenate rejection parts into one rejected.tsv."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("qc-gather", help="merge per-job rejection records")
    p.add_argument("parts", nargs="+")
    p.add_argument("--out", default="results/qc/rejected.tsv")
    p.set_defaults(func=run)


def run(args) -> int:
    from openmind_bench.qc import gather

    table = gather(args.parts, args.out)
    print(f"{len(table)} rejected file(s) -> {args.out}")
    return 0
