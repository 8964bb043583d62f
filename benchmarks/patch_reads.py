"""Random 160^3 patch reads: our blosc2 store against nnU-Net 2.8.1's case layout, each read the way
its own code reads it, and against decompressing a .nii.gz (target >= 5x).

A 1 mm head volume (nilearn's MNI152 template padded to a typical field of view, noise
everywhere, z-scored: what preprocessing writes) is stored three ways:

- ours: `store.write_array` with the configured layout (`preprocess.store`), read by our loader's
  code, `store.open_array` + `store.read_region`, as `data.sampler` reads every patch;
- nnU-Net 2.8.1: written by its own `nnUNetDatasetBlosc2.save_case` (LZ4HC level 5, blocks and
  chunks from its `comp_blosc2_params` for the patch, its filter choice), read by its own
  `nnUNetDatasetBlosc2.load_case` (`blosc2.open(..., mmap_mode="r")` of the image and the
  segmentation, the properties pickle) + acvl_utils' `crop_and_pad_nd`, as its
  `nnUNetDataLoader.generate_train_batch` reads the image of a patch;
- a float32 .nii.gz (nibabel), first run only: it has to be decompressed up to the box's last
  voxel whatever the box, which is the point of the store.

Each run draws its own random 160^3 boxes (patch sampling reaches past the borders too, so boxes
may stick out and get padded) and reads every box from every layout in turn (the order rotating
from box to box), so the layouts share the machine's load; times are the median CPU time and
wall time of one read (open + read), one thread.

    python benchmarks/patch_reads.py [--reads 20] [--runs 3] [--patch 160] [--sweep]

`--sweep` adds other chunk/block shapes and codecs of our store, read by our reader (what the
defaults were chosen from).
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


def our_reader(path: Path, patch: int):
    """One patch as our loader reads it (`data.sampler`)."""
    def read(lower):
        return read_region(open_array(path), lower, (patch,) * 3)
    return read


def nifti_reader(path: Path, patch: int):
    def read(lower):
        return read_region(np.asarray(nib.load(str(path)).dataobj), lower, (patch,) * 3)
    return read


def write_nnunet_case(folder: Path, volume: np.ndarray, patch: int) -> tuple[str, str]:
    """The volume as nnU-Net 2.8.1 writes a case, by its own code; returns (identifier, description)."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    data = np.ascontiguousarray(volume[None])
    blocks, chunks = comp_blosc2_params(data.shape, (patch,) * 3, data.itemsize)
    seg = np.zeros(data.shape, dtype=np.int8)  # what its preprocessing writes without labels
    folder.mkdir(parents=True, exist_ok=True)
    nnUNetDatasetBlosc2.save_case(data, seg, {"shape_after_cropping_and_before_resampling": volume.shape},
                                  str(folder / "head"), chunks=chunks, blocks=blocks)
    flt = blosc2.open(str(folder / "head.b2nd")).schunk.cparams.filters[0]
    return "head", (f"lz4hc L5 chunks {'x'.join(map(str, chunks[1:]))} blocks {'x'.join(map(str, blocks[1:]))} "
                    f"{flt.name}")


