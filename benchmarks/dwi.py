"""Time the DWI stage's two backends on the same scan, step by step, and print the ratio.

    PYTHONPATH=src python benchmarks/dwi.py                          # dipy's real small_64D (10^3 x 65)
    PYTHONPATH=src python benchmarks/dwi.py --shape 96 96 8 --directions 100 --backends dipy --memory
    PYTHONPATH=src python benchmarks/dwi.py --nifti scan.nii.gz --bval scan.bval --bvec scan.bvec

Each backend runs `derive_scan` with the same settings (config/schema.yaml defaults, overridable
with --set key=value); motion (dipy) and N4 (SimpleITK) are shared steps and time the same code.
With --memory the peak resident memory (getrusage) of the process and of its largest child (an
MRtrix3 command) is printed; run one backend per call. It grows linearly with the voxel count, so
two slabs of a 2 mm whole-brain grid give the whole scan's need by extrapolation (README).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from openmind_bench import config  # noqa: E402
from openmind_bench.dwi.derive import STEPS, DwiSettings, derive_scan  # noqa: E402


def synthetic(shape, n_dirs, out: Path, seed=0):
    """A noisy two-compartment phantom on a 2 mm oblique grid: b0 + n_dirs directions at b = 1000."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n_dirs, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0.0, np.full(n_dirs, 1000.0)]
    bvecs = np.vstack([[0, 0, 0], g])
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (x**2 + y**2 + (z * 0.8) ** 2) < 0.8
    theta = np.arctan2(y, x)
    fibre = np.stack([np.cos(theta), np.sin(theta), 0.2 * np.ones_like(x)], -1)
    fibre /= np.linalg.norm(fibre, axis=-1, keepdims=True)
    proj = np.einsum("xyzi,ni->xyzn", fibre, g) ** 2
    adc = 0.3e-3 + 1.4e-3 * proj
    signal = np.concatenate([np.ones(shape + (1,)), np.exp(-1000.0 * adc)], -1) * (800 * brain[..., None] + 20)
    signal = np.abs(signal + rng.normal(0, 15, signal.shape) + 1j * rng.normal(0, 15, signal.shape))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = out / "scan.nii.gz", out / "scan.bval", out / "scan.bvec"
    nib.save(nib.Nifti1Image(signal.astype(np.float32), affine), str(paths[0]))
    np.savetxt(paths[1], bvals[None], fmt="%g")
    np.savetxt(paths[2], bvecs.T, fmt="%.6f")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="small_64D", help="a dipy data set that ships offline")
    p.add_argument("--nifti"), p.add_argument("--bval"), p.add_argument("--bvec")
    p.add_argument("--shape", type=int, nargs=3, help="synthetic phantom of this shape (2 mm voxels)")
    p.add_argument("--directions", type=int, default=64, help="directions of the synthetic phantom")
    p.add_argument("--backends", nargs="+", default=["dipy", "mrtrix3"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dwi config overrides (YAML values)")
    p.add_argument("--memory", action="store_true", help="also print the peak resident memory (run one backend)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    work = Path(tempfile.mkdtemp(prefix="dwi-bench-"))
    if args.nifti:
        scan, bval, bvec = args.nifti, args.bval, args.bvec
        label = Path(args.nifti).name
    elif args.shape:
        scan, bval, bvec = synthetic(tuple(args.shape), args.directions, work)
        label = f"synthetic {'x'.join(map(str, args.shape))} x {args.directions + 1} (2 mm)"
    else:
        from dipy.data import get_fnames

        scan, bval, bvec = get_fnames(name=args.dataset)
        label = f"dipy {args.dataset}"
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = config.validate({"dwi": dict(overrides)}, REPO / "config" / "schema.yaml")["dwi"]
    shape = nib.load(str(scan)).shape
    print(f"scan: {label}, shape {shape}; settings: {overrides or 'defaults'}")

    seconds = {}
    for backend in args.backends:
        settings = DwiSettings.from_config(dict(cfg, backend=backend))
        t0 = time.perf_counter()
        result = derive_scan(scan, bval, bvec, settings, scratch=work)
        total = time.perf_counter() - t0
        seconds[backend] = {s["step"]: (s["seconds"], s["outcome"]) for s in result.status}
        seconds[backend]["total"] = (total, "done")
        fa = result.fa[result.mask] if result.fa is not None else np.array([np.nan])
        print(f"{backend}: mask {int(result.mask.sum())} voxels, median FA {np.median(fa):.3f}; notes: {result.notes}")

    head = f"{'step':<10}" + "".join(f"{b:>12}" for b in args.backends)
    ratio = len(args.backends) == 2
    print(head + (f"{'ratio':>9}" if ratio else ""))
    for step in (*STEPS, "total"):
        cells = [seconds[b].get(step, (float("nan"), "")) for b in args.backends]
        line = f"{step:<10}" + "".join(f"{s:>11.2f}s" if o == "done" else f"{'skip':>12}" for s, o in cells)
        if ratio and all(o == "done" for _, o in cells) and cells[1][0] > 0:
            line += f"{cells[0][0] / cells[1][0]:>8.2f}x"
        print(line)
    if args.memory:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"peak RSS: this process {own:.0f} MiB, largest child (MRtrix3 command) {children:.0f} MiB; "
              f"{int(np.prod(shape))} voxel-volumes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
