"""`openmind-bench pretrain`: one method x architecture pre-training run under torchrun."""

from __future__ import annotations

import yaml


def _parse_set(items: list[str]) -> dict:
    """`key.sub=value` pairs (values as YAML) -> a nested dict."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is not of the form key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


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

    from openmind_bench.train import launch, settings as run_settings

    section: dict = {}
    if args.config:
        section = (yaml.safe_load(Path(args.config).read_text()) or {}).get("pretrain", {}) or {}
    section = run_settings.deep_update(section, _parse_set(args.set))
    settings = run_settings.resolve(section, args.method, args.arch, out_dir=args.out, train_data=args.train_data,
                                    val_data=args.val_data, selection=args.selection)
    return launch.launch(settings, nproc=args.nproc, threads=args.threads)
