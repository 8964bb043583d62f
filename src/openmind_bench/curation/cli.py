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
    p.add_argument("--leakage", help="results/curation/leakage.tsv: its images are never selected")
    p.add_argument("--duplicates", help="results/curation/duplicates.parquet (needed by dedup: true)")
    p.add_argument("--unfingerprinted", nargs="*", default=[],
                   help="rejection parts of the fingerprint jobs (results/qc/parts/curation/DS/K.tsv): never selected")
    p.add_argument("--out-dir", help="default: results/selections/NAME")
    p.set_defaults(func=run)

    f = sub.add_parser("fingerprint", help="fingerprint the images of one preprocessing shard (curation)")
    f.add_argument("manifest", help="preprocessing shard manifest (results/preprocessed/DS/shard-K.tsv)")
    f.add_argument("--out", required=True, help="fingerprint table to write (parquet)")
    f.add_argument("--rejected", required=True, help="rejection part to write (stage curation)")
    f.set_defaults(func=run_fingerprint)

    d = sub.add_parser("duplicates", help="near-duplicate clusters of fingerprint tables (curation)")
    d.add_argument("tables", nargs="+", help="fingerprint tables")
    d.add_argument("--out", default="results/curation/duplicates.parquet")
    d.add_argument("--config", help="YAML config whose `curation` section to use (default: the schema's)")
    d.set_defaults(func=run_duplicates)

    k = sub.add_parser("leakage", help="pre-training images that are copies of downstream test cases (curation)")
    k.add_argument("tables", nargs="+", help="fingerprint tables of the pre-training images")
    k.add_argument("--downstream", nargs="+", required=True, help="fingerprint tables of downstream test cases")
    k.add_argument("--out", default="results/curation/leakage.tsv")
    k.add_argument("--config", help="YAML config whose `curation` section to use (default: the schema's)")
    k.set_defaults(func=run_leakage)


def _curation(path) -> dict:
    from pathlib import Path

    import yaml

    from openmind_bench import config

    values = (yaml.safe_load(Path(path).read_text()) or {}).get("curation") if path else None
    return config.section("curation", values)


def run_fingerprint(args) -> int:
    from openmind_bench.curation.fingerprint import FingerprintSettings
    from openmind_bench.curation.fingerprints import run_fingerprint_shard

    table = run_fingerprint_shard(args.manifest, args.out, args.rejected, FingerprintSettings())
    print(f"{len(table)} fingerprint(s) -> {args.out}")
    return 0


def run_duplicates(args) -> int:
    from openmind_bench.curation.content import run_duplicates as find

    c = _curation(args.config)
    clusters = find(args.tables, args.out, c["duplicate_distance"], c["neighbours"], c["threads"])
    print(f"{len(clusters)} image(s) in {clusters.cluster.nunique()} cluster(s) -> {args.out}")
    return 0


def run_leakage(args) -> int:
    from openmind_bench.curation.content import run_leakage as find

    c = _curation(args.config)
    pairs = find(args.tables, args.downstream, args.out, c["leakage_distance"], c["neighbours"], c["threads"])
    print(f"{pairs.image_id.nunique()} pre-training image(s) leak into downstream test cases -> {args.out}")
    return 0


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
                           excluded_subjects=downstream_test_subjects(args.registry), leakage=args.leakage,
                           duplicates=args.duplicates, fingerprint_rejections=args.unfingerprinted,
                           out_dropped=out / "dropped.tsv",
                           out_summary=out / "summary.json", out_plot=out / "summary.png")
    print(f"{len(chosen)} image(s) -> {out}")
    return 0
