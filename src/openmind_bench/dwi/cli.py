"""`openmind-bench dwi` (one shard) and `openmind-bench dwi-gather`."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("dwi", help="derive T2w/ADC/FA maps from the DWI scans of one shard of one dataset")
    p.add_argument("--index", default="results/index/images.parquet", help="the index parquet")
    p.add_argument("--dataset", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--deriv-root", default="results/derivatives/dwi", help="BIDS derivatives root")
    p.add_argument("--table", required=True, help="output parquet of the derived images (index columns)")
    p.add_argument("--status", required=True, help="output status TSV (image, step, seconds, outcome)")
    p.add_argument("--rejected", required=True, help="output rejection part TSV")
    p.add_argument("--config", help="YAML config; its `dwi` section sets the steps and backend")
    p.add_argument("--schema", default="config/schema.yaml", help="config schema (repository's)")
    p.add_argument("--backend", choices=["dipy", "mrtrix3"], help="override dwi.backend")
    p.set_defaults(func=run)

    g = sub.add_parser("dwi-gather", help="concatenate the shard tables into the derived images' index")
    g.add_argument("tables", nargs="+")
    g.add_argument("--out", required=True)
    g.set_defaults(func=run_gather)


def run(args) -> int:
    from pathlib import Path

    import yaml

    from openmind_bench import config
    from openmind_bench.dwi.derive import DwiSettings
    from openmind_bench.dwi.shard import run_dwi_shard

    cfg = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
    cfg = config.validate(cfg, args.schema)["dwi"]
    if args.backend:
        cfg["backend"] = args.backend
    table = run_dwi_shard(args.index, args.dataset, args.shard, args.deriv_root, args.table, args.status,
                          args.rejected, DwiSettings.from_config(cfg))
    print(f"{len(table)} derived image(s) -> {args.table}")
    return 0


def run_gather(args) -> int:
    from openmind_bench.dwi.shard import gather

    print(f"{len(gather(args.tables, args.out))} derived image(s) -> {args.out}")
    return 0
