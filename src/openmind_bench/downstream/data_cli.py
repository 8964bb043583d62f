"""`openmind-bench downstream-check | downstream-splits | demo-downstream`: the downstream data."""

from __future__ import annotations


from openmind_bench import config

REGISTRY = config.defaults()["downstream_registry"]


def register(sub) -> None:
    c = sub.add_parser("downstream-check", help="read every registry dataset and report cases, rejections, errors")
    c.add_argument("--registry", default=REGISTRY)
    c.add_argument("--root", help="folder the registry's source paths start from (default: the registry's root)")
    c.add_argument("--datasets", nargs="+", help="only these datasets")
    c.set_defaults(func=run_check)

    s = sub.add_parser("downstream-splits", help="write (or check) the patient-grouped balanced splits")
    s.add_argument("--registry", default=REGISTRY)
    s.add_argument("--root")
    s.add_argument("--datasets", nargs="+")
    s.add_argument("--out", default="results/downstream/splits", help="split folder ({dataset}.json)")
    s.add_argument("--test-fraction", type=float, help="default: config downstream.test_fraction")
    s.add_argument("--folds", type=int, help="default: config downstream.folds")
    s.add_argument("--seed", type=int, help="default: config downstream.split_seed")
    s.set_defaults(func=run_splits)

    d = sub.add_parser("demo-downstream", help="build the demo downstream sets (nnU-Net raw + classification)")
    d.add_argument("--root", default="data/demo_downstream")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=run_demo)


def _read(args):
    from openmind_bench.downstream.readers import read_datasets
    from openmind_bench.registry import load_registry

    registry = load_registry(args.registry, root=args.root)
    return read_datasets(registry, args.datasets), registry


def run_check(args) -> int:
    data, errors = _read(args)[0]
    for name, d in data.items():
        print(f"{name}\tok\t{len(d.cases)} cases\t{len(d.rejected)} rejected")
    for name, message in errors.items():
        print(f"{name}\terror\t{message}")
    return 1 if errors else 0


def run_splits(args) -> int:
    from pathlib import Path

    from openmind_bench.downstream.splits import SplitSettings, split_dataset
    from openmind_bench.registry import load_registry

    registry = load_registry(args.registry, root=args.root)
    given = {"test_fraction": args.test_fraction, "folds": args.folds, "seed": args.seed}
    settings = SplitSettings(**{k: v for k, v in given.items() if v is not None})
    failed = dict(registry.errors)
    for name in args.datasets or registry.names():
        try:
            doc = split_dataset(args.registry, args.root, name, settings, split_out=Path(args.out) / f"{name}.json")
        except ValueError as e:  # a dataset missing on disk or unreadable: the others go on
            failed[name] = str(e)
            continue
        print(f"{name}\t{len(doc['train'])} train\t{len(doc['test'])} test\t{len(doc.get('folds') or [])} folds")
    for name, message in failed.items():
        print(f"{name}\terror\t{message}")
    return 1 if failed else 0


def run_demo(args) -> int:
    from openmind_bench.demo.downstream import build_downstream

    build_downstream(args.root, seed=args.seed)
    return 0
