"""`openmind-bench check-checkpoint` and `export-checkpoint`: the check of a pre-training checkpoint
before fine-tuning, and the export of our runs in the published repository layout."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("check-checkpoint",
                       help="load a pre-training checkpoint on CPU and try its transfer into fine-tuning networks")
    p.add_argument("path", help="a checkpoint file (ours, nnssl's) or a published repository folder")
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
    from openmind_bench.checkpoints.check import check_checkpoint, write_report

    report = check_checkpoint(args.path, architecture=args.architecture, channel_counts=args.channels,
                              patch_size=args.patch_size)
    write_report(report, args.out)
    arch = report["architecture"]
    moved = ", ".join(f"{t['input_channels']} ch: {t['moved']} moved / {t['left_new']} new"
                      for t in report["transfers"])
    print(f"{args.path}: {arch['class']} ({arch['family']}), {report['parameters']:,} parameters; {moved} "
          f"-> {args.out}")
    return 0


def run_export(args) -> int:
    from openmind_bench.checkpoints.export import export_checkpoint

    out = export_checkpoint(args.run_dir, args.out_dir, results_long=args.results, overwrite=args.overwrite)
    print(f"{args.run_dir} -> {out}")
    return 0
