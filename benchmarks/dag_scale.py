"""How long Snakemake takes to build the whole benchmark's DAG, and how many jobs it has.

Writes a synthetic dataset table of 800 datasets holding 114k images in total (sizes drawn
from a heavy-tailed distribution like OpenNeuro's) into a temporary work directory, then times
`snakemake -n all` on it. Target (issue 3): under 30 s and under 10k jobs.

Once every shard has run, `all` also reads every shard's table and looks for the per-image files it
lists that are gone (rules/common.smk, missing_per_image_files). `--finished-scan` times that part on
synthetic tables of the same size (one manifest and one mask table per shard, 5 store files and 2
masks per image; the files themselves are not created, each existence check is still made).

    python benchmarks/dag_scale.py [--datasets 800] [--images 114000] [--shard-size 200] [--finished-scan]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from openmind_bench.registry import load_registry

REPO = Path(__file__).resolve().parents[1]


def synthetic_table(path: Path, n_datasets: int, n_images: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(mean=0.0, sigma=1.5, size=n_datasets)
    counts = np.maximum(1, np.round(weights / weights.sum() * n_images)).astype(int)
    lines = ["dataset_id\tsnapshot\texpected_images"]
    lines += [f"ds{i + 1:06d}\t1.0.0\t{c}" for i, c in enumerate(counts)]
    path.write_text("\n".join(lines) + "\n")


def finished_scan(work: Path, table: Path, shard_size: int) -> tuple[int, int, float, float]:
    """Seconds `missing_outputs` of preprocessing and masks take over synthetic tables of every shard."""
    import pandas as pd

    from openmind_bench.masks.shard import missing_outputs as missing_masks
    from openmind_bench.preprocess.shard import MANIFEST_COLUMNS
    from openmind_bench.preprocess.shard import missing_outputs as missing_store

    manifests, mask_tables, n_images = [], [], 0
    for line in table.read_text().splitlines()[1:]:
        dataset, _, count = line.split("\t")
        count = int(count)
        n_shards = -(-count // shard_size)
        for k in range(n_shards):
            ids = [f"{dataset}__sub-{i:04d}_T1w" for i in range(k, count, n_shards)]
            n_images += len(ids)
            stems = [f"{work}/results/preprocessed/{dataset}/sub-{i}/ses-DEFAULT/{i}" for i in ids]
            manifest = pd.DataFrame({c: "" for c in MANIFEST_COLUMNS}, index=range(len(ids)))
            manifest["image_id"] = ids
            manifest["image"] = [s + ".b2nd" for s in stems]
            manifest["anon"] = [s + "__anon.b2nd" for s in stems]
            manifest["anat"] = [s + "__anat.b2nd" for s in stems]
            manifest["properties"] = [s + ".json" for s in stems]
            path = work / "results/preprocessed" / dataset / f"shard-{k}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            manifest.to_csv(path, sep="\t", index=False)
            manifests.append(path)
            masks = pd.DataFrame({"anat_mask": [f"{work}/results/masks/{dataset}/{i}_mask-anatomy.nii.gz" for i in ids],
                                  "anon_mask": [f"{work}/results/masks/{dataset}/{i}_mask-anonymization.nii.gz"
                                                for i in ids],
                                  "anatomy_source": "classical", "anonymization_source": "classical"})
            path = work / "results/masks" / dataset / f"shard-{k}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            masks.to_parquet(path, index=False)
            mask_tables.append(path)
    start = time.perf_counter()
    n_store = len(missing_store(manifests))
    store_seconds = time.perf_counter() - start
    start = time.perf_counter()
    n_masks = len(missing_masks(mask_tables))
    return n_images, n_store + n_masks, store_seconds, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=800)
    parser.add_argument("--images", type=int, default=114_000)
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--finished-scan", action="store_true",
                        help="also time reading every shard's table for deleted per-image files")
    args = parser.parse_args()

    snakemake = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(REPO / "config", work / "config")  # registries and tables the config names
        synthetic_table(work / "config" / "datasets.tsv", args.datasets, args.images)
        config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        config.update(datasets_table="config/datasets.tsv", shard_size=args.shard_size)
        (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
        # the workflow checks that every downstream dataset has its folder before it plans a job
        registry = work / config.get("downstream_registry", "config/downstream_datasets.yaml")
        for spec in load_registry(registry, work / "data" / "downstream").datasets.values():
            spec.source.mkdir(parents=True, exist_ok=True)
        cmd = [snakemake, "-s", str(REPO / "Snakefile"), "--directory", str(work), "-n", "all", "--quiet", "rules"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        total = re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, re.MULTILINE)
        jobs = int(total.group(1)) if total else -1
        stats = re.search(r"Job stats:\n(.*?)\n\n", proc.stdout + proc.stderr, re.DOTALL)
        table = [line.split("\t") for line in (work / "config" / "datasets.tsv").read_text().splitlines()[1:]]
        shards = sum(-(-int(n) // args.shard_size) for _, _, n in table)
        print(f"datasets={args.datasets} images={args.images} shard_size={args.shard_size} shards={shards}")
        print(stats.group(1) if stats else proc.stdout[-2000:])
        print(f"jobs={jobs} seconds={seconds:.1f} (targets: < 10000 jobs, < 30 s)")
        if args.finished_scan:
            images, files, store_s, masks_s = finished_scan(work, work / "config" / "datasets.tsv", args.shard_size)
            print(f"finished scan: {images} images, {files} files checked: manifests {store_s:.1f} s, "
                  f"mask tables {masks_s:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
