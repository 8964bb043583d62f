"""Preprocessing throughput per CPU core: images/s on demo-sized and 256^3 volumes.

One process, one thread (BLAS/OpenMP pinned to 1), so the figure is per core; a shard job is
one such process and Snakemake runs one per core. Times are CPU seconds of this process
(`time.process_time`), which other load on a shared machine inflates less than wall time.
Each case is a real head (nilearn's MNI152 template, shipped with the package) with noise
everywhere, as scans without a zero background have it (no cropping: the worst case), written
to a NIfTI and preprocessed to 1 mm (or `--spacing`) into the blosc2 store with the default
settings.

    python benchmarks/preprocess.py [--repeats 3] [--spacing 1 1 1] [--index results/index/images.parquet]

With `--index`, the demo index's own images are timed too (the demo case).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib import resources  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from openmind_bench.preprocess.image import PreprocessSettings, preprocess_image  # noqa: E402
from openmind_bench.store.files import image_files, write_image  # noqa: E402

TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def head(shape, spacing, seed=0) -> nib.Nifti1Image:
    """The MNI head resampled to `shape` voxels of `spacing` mm (LPS-stored), with noise."""
    template = nib.load(str(resources.files("nilearn.datasets") / "data" / TEMPLATE))
    data = np.asarray(template.dataobj, np.float32)
    extent = np.asarray(shape) * np.asarray(spacing)
    factors = extent / np.asarray(data.shape)  # template is 1 mm; fit its field of view to ours
    zoomed = ndimage.zoom(data, np.asarray(shape) / np.asarray(data.shape) * np.minimum(1, factors.min() / factors),
                          order=1)
    out = np.zeros(shape, np.float32)
    lo = (np.asarray(shape) - zoomed.shape) // 2
    out[tuple(slice(l, l + s) for l, s in zip(lo, zoomed.shape))] = zoomed[tuple(slice(0, s) for s in shape)]
    rng = np.random.default_rng(seed)
    out = np.abs(out + rng.normal(0, 4.0, shape)).astype(np.float32)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    return nib.Nifti1Image(out, affine)


def time_case(path: Path, settings: PreprocessSettings, out_root: Path, repeats: int) -> dict:
    pre, write = [], []
    for r in range(repeats):
        t0 = time.process_time()
        result = preprocess_image(path, settings, image_id=f"bench_{r}")
        t1 = time.process_time()
        files = image_files(out_root, "ds000000", "01", "", f"{path.stem}_{r}")
        write_image(files, result.image, result.anon, result.anat, result.properties, result.nnssl_properties,
                    settings.store)
        t2 = time.process_time()
        pre.append(t1 - t0)
        write.append(t2 - t1)
    size = sum(f.stat().st_size for f in files.stem.parent.glob(files.stem.name + "*"))
    return {"in": "x".join(map(str, nib.load(str(path)).shape)), "out": "x".join(map(str, result.properties["shape"])),
            "pre": float(np.median(pre)), "write": float(np.median(write)), "mb": size / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    parser.add_argument("--index", help="also time the images of this index (e.g. the demo's)")
    args = parser.parse_args()
    settings = PreprocessSettings(spacing=tuple(args.spacing))
    cases = {
        "demo-sized (2 mm, 110x130x120)": ((110, 130, 120), (2.0, 2.0, 2.0)),
        "demo-sized anisotropic (2x2x3.5 mm, 105x130x70)": ((105, 130, 70), (2.0, 2.0, 3.5)),
        "256^3 (1 mm)": ((256, 256, 256), (1.0, 1.0, 1.0)),
        "256^3 (0.9x0.9x1.2 mm)": ((256, 256, 256), (0.9, 0.9, 1.2)),
    }
    print(f"preprocessing to {args.spacing} mm, one thread, median of {args.repeats}")
    print(f"{'case':48s} {'input':>12s} {'output':>12s} {'pipeline s':>10s} {'write s':>8s} "
          f"{'images/s':>9s} {'MB':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for name, (shape, spacing) in cases.items():
            path = tmp / f"{name.split()[0].replace('^', '')}_{len(rows)}.nii.gz"
            nib.save(head(shape, spacing), str(path))
            rows.append((name, time_case(path, settings, tmp / "store", args.repeats)))
        if args.index:
            import pandas as pd

            index = pd.read_parquet(args.index)
            index = index[index.n_volumes <= 1]
            total = []
            for row in index.itertuples():
                t0 = time.process_time()
                result = preprocess_image(row.path, settings, image_id=row.image_id)
                files = image_files(tmp / "store", row.dataset, row.subject, row.session, row.image_id)
                write_image(files, result.image, result.anon, result.anat, result.properties,
                            result.nnssl_properties, settings.store)
                total.append(time.process_time() - t0)
            print(f"demo index {args.index}: {len(total)} images in {sum(total):.1f} CPU s "
                  f"({len(total) / sum(total):.2f} images/s on one core)")
        for name, r in rows:
            total = r["pre"] + r["write"]
            print(f"{name:48s} {r['in']:>12s} {r['out']:>12s} {r['pre']:10.2f} {r['write']:8.2f} {1 / total:9.2f} "
                  f"{r['mb']:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
