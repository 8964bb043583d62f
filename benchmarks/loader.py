"""Loader throughput: 160^3 patches/s with augmentation at 1, 2 and N DataLoader workers.

Builds a small store of 1 mm head volumes (nilearn's MNI152 template, noise everywhere,
z-scored, with an anatomy mask) and its pretrain_data twin in a temporary directory, or uses
`--selection` (a selection's pretrain_data.json). Then times `make_pretrain_loader` with the
nnssl augmentations (rotation/scaling with probability 0.2 each, mirroring) and without, after a
warm-up, for each worker count. First, in one process, the CPU seconds per patch (patches per
CPU-second is what one loader worker on one core feeds, and what other load on a shared machine
disturbs least); then wall-clock patches/s through the DataLoader. A GPU that trains S steps/s
on batch B needs about B * S / (patches per CPU-second) worker cores (`cpus_per_gpu`), plus one
for the training process.

    python benchmarks/loader.py [--patch 160] [--batch 2] [--batches 12] [--workers 0 1 2 4]

`--methods` instead reports, per pre-training method, views per CPU-second of one worker: the loader
at the method's own patch (SimCLR-like and VoCo: their region) with the method's loader
augmentation, plus the method's view construction where it runs on the CPU (the reconstruction
methods; the others build their views on the training device). Next to it: the steps/s one GPU
needs (`--throughput`, the JSON rows of benchmarks/pretrain_throughput.py --json, else the
`--steps-per-s` given) and the headroom (cpus_per_gpu - 1 workers' views/s over batch x steps/s;
the goal is >= 2).

    python benchmarks/loader.py --methods [--throughput gpu.json] [--cpus-per-gpu 8] [--batch 2]
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
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from openmind_bench import atomic  # noqa: E402
from openmind_bench.curation.pretrain_data import PREPROCESSED_TWIN, build_collection  # noqa: E402
from openmind_bench.data import make_pretrain_loader  # noqa: E402
from openmind_bench.store import StoreSettings, image_files, write_image  # noqa: E402

TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def build_store(root: Path, n_images: int) -> Path:
    template = np.asarray(nib.load(str(resources.files("nilearn.datasets") / "data" / TEMPLATE)).dataobj, np.float32)
    rows = []
    for i in range(n_images):
        rng = np.random.default_rng(i)
        pad = rng.integers(8, 20, size=(3, 2))
        data = np.pad(template, pad)
        head = data > 0
        data = np.abs(data + rng.normal(0, 4.0, data.shape)).astype(np.float32)
        data = (data - data.mean()) / data.std()
        iid = f"ds000000__sub-{i:02d}_T1w"
        files = image_files(root / "preprocessed", "ds000000", f"{i:02d}", "", iid)
        anat = head[None].astype(np.uint8)
        box = [[int(np.flatnonzero(head.any(axis=tuple(a for a in range(3) if a != k)))[j]) + j for j in (0, -1)]
               for k in range(3)]
        write_image(files, data[None], np.zeros_like(anat), anat,
                    {"image_id": iid, "shape": list(data.shape), "anatomy_bbox": box}, {}, StoreSettings())
        rows.append({"image_id": iid, "dataset": "ds000000", "subject": f"{i:02d}", "session": "", "modality": "T1w",
                     "image": str(files.image), "anon": str(files.anon), "anat": str(files.anat)})
    twin = root / PREPROCESSED_TWIN
    atomic.write_json(twin, build_collection(pd.DataFrame(rows), 1, "bench", "image", "anon", "anat"))
    return twin


def patches_per_second(selection, patch, batch, n_batches, workers, augment, anatomy_aware) -> float:
    warm = max(1, workers)  # each worker's first batch carries its start-up
    loader = make_pretrain_loader(selection, (patch,) * 3, batch, seed=0, num_workers=workers, augment=augment,
                                  anatomy_aware=anatomy_aware, steps=warm + n_batches, pin_memory=False)
    it = iter(loader)
    for _ in range(warm):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - t0)


def patches_per_cpu_second(selection, patch, batch, n_batches, augment, anatomy_aware) -> float:
    loader = make_pretrain_loader(selection, (patch,) * 3, batch, seed=0, num_workers=0, augment=augment,
                                  anatomy_aware=anatomy_aware, steps=n_batches + 1, pin_memory=False)
    it = iter(loader)
    next(it)  # opens files, imports
    t0 = time.process_time()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.process_time() - t0)


def method_views_per_cpu_second(selection, method, patch, batch, n_batches) -> dict:
    """Loader + (CPU-side) view construction for `method`, one process, CPU seconds."""
    from openmind_bench import nets, ssl

    # The view does not depend on the network's size: a tiny one of a family the method has.
    arch = nets.resolve("ResEncTiny" if ssl.compatible(method, "cnn") else "PrimusTiny")
    loader_patch, network_patch = ssl.patch_sizes(method, arch.family, [patch] * 3)
    augment = ssl.loader_augmentation(method, arch.family)
    loader = make_pretrain_loader(selection, tuple(loader_patch), batch, seed=0, num_workers=0, augment=augment,
                                  anatomy_aware=False, centre_crop=ssl.loader_sampling(method, arch.family) == "centre",
                                  steps=n_batches + 1, pin_memory=False)
    model = ssl.build(method, arch.build(network_patch), arch, [patch] * 3)
    on_device = bool(getattr(model, "views_on_device", False))
    it = iter(loader)
    first = next(it)
    model.make_view(first, list(range(batch)))
    load = view = 0.0
    for i in range(n_batches):
        t0 = time.process_time()
        b = next(it)
        t1 = time.process_time()
        model.make_view(b, list(range(i * batch, (i + 1) * batch)))
        t2 = time.process_time()
        load, view = load + t1 - t0, view + t2 - t1
    samples = n_batches * batch
    cpu_per_sample = (load + (0.0 if on_device else view)) / samples
    return {"method": method, "loader_patch": "x".join(map(str, loader_patch)), "augment": augment,
            "load_ms": 1e3 * load / samples, "view_ms": 1e3 * view / samples, "view_on_device": on_device,
            "views_per_cpu_s": 1.0 / cpu_per_sample}


def methods_report(args, selection) -> None:
    import json

    from openmind_bench import ssl

    needed = {}
    if args.throughput:
        for row in json.loads(Path(args.throughput).read_text()):
            needed.setdefault(row["method"], {})[row["arch"]] = row["steps_per_s"]
    print(f"per method, one worker, {args.patch}^3 base patch, batch {args.batch}, {args.batches} batches, "
          f"cpus_per_gpu {args.cpus_per_gpu} ({args.cpus_per_gpu - 1} loader workers)")
    print("| method | loader patch | loader aug. | load ms/sample | view ms/sample | view on | views/s per worker "
          "| GPU steps/s needed | headroom |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.method_list or list(ssl.METHODS):
        r = method_views_per_cpu_second(selection, method, args.patch, args.batch, args.batches)
        supply = r["views_per_cpu_s"] * (args.cpus_per_gpu - 1)
        per_arch = needed.get(method) or ({"given": args.steps_per_s} if args.steps_per_s else {})
        steps = " / ".join(f"{a} {v:.2f}" for a, v in per_arch.items()) or "-"
        headroom = " / ".join(f"{supply / (args.batch * v):.1f}x" for v in per_arch.values()) or \
            f"feeds {supply / (2 * args.batch):.2f} steps/s at 2x"
        print(f"| {method} | {r['loader_patch']} | {'yes' if r['augment'] else 'no'} | {r['load_ms']:.0f} "
              f"| {r['view_ms']:.0f} | {'device' if r['view_on_device'] else 'CPU'} "
              f"| {r['views_per_cpu_s']:.2f} | {steps} | {headroom} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selection", help="a selection's pretrain_data.json (default: a synthetic store)")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--patch", type=int, default=160)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, 2, os.cpu_count() or 1}))
    parser.add_argument("--methods", dest="method_list", nargs="*", default=None,
                        help="per-method views/s per worker (all methods when none are named)")
    parser.add_argument("--throughput", help="pretrain_throughput.py --json rows: the GPU steps/s to feed")
    parser.add_argument("--steps-per-s", type=float, default=0.0, help="GPU steps/s to feed when no --throughput")
    parser.add_argument("--cpus-per-gpu", type=int, default=8, help="the profile's cpus_per_gpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        selection = args.selection or build_store(Path(tmp), args.images)
        if args.method_list is not None:
            methods_report(args, selection)
            return 0
        print(f"{args.patch}^3 patches, batch {args.batch}, {args.batches} timed batches after warm-up, "
              f"{os.cpu_count()} CPUs visible")
        modes = ((True, False), (False, False), (True, True))
        print(f"{'':>12s} {'augmented':>10s} {'no augmentation':>16s} {'augmented, anatomy-aware':>25s}")
        per_cpu = [patches_per_cpu_second(selection, args.patch, args.batch, args.batches, aug, aware)
                   for aug, aware in modes]
        print(f"{'per CPU-s':>12s} {per_cpu[0]:10.2f} {per_cpu[1]:16.2f} {per_cpu[2]:25.2f}  (one process)")
        for workers in args.workers:
            figures = [patches_per_second(selection, args.patch, args.batch, args.batches, workers, aug, aware)
                       for aug, aware in modes]
            label = f"{workers} workers"
            print(f"{label:>12s} {figures[0]:10.2f} {figures[1]:16.2f} {figures[2]:25.2f}  (patches/s, wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
