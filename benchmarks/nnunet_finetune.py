"""nnU-Net fine-tuning speed and quality on the demo lesion set (sizes the demo's fine-tuning).

Builds the demo downstream sets in a temporary folder and runs the nnU-Net path
(`openmind_bench.downstream.nnunet`) for one scratch run, printing CPU seconds per training
iteration (nnU-Net's data loading, augmentation, forward / backward and optimiser step), wall time of
each step and the test DSC; `--steps 0` measures the iteration time only (no training run).

    python benchmarks/nnunet_finetune.py [--arch ResEncTiny] [--epochs 10] [--steps 25] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ResEncTiny")
    parser.add_argument("--dataset", default="DemoLesionT1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25, help="iterations per epoch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations of the speed probe")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from openmind_bench import config as omb_config
    from openmind_bench.demo.downstream import build_downstream
    from openmind_bench.downstream import settings as run_settings, splits
    from openmind_bench.downstream.nnunet import dataset as nndata, plans as nnplans, run as nnrun
    from openmind_bench.downstream.nnunet.trainer import nnUNetTrainer_OpenMind
    from openmind_bench.downstream.readers import case_table, read_dataset
    from openmind_bench.registry import load_registry

    torch.set_num_threads(args.threads)
    registry = REPO / "config" / "downstream_demo.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_downstream(root / "data", seed=0)
        spec = load_registry(registry, root / "data").get(args.dataset)
        data = read_dataset(spec)
        split_path = root / f"{args.dataset}.json"
        splits.ensure_split(split_path, case_table(data), args.dataset, spec.role,
                            splits.SplitSettings(folds=3 if spec.role == "dev" else 0, test_fraction=0.25))
        run = f"scratch__{args.arch}__{args.epochs}"
        config = {"downstream_registry": str(registry),
                  "downstream": {"root": str(root / "data"), "steps_per_epoch": max(1, args.steps),
                                 "nnunet": {"val_iterations_per_epoch": 1}},
                  "finetune": {"scratch_patch_size": [32, 32, 32], "spacing": [3.5, 3.5, 3.5],
                               "sliding_window_overlap": 0.25}}
        config["downstream"]["epochs"] = [args.epochs]
        config = omb_config.validate(config, omb_config.SCHEMA_PATH)
        out = root / "results" / "downstream" / args.dataset / run / "fold_test"
        s = run_settings.resolve(config, args.dataset, run, "test", out_dir=str(out), split=str(split_path))

        t0, c0 = time.time(), cpu_seconds()
        split = splits.read_split(split_path)
        prepared = nndata.prepare(data, split, out.parent.parent / nndata.DATA_DIR, spacing=[3.5] * 3,
                                  n_proc=args.threads)
        print(f"preprocessing: {time.time() - t0:.1f} s wall, {cpu_seconds() - c0:.1f} CPU s")

        # speed probe: nnU-Net's loader + train_step, no training run
        train, test = splits.partition(split, "test")
        plans = nnrun.build_plans(s, run_settings.parse_run(run), spec, prepared["default_plans"], train, test)
        dataset_json = json.loads((Path(prepared["raw"]) / prepared["dataset_name"] / "dataset.json").read_text())
        with nndata.environment(prepared["raw"], prepared["preprocessed"], root / "probe", args.threads):
            trainer = nnUNetTrainer_OpenMind({**plans, "continue_training": False}, nnplans.CONFIGURATION,
                                             nndata.nnunet_fold(split, "test"), dataset_json, torch.device("cpu"))
            trainer.on_train_start()
            trainer.on_train_epoch_start()
            for _ in range(3):
                trainer.train_step(next(trainer.dataloader_train))
            t0, c0 = time.time(), cpu_seconds()
            for _ in range(args.iterations):
                trainer.train_step(next(trainer.dataloader_train))
            wall, cpu = (time.time() - t0) / args.iterations, (cpu_seconds() - c0) / args.iterations
            trainer.on_train_end()
        print(f"{args.arch} patch 32^3 batch 2: {cpu:.3f} CPU s / iteration, {wall:.3f} s wall / iteration "
              f"({args.threads} thread(s), 1 augmentation worker)")
        if args.steps <= 0:
            return
        t0, c0 = time.time(), cpu_seconds()
        nnrun.finetune_segmentation(s, threads=args.threads)
        doc = json.loads((out / "metrics.json").read_text())
        print(f"run {run} x {args.steps} iterations: {time.time() - t0:.1f} s wall, {cpu_seconds() - c0:.1f} CPU s; "
              f"test DSC {doc['summary']['DSC']:.3f} (per class "
              f"{ {k: round(v['DSC'], 3) for k, v in doc['summary']['per_class'].items()} })")
        for row in doc["cases"]:  # per test case: which class fails (NaN: empty in reference and prediction)
            per = {k: (None if v["DSC"] is None else round(v["DSC"], 3)) for k, v in row["per_class"].items()}
            voxels = {k: v["tp"] + v["fn"] for k, v in row["per_class"].items()}
            print(f"  {row['case']}: DSC {per}, reference voxels {voxels}")


if __name__ == "__main__":
    main()