def nnunet_reader(folder: Path, identifier: str, patch: int):
    """One patch as nnU-Net 2.8.1's data loader reads its image (`generate_train_batch`)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = nnUNetDatasetBlosc2(str(folder), identifiers=[identifier])

    def read(lower):
        data, _seg, _seg_prev, _properties = dataset.load_case(identifier)
        return crop_and_pad_nd(data, [[lo, lo + patch] for lo in lower], 0)
    return read


def timed_side_by_side(readers: dict, lowers) -> dict:
    """{name: (median CPU s, median wall s)} with every box read by every reader in turn."""
    names = list(readers)
    cpu, wall = {n: [] for n in names}, {n: [] for n in names}
    for i, lower in enumerate(lowers):
        for name in names[i % len(names):] + names[:i % len(names)]:
            c0, w0 = time.process_time(), time.perf_counter()
            readers[name](lower)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {n: (float(np.median(cpu[n])), float(np.median(wall[n]))) for n in names}


def check_same_patch(readers: dict, volume: np.ndarray, lower, patch: int) -> None:
    expected = read_region(volume, lower, (patch,) * 3)
    for name, read in readers.items():
        got = np.asarray(read(lower)).reshape(expected.shape)
        if not np.array_equal(got, expected):
            raise SystemExit(f"{name} read another patch than the volume's")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20, help="random boxes per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--patch", type=int, default=160)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    blosc2.set_nthreads(1)
    volume = head_volume()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes, readers = {}, {}
        stores = [("ours", StoreSettings())]
        if args.sweep:
            stores += [(f"ours {c} L{lv} chunks {ch} blocks {bl}",
                        StoreSettings(codec=c, clevel=lv, chunk_shape=(ch,) * 3, block_shape=(bl,) * 3))
                       for c, lv in (("zstd", 3), ("lz4", 5), ("lz4hc", 5))
                       for ch, bl in ((64, 32), (96, 32), (128, 32), (160, 32))]
        for i, (name, settings) in enumerate(stores):
            path = tmp / f"store{i}.b2nd"
            write_array(path, volume[None], settings)
            sizes[name] = os.path.getsize(path)
            readers[name] = our_reader(path, args.patch)
        identifier, description = write_nnunet_case(tmp / "nnunet", volume, args.patch)
        nnunet = f"nnU-Net 2.8.1 ({description})"
        sizes[nnunet] = os.path.getsize(tmp / "nnunet" / "head.b2nd")
        readers[nnunet] = nnunet_reader(tmp / "nnunet", identifier, args.patch)
        nifti = tmp / "head.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(nifti))
        check_same_patch(readers, volume, boxes(volume.shape, args.patch, 1, seed=99)[0], args.patch)
        # warm the page cache for every file alike
        for read in (*readers.values(), nifti_reader(nifti, args.patch)):
            read(boxes(volume.shape, args.patch, 1, seed=98)[0])

        default = StoreSettings()
        print(f"volume {'x'.join(map(str, volume.shape))} float32 ({volume.nbytes / 1e6:.0f} MB), {args.runs} runs of "
              f"{args.reads} random {args.patch}^3 reads, every box from every layout in turn, one thread; "
              f"median CPU-ms and wall-ms per patch; ours = {default.codec} L{default.clevel} chunks "
              f"{'x'.join(map(str, default.chunk_shape))} blocks {'x'.join(map(str, default.block_shape))}")
        results = []
        for run in range(args.runs):
            lowers = boxes(volume.shape, args.patch, args.reads, seed=run + 1)
            run_readers = dict(readers)
            if run == 0:
                run_readers[".nii.gz (nibabel, gzip level 1)"] = nifti_reader(nifti, args.patch)
                sizes[".nii.gz (nibabel, gzip level 1)"] = os.path.getsize(nifti)
            got = timed_side_by_side(run_readers, lowers)
            results.append(got)
            print(f"run {run + 1}")
            for name, (cpu, wall) in got.items():
                print(f"  {name:62s} {sizes[name] / 1e6:6.1f} MB  {cpu * 1e3:7.1f} CPU-ms  {wall * 1e3:7.1f} wall-ms")
            print(f"  ours / nnU-Net: {got['ours'][0] / got[nnunet][0]:.2f}x CPU, "
                  f"{got['ours'][1] / got[nnunet][1]:.2f}x wall")
        nii = results[0][".nii.gz (nibabel, gzip level 1)"]
        ours_ms = ", ".join(f"{r['ours'][0] * 1e3:.1f}" for r in results)
        nnunet_ms = ", ".join(f"{r[nnunet][0] * 1e3:.1f}" for r in results)
        print(f"over the runs: ours {ours_ms} CPU-ms, nnU-Net {nnunet_ms} CPU-ms; "
              f".nii.gz {nii[0] * 1e3:.0f} CPU-ms ({nii[0] / results[0]['ours'][0]:.1f}x ours)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
