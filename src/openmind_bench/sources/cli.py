"""`openmind-bench fetch`: fetch one dataset from the configured source."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("fetch", help="fetch one dataset into data/raw/{source}/{dataset}/")
    p.add_argument("--config", required=True, help="workflow config YAML (source section, datasets table)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--schema", default="config/schema.yaml", help="config schema (repository's)")
    p.add_argument("--raw-dir", default="data/raw", help="raw root; the tree goes to RAW/{source}/{dataset}")
    p.add_argument("--rejected", help="rejection part TSV (default: results/qc/parts/fetch/...)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from openmind_bench import config as cfg
    from openmind_bench.qc import Rejections
    from openmind_bench.sources import fetch_dataset

    config = cfg.load(args.config, args.schema)
    table = cfg.read_datasets_table(config["datasets_table"])
    if args.dataset not in table.index:
        raise ValueError(f"{args.dataset} is not in {config['datasets_table']}")
    kind = config["source"]["kind"]
    dest = Path(args.raw_dir) / kind / args.dataset
    rejections = Rejections("fetch")
    fetch_dataset(config["source"], args.dataset, table.loc[args.dataset, "snapshot"],
                  dest, dest / "download_manifest.json", rejections)
    rejections.write(args.rejected or f"results/qc/parts/fetch/{kind}/{args.dataset}.tsv")
    return 0
