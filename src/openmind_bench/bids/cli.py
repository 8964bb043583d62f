"""`openmind-bench index` and `openmind-bench gather-index`."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("index", help="index one fetched dataset (one parquet row per image)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--manifest", required=True, help="the dataset's download_manifest.json")
    p.add_argument("--out", required=True, help="output parquet")
    p.add_argument("--rejected", required=True, help="rejection part TSV")
    p.add_argument("--n-shards", type=int, default=1)
    p.add_argument("--modalities", nargs="+", default=None, help="default: every known modality")
    p.add_argument("--verify-data", action="store_true", help="read voxels, not only headers")
    p.set_defaults(func=run_index_cmd)

    g = sub.add_parser("gather-index", help="concatenate per-dataset indexes into images.parquet")
    g.add_argument("parts", nargs="+")
    g.add_argument("--out", required=True)
    g.add_argument("--shards", required=True, help="output shards.tsv")
    g.add_argument("--datasets-table", required=True, help="TSV with dataset_id, snapshot, expected_images")
    g.add_argument("--shard-size", type=int, required=True)
    g.set_defaults(func=run_gather_cmd)


def run_index_cmd(args) -> int:
    from openmind_bench.bids_names import MODALITY_OF_SUFFIX
    from openmind_bench.bids.index import run_index

    modalities = args.modalities or sorted(set(MODALITY_OF_SUFFIX.values()))
    run_index(args.dataset, args.manifest, args.out, args.rejected, n_shards=args.n_shards,
              modalities=modalities, verify_data=args.verify_data)
    return 0


def run_gather_cmd(args) -> int:
    import pandas as pd

    from openmind_bench import config as cfg
    from openmind_bench.bids.index import gather

    table = cfg.read_datasets_table(args.datasets_table)
    datasets = sorted({d for p in args.parts for d in pd.read_parquet(p, columns=["dataset"]).dataset}
                      | set(table.index))
    expected = {d: int(table.loc[d, "expected_images"]) for d in datasets}
    n_shards = {d: cfg.num_shards(n, args.shard_size) for d, n in expected.items()}
    gather(args.parts, args.out, args.shards, expected=expected, n_shards=n_shards)
    return 0
