"""`openmind-bench finetune`: fine-tune one checkpoint (or a from-scratch network) on one downstream
dataset and fold, and score it."""

from __future__ import annotations

import yaml


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune and evaluate one run on one downstream dataset and fold")
    p.add_argument("--dataset", required=True, help="registry name, e.g. ATL or DemoLesionT1")
    p.add_argument("--run", required=True,
                   help="{method}__{arch}__{selection}__{schedule}__{epochs} or scratch__{arch}__{epochs} "
                        "(append __n{N} for a low-data run)")
    p.add_argument("--fold", default="test", help="'test' (the fixed split) or a fold number (development sets)")
    p.add_argument("--checkpoint", help="pre-training checkpoint (ours or nnssl's); required unless scratch")
    p.add_argument("--split", required=True, help="split JSON; made and written once if it does not exist")
    p.add_argument("--out", required=True, help="run directory (metrics.json, predictions/, progress.csv)")
    p.add_argument("--config", help="a workflow config YAML (its finetune, downstream and pretrain sections)")
    p.add_argument("--registry", help="dataset registry YAML (default: config downstream_registry)")
    p.add_argument("--root", help="downstream data root (default: config downstream.root)")
    p.add_argument("--low-data-subset", help="JSON of the low-data subset (runs ending in __n{N})")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs); 1 on a CPU")
    p.add_argument("--threads", type=int, default=0, help="CPU threads in all (0: torch's default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override finetune settings, e.g. spacing=null sliding_window_overlap=0.25")
    p.add_argument("--steps-per-epoch", type=int, help="override downstream.steps_per_epoch")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from openmind_bench import config as omb_config
    from openmind_bench.downstream import settings as run_settings
    from openmind_bench.downstream import splits, worker
    from openmind_bench.registry import load_registry

    config = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
    overrides: dict = {"finetune": omb_config.parse_overrides(args.set), "downstream": {}}
    if args.registry:
        overrides["downstream_registry"] = args.registry
    if args.root:
        overrides["downstream"]["root"] = args.root
    if args.steps_per_epoch:
        overrides["downstream"]["steps_per_epoch"] = args.steps_per_epoch
    config = omb_config.validate(omb_config.deep_update(config, overrides), omb_config.SCHEMA_PATH)
    settings = run_settings.resolve(config, args.dataset, args.run, args.fold, out_dir=args.out, split=args.split,
                                    pretrained_checkpoint=args.checkpoint, low_data_subset=args.low_data_subset)
    spec = load_registry(settings.registry, settings.root).get(args.dataset)
    # as the split rule: broken files and label images with undeclared values stay out of a new split,
    # and the split records the files it was made on
    splits.split_dataset(settings.registry, settings.root, spec.name,
                         splits.SplitSettings(**run_settings.split_settings(config, spec.role)), split_out=args.split)
    return worker.launch(settings, nproc=args.nproc, threads=args.threads)
