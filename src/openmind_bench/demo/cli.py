"""`openmind-bench demo`: write the embedded demo mirror."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="build the embedded demo mirror (OpenNeuro layout)")
    p.add_argument("--root", default="data/demo_mirror", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, choices=(1, 2), default=2)
    p.add_argument("--no-faults", action="store_true", help="do not break any file on purpose")
    p.set_defaults(func=run)


def run(args) -> int:
    from openmind_bench.demo import build_demo

    build_demo(args.root, seed=args.seed, resolution=args.resolution, inject_faults=not args.no_faults)
    return 0
