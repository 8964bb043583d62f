"""Random 160^3 patch reads: the blosc2 store against decompressing a .nii.gz (target >= 5x).

A 1 mm head volume (nilearn's MNI152 template padded to a typical field of view, noise
everywhere, z-scored: what preprocessing writes) is stored as .b2nd with the default layout and
as a float32 .nii.gz. Each read picks a random 160^3 box (patch sampling reaches past the
borders too, so boxes may stick out and get padded) and times open + read, one thread. A
.nii.gz has to be decompressed up to the box's last voxel whatever the box, which is the point.

    python benchmarks/patch_reads.py [--reads 20] [--patch 160] [--sweep]

`--sweep` also times other chunk/block shapes and codecs (what the defaults were chosen from), and
nnU-Net 2.8.1's own case layout (`nnUNetDatasetBlosc2.save_case`: LZ4HC level 5, blocks and chunks
from its `comp_blosc2_params` for a 160^3 patch, i.e. 32^3 blocks and chunks of about 1.5 patch
sides, and the smaller of NOFILTER / SHUFFLE on a centre slab).
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

import blosc2  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from openmind_bench.store.b2nd import StoreSettings, open_array, read_region, write_array  # noqa: E402

TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def head_volume(seed: int = 0) -> np.ndarray:
    data = np.asarray(nib.load(str(resources.files("nilearn.datasets") / "data" / TEMPLATE)).dataobj, np.float32)
    data = np.pad(data, ((14, 14), (12, 12), (20, 20)))  # ~225x257x229: a head scan's field of view at 1 mm
    rng = np.random.default_rng(seed)
    data = np.abs(data + rng.normal(0, 4.0, data.shape)).astype(np.float32)
    return (data - data.mean()) / data.std()


def boxes(shape, patch, n, seed=1):
    rng = np.random.default_rng(seed)
    return [[int(rng.integers(-patch // 4, s - patch + patch // 4 + 1)) for s in shape] for _ in range(n)]


def time_store(path: Path, shape, patch, lowers) -> list[float]:
    out = []
    for lower in lowers:
        t0 = time.perf_counter()
        read_region(open_array(path), lower, (patch,) * 3)
        out.append(time.perf_counter() - t0)
    return out


def time_nifti(path: Path, patch, lowers) -> list[float]:
    out = []
    for lower in lowers:
        t0 = time.perf_counter()
        read_region(np.asarray(nib.load(str(path)).dataobj), lower, (patch,) * 3)
        out.append(time.perf_counter() - t0)
    return out


def write_nnunet_layout(path: Path, volume: np.ndarray, patch: int) -> str:
    """The array as nnU-Net 2.8.1 writes a case (its own functions, so the layout is exactly its)."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    data = np.ascontiguousarray(volume[None])
    blocks, chunks = comp_blosc2_params(data.shape, (patch,) * 3, data.itemsize)
    codec, clevel = blosc2.Codec.LZ4HC, 5
    flt = nnUNetDatasetBlosc2._select_filter(data, blocks, chunks, codec, clevel)
    cparams = {"codec": codec, "filters": [flt], "nthreads": 1, "clevel": clevel}
    if path.exists():
        path.unlink()
    blosc2.asarray(data, urlpath=str(path), chunks=chunks, blocks=blocks, cparams=cparams)
    shapes = f"chunks {'x'.join(map(str, chunks[1:]))} blocks {'x'.join(map(str, blocks[1:]))}"
    return f"nnU-Net 2.8.1 lz4hc L5 {shapes} {flt.name}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20)
    parser.add_argument("--patch", type=int, default=160)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    blosc2.set_nthreads(1)
    volume = head_volume()
    lowers = boxes(volume.shape, args.patch, args.reads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nifti = tmp / "head.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(nifti))
        time_nifti(nifti, args.patch, lowers[:1])  # warm the page cache for both formats alike
        nii = np.median(time_nifti(nifti, args.patch, lowers))
        settings = [("default", StoreSettings())]
        if args.sweep:
            settings += [
                (f"{c} L{l} chunks {ch} blocks {bl}",
                 StoreSettings(codec=c, clevel=l, chunk_shape=(ch,) * 3, block_shape=(bl,) * 3))
                for c, l in (("zstd", 3), ("zstd", 8), ("lz4", 5), ("lz4hc", 5))
                for ch, bl in ((64, 32), (64, 16), (128, 32), (96, 32), (160, 32))
            ]
        print(f"volume {'x'.join(map(str, volume.shape))} float32 ({volume.nbytes / 1e6:.0f} MB), {args.reads} random "
              f"{args.patch}^3 reads, one thread, median")
        print(f"  .nii.gz (nibabel, gzip level 1)      {os.path.getsize(nifti) / 1e6:7.1f} MB  "
              f"{nii * 1e3:8.1f} ms/patch")
        if args.sweep:
            settings.append(("nnunet", None))
        for name, s in settings:
            path = tmp / "head.b2nd"
            t0 = time.perf_counter()
            if s is None:
                name = write_nnunet_layout(path, volume, args.patch)
            else:
                write_array(path, volume[None], s)
            write = time.perf_counter() - t0
            time_store(path, volume.shape, args.patch, lowers[:1])
            b2 = np.median(time_store(path, volume.shape, args.patch, lowers))
            print(f"  .b2nd {name:40s} {os.path.getsize(path) / 1e6:7.1f} MB  {b2 * 1e3:8.1f} ms/patch  "
                  f"{nii / b2:5.1f}x faster  (write {write:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
