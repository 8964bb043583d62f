"""`openmind-bench select`: one named selection as pretrain_data.json + its preprocessed twin."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("select", help="write a selection's pretrain_data.json and preprocessed twin")
    p.add_argument("--name", required=True, help="selection name (a `selections` entry of --config, or ad hoc)")
    p.add_argument("--config", help="YAML config whose `selections` list holds --name")
    p.add_argument("--modalities", nargs="*", default=None, help="ad hoc: keep these modalities")
    p.add_argument("--datasets", nargs="*", default=None, help="ad hoc: keep these datasets")
    p.add_argument("--max-quality-score", type=float, help="ad hoc: keep scores <= this (1-5, lower is better)")
    p.add_argument("--drop-unscored", action="store_true", help="ad hoc: drop images without a score")
    p.add_argument("--index", nargs="+", default=["results/index/images.parquet"], help="index parquet table(s)")
    p.add_argument("--manifests", nargs="+", required=True, help="preprocessing shard manifests")
    p.add_argument("--quality", nargs="*", default=[], help="tables with image_id, quality_score columns")
    p.add_argument("--registry", default="config/downstream_datasets.yaml",
                   help="downstream registry whose test subjects on OpenNeuro are never selected")
    p.add_argument("--out-dir", help="default: results/selections/NAME")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import yaml

    from openmind_bench.registry import downstream_test_subjects
    from openmind_bench.curation.pretrain_data import PREPROCESSED_TWIN
    from openmind_bench.curation.select import run_selection

    entries = []
    if args.config:
        entries = list((yaml.safe_load(Path(args.config).read_text()) or {}).get("selections") or [])
    names = [e.get("name") for e in entries]
    if args.name in names:
        cfg, position = entries[names.index(args.name)], names.index(args.name) + 1
    else:
        cfg = {"name": args.name, "modalities": args.modalities or [], "datasets": args.datasets or [],
               "max_quality_score": args.max_quality_score, "keep_unscored": not args.drop_unscored}
        position = len(entries) + 1
    out = Path(args.out_dir or f"results/selections/{args.name}")
    chosen = run_selection(cfg, position, args.index, args.manifests, out / "pretrain_data.json",
                           out / PREPROCESSED_TWIN, out / "images.tsv", args.quality,
                           excluded_subjects=downstream_test_subjects(args.registry))
    print(f"{len(chosen)} image(s) -> {out}")
    return 0
