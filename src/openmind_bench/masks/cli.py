"""`openmind-bench masks` / `openmind-bench quality`: one shard through the masks or quality stage."""

from __future__ import annotations


def register(sub) -> None:
    for verb, helptext in (("masks", "anatomy and anonymisation masks of one (dataset, shard)"),
                           ("quality", "quality metrics and image scores of one (dataset, shard)")):
        p = sub.add_parser(verb, help=helptext)
        p.add_argument("--index", nargs="+", required=True, help="image table(s) (parquet); quality: the masked index")
        p.add_argument("--dataset", required=True)
        p.add_argument("--shard", type=int, required=True)
        p.add_argument("--config", help="YAML config (its masks/quality keys); defaults from the schema")
        p.add_argument("--out", required=True, help="shard table (parquet)")
        p.add_argument("--rejected", required=True, help="rejection part (tsv)")
        if verb == "masks":
            p.add_argument("--out-root", default="results/masks", help="where the mask files go")
        p.set_defaults(func=run, verb=verb)


def run(args) -> int:
    from pathlib import Path

    import yaml

    from openmind_bench import config as cfg

    schema = Path(__file__).resolve().parents[3] / "config" / "schema.yaml"
    config = cfg.validate(yaml.safe_load(Path(args.config).read_text()) if args.config else {}, schema)
    if args.verb == "masks":
        from openmind_bench.masks.shard import run_masks_shard

        table = run_masks_shard(args.index, args.dataset, args.shard, args.out_root, args.out, args.rejected,
                                config["masks"])
    else:
        from openmind_bench.quality.shard import run_quality_shard

        table = run_quality_shard(args.index, args.dataset, args.shard, args.out, args.rejected, config["quality"])
    print(f"{len(table)} image(s) -> {args.out}")
    return 0
