"""Throughput of the `openneuro` source against a local S3 server (moto, in its own process).

Uploads two synthetic datasets into moto (many small files like sidecars and small images; a
few large ones like DWI series, fetched in parallel ranges), then fetches each with 1 and with N
parallel transfers into a fresh folder, and once more into the complete folder (the resume check
that finds nothing to fetch). Prints files/s and MB/s. The figures are bounded by moto (a Python
server sharing the machine's cores with the client), so they measure the client's overhead and
how it scales with concurrency, not what S3 itself delivers.

    python benchmarks/download.py [--small-files 400] [--small-kb 64] [--large-files 3]
                                  [--large-mb 96] [--concurrency 1 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from openmind_bench.qc import Rejections
from openmind_bench.sources import openneuro, s3_mirror

MB = 1024 * 1024
BUCKET = "openneuro-bench"


def write_dataset(root: Path, dataset: str, n_files: int, size: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    ds = root / dataset
    (ds / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (ds / "dataset_description.json").write_text(json.dumps({"Name": dataset, "BIDSVersion": "1.8.0"}))
    for i in range(n_files):
        path = ds / f"sub-{i:04d}" / "anat" / f"sub-{i:04d}_T1w.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return n_files * size


def fetch_once(endpoint: str, dataset: str, dest: Path, concurrency: int) -> tuple[float, int, int]:
    options = {"endpoint_url": endpoint, "bucket": BUCKET, "max_concurrency": concurrency,
               "include": ["*"], "exclude": []}
    start = time.perf_counter()
    manifest = openneuro.fetch(dataset, "1.0.0", dest, options, Rejections("fetch"))
    seconds = time.perf_counter() - start
    if manifest.failed or manifest.refused:
        raise RuntimeError(f"benchmark fetch had failures: {manifest.failed or manifest.refused}")
    return seconds, len(manifest.files), sum(f.size for f in manifest.files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-files", type=int, default=400)
    parser.add_argument("--small-kb", type=int, default=64)
    parser.add_argument("--large-files", type=int, default=3)
    parser.add_argument("--large-mb", type=int, default=96)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mirror = tmp / "mirror"
        write_dataset(mirror, "ds000001", args.small_files, args.small_kb * 1024, seed=1)
        write_dataset(mirror, "ds000002", args.large_files, args.large_mb * MB, seed=2)
        proc, endpoint = s3_mirror.start_moto(log_path=tmp / "moto.log")
        try:
            t0 = time.perf_counter()
            s3_mirror.upload_tree(mirror, endpoint, bucket=BUCKET)
            print(f"moto at {endpoint}; upload took {time.perf_counter() - t0:.1f} s")
            shutil.rmtree(mirror)
            cases = [("ds000001", f"{args.small_files} x {args.small_kb} KiB"),
                     ("ds000002", f"{args.large_files} x {args.large_mb} MiB")]
            print(f"{'dataset':<22} {'transfers':>9} {'run':<8} {'files':>6} {'MB':>8} {'s':>7} {'files/s':>8} {'MB/s':>7}")
            for dataset, label in cases:
                for n in args.concurrency:
                    dest = tmp / f"{dataset}-{n}"
                    for run in ("fresh", "resume"):
                        seconds, files, size = fetch_once(endpoint, dataset, dest, n)
                        print(f"{label:<22} {n:>9} {run:<8} {files:>6} {size / MB:>8.1f} {seconds:>7.2f} "
                              f"{files / seconds:>8.1f} {size / MB / seconds:>7.1f}", flush=True)
                    shutil.rmtree(dest)
        finally:
            s3_mirror.stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
