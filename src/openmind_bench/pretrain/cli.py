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

    raw = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
    section = config.deep_update(raw.get("pretrain", {}) or {}, config.parse_overrides(args.set))
    settings = run_settings.resolve(section, args.method, args.arch, out_dir=args.out, train_data=args.train_data,
                                    val_data=args.val_data, selection=args.selection,
                                    probe=_probe(raw, section) if section.get("probe_every") else None)
    return launch(settings, nproc=args.nproc, threads=args.threads)


def _probe(raw: dict, section: dict) -> dict | None:
    """The probes of `pretrain.probe_every` from the whole config (registry, splits: each made once
    where missing, as rule downstream_split)."""
    from openmind_bench import config
    from openmind_bench.downstream import probes, splits
    from openmind_bench.downstream.settings import split_settings

    from openmind_bench.downstream.settings import cached_registry

    full = config.validate(config.deep_update(raw, {"pretrain": section}), config.SCHEMA_PATH)
    probe = probes.training_probe_config(full)
    for dataset in probe["datasets"]:
        role = cached_registry(full).get(dataset["name"]).role
        splits.split_dataset(probe["registry"], probe["root"], dataset["name"],
                             splits.SplitSettings(**split_settings(full, role)), split_out=dataset["split"])
    return probe
