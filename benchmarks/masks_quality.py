"""Throughput of the masks stage (classical backend) and of the quality metrics, images/s per core.

    PYTHONPATH=src python benchmarks/masks_quality.py [--sizes demo 256] [--repeats 2] [--no-inu]

"demo": a defaced, noisy MNI152 head at the demo's grid (2 mm, about 100^3 voxels); "256": the
same head resampled to 256^3 (1 mm-like full-size scans). One thread (OMP/torch/ITK), so the
figures are per core.
"""

from __future__ import annotations

import argparse
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ.setdefault(var, "1")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from openmind_bench import config as cfg  # noqa: E402
from openmind_bench.masks.classical import ClassicalSettings, compute_masks  # noqa: E402
from openmind_bench.quality.iqms import compute_iqms  # noqa: E402
from openmind_bench.quality.score import image_score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def head(size: str) -> tuple[np.ndarray, np.ndarray]:
    from nilearn import datasets

    tpl = datasets.load_mni152_template(resolution=2)
    data = np.asarray(tpl.dataobj, np.float32)
    affine = tpl.affine.copy()
    if size != "demo":
        n = int(size)
        zoom = [n / s for s in data.shape]
        data = ndi.zoom(data, zoom, order=1)
        affine[:3, :3] = affine[:3, :3] / np.asarray(zoom)
    data /= data.max()
    rng = np.random.default_rng(0)
    data = np.sqrt((data + rng.normal(0, 0.02, data.shape)) ** 2 + rng.normal(0, 0.02, data.shape) ** 2)
    ijk = np.indices(data.shape).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape((3,) + data.shape)
    data[(data > 0.1) & (xyz[1] > 20) & (xyz[2] < 0)] = 0.0  # defaced
    return data.astype(np.float32), affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["demo", "256"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-inu", action="store_true", help="leave out the N4 bias-field metric")
    args = parser.parse_args()
    config = cfg.validate({}, REPO / "config" / "schema.yaml")
    classical = ClassicalSettings.from_config(config["masks"]["classical"])
    refs = config["quality"]["references"]
    print(f"{'size':>6} {'voxels':>11} {'masks s/img':>12} {'masks img/s':>12} {'metrics s/img':>14} "
          f"{'metrics img/s':>14}  (1 core)")
    for size in args.sizes:
        data, affine = head(size)
        t_masks, t_metrics = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            masks = compute_masks(data, affine, classical)
            t1 = time.perf_counter()
            image_score(compute_iqms(data, masks.anat, masks.anon, inu=not args.no_inu), refs)
            t2 = time.perf_counter()
            t_masks.append(t1 - t0)
            t_metrics.append(t2 - t1)
        m, q = min(t_masks), min(t_metrics)
        print(f"{size:>6} {data.size:>11,d} {m:>12.2f} {1 / m:>12.3f} {q:>14.2f} {1 / q:>14.3f}")


if __name__ == "__main__":
    main()
