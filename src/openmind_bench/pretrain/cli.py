"""`openmind-bench pretrain`: one method x architecture pre-training run under torchrun."""

from __future__ import annotations

def register(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pre-training of one method on one architecture")
    p.add_argument("--method", required=True, help="e.g. mae, spark3d, simmim, models_genesis, spark3d_anon")
    p.add_argument("--arch", required=True, help="architecture preset, e.g. ResEncL, PrimusM, ResEncTiny")
    p.add_argument("--train-data", required=True, help="preprocessed pretrain_data json (training subjects)")
    p.add_argument("--val-data", help="preprocessed json of the held-out subjects (validation loss)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, progress.csv, tensorboard/)")
    p.add_argument("--config", help="a workflow config YAML; its `pretrain` section is used")
    p.add_argument("--selection", default="", help="data selection name, recorded in the adaptation plan")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs); 1 on a CPU")
    p.add_argument("--threads", type=int, default=0, help="CPU threads in all (0: torch's default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override pretrain settings, e.g. epochs=2 optimisation.transformer.warmup_epochs=1")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import yaml

    from openmind_bench import config
    from openmind_bench.pretrain import settings as run_settings
    from openmind_bench.pretrain.worker import launch

    section: dict = {}
    if args.config:
        section = (yaml.safe_load(Path(args.config).read_text()) or {}).get("pretrain", {}) or {}
    section = config.deep_update(section, config.parse_overrides(args.set))
    settings = run_settings.resolve(section, args.method, args.arch, out_dir=args.out, train_data=args.train_data,
                                    val_data=args.val_data, selection=args.selection)
    return launch(settings, nproc=args.nproc, threads=args.threads)
