"""`openmind-bench check-checkpoint` and `export-checkpoint`: the check of a pre-training checkpoint
before fine-tuning, and the export of our runs in the published repository layout."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("check-checkpoint",
                       help="load a pre-training checkpoint on CPU and try its transfer into fine-tuning networks")
    p.add_argument("path", help="a checkpoint file (ours, nnssl's), a published repository folder, or a source "
                                "to fetch first: hf://org/repo[@revision][/file] or https://... (with --sha256)")
    p.add_argument("--revision", help="hf:// only: branch, tag or commit")
    p.add_argument("--sha256", help="expected sha256 of the checkpoint file (required for https://)")
    p.add_argument("--cache-dir", help="hf:// only: the Hugging Face cache folder (default: the standard one)")
    p.add_argument("--offline", action="store_true", help="hf:// only: read the cache only (as HF_HUB_OFFLINE=1)")
    p.add_argument("--fetch-dir", help="where a fetched source is kept (default: a temporary folder, removed after)")
    p.add_argument("--architecture", help="preset name, for checkpoints without an adaptation plan (nnssl Spark)")
    p.add_argument("--channels", type=int, nargs="+", default=[1],
                   help="input channel counts of the fine-tuning networks (the registry's modality counts)")
    p.add_argument("--patch-size", type=int, nargs=3, help="fine-tuning patch (default: the plan's recommended one)")
    p.add_argument("--out", default="check.json", help="the report (JSON)")
    p.set_defaults(func=run_check)

    p = sub.add_parser("export-checkpoint", help="write a pre-training run in the published repository layout")
    p.add_argument("run_dir", help="results/pretrain/{run}/ (holding checkpoint_final.pt)")
    p.add_argument("out_dir", help="the folder to write (for huggingface_hub.upload_folder)")
    p.add_argument("--results", help="the benchmark's results_long.csv (default: results/benchmark/ of the run's tree)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=run_export)


def run_check(args) -> int:
    import tempfile

    from openmind_bench.checkpoints.check import check_checkpoint, write_report

    with tempfile.TemporaryDirectory(prefix="check-checkpoint-") as tmp:
        path = _fetched(args, tmp) if args.path.startswith(("hf://", "https://", "http://")) else args.path
        report = check_checkpoint(path, architecture=args.architecture, channel_counts=args.channels,
                                  patch_size=args.patch_size)
        report["source"] = args.path
    write_report(report, args.out)
    arch = report["architecture"]
    moved = ", ".join(f"{t['input_channels']} ch: {t['moved']} moved / {t['left_new']} new"
                      for t in report["transfers"])
    print(f"{args.path}: {arch['class']} ({arch['family']}), {report['parameters']:,} parameters; {moved} "
          f"-> {args.out}")
    return 0


def _fetched(args, tmp: str):
    """A remote source fetched as the workflow's fetch does (same checks: sha256, offline cache),
    into --fetch-dir or a temporary folder; returns the checkpoint file."""
    from pathlib import Path

    from openmind_bench.checkpoints.evaluate import default_name
    from openmind_bench.checkpoints.settings import fetched_path
    from openmind_bench.checkpoints.sources import fetch_checkpoint

    name = default_name(args.path)
    dest = Path(args.fetch_dir) if args.fetch_dir else Path(tmp) / name
    fetch_checkpoint(name, args.path, dest, revision=args.revision, sha256=args.sha256, cache_dir=args.cache_dir,
                     offline=args.offline)
    return fetched_path(dest)


def run_export(args) -> int:
    from openmind_bench.checkpoints.export import export_checkpoint

    out = export_checkpoint(args.run_dir, args.out_dir, results_long=args.results, overwrite=args.overwrite)
    print(f"{args.run_dir} -> {out}")
    return 0
