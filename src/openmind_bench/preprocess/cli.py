"""`openmind-bench preprocess`: one (dataset, shard) of the index into the blosc2 store."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("preprocess", help="preprocess one shard of one dataset into the blosc2 store")
    p.add_argument("--index", nargs="+", default=["results/index/images.parquet"],
                   help="index parquet table(s) (default: results/index/images.parquet)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--out-root", default="results/preprocessed", help="store root")
    p.add_argument("--manifest", required=True, help="output shard manifest TSV")
    p.add_argument("--rejected", required=True, help="output rejection part TSV")
    p.add_argument("--config", help="YAML config; its `preprocess` section sets spacing, orders and store")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="target spacing in mm")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import yaml

    from openmind_bench.preprocess.image import PreprocessSettings
    from openmind_bench.preprocess.shard import run_preprocess_shard

    cfg = {}
    if args.config:
        cfg = dict((yaml.safe_load(Path(args.config).read_text()) or {}).get("preprocess") or {})
    if args.spacing:
        cfg["spacing"] = list(args.spacing)
    manifest = run_preprocess_shard(args.index, args.dataset, args.shard, args.out_root, args.manifest,
                                    args.rejected, PreprocessSettings.from_config(cfg))
    print(f"{len(manifest)} image(s) written -> {args.manifest}")
    return 0
