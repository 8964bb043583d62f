"""Cost of the curation stage at the full benchmark's scale, on synthetic data.

- `--search`: all pairs within a radius among N fingerprints of dimension D (the duplicate search),
  with faiss-cpu (exact IndexFlatL2 range search) and scikit-learn (NearestNeighbors, brute force,
  radius_neighbors), on unit vectors with planted near-duplicate pairs; the two must find the same
  pairs.
- `--fingerprint`: seconds per image of `curation.fingerprint.fingerprint` on a 256^3 float32 volume
  at 1 mm (a head-sized ellipsoid with texture), the preprocessed image it reads.
- `--balance`: seconds the pulp budget with balance bounds takes on a synthetic table of N images.
- `--demo`: the thresholds against the demo's ground truth (curation.validation): the demo built with its
  planted duplicates and a planted downstream test case (DemoPatientCls), every 3D image preprocessed as
  the demo config does (2 mm) and fingerprinted; distances per kind of pair (planted duplicates, one
  subject's other contrasts and sessions, other subjects), precision and recall of the planted duplicates
  at `curation.duplicate_distance` and of the planted test case at `curation.leakage_distance`.

    python benchmarks/curation_neighbours.py --search [--n 114000] [--dim 511] [--threads 2]
    python benchmarks/curation_neighbours.py --fingerprint
    python benchmarks/curation_neighbours.py --balance [--n 114000]
    python benchmarks/curation_neighbours.py --demo
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def synthetic_fingerprints(n: int, dim: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, set]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    planted = set()
    idx = rng.choice(n, size=2 * pairs, replace=False)
    for a, b in zip(idx[:pairs], idx[pairs:]):
        y = x[a] + rng.standard_normal(dim).astype(np.float32) * 0.002
        x[b] = y / np.linalg.norm(y)
        planted.add((min(a, b), max(a, b)))
    return x, planted


def search(n: int, dim: int, radius: float, threads: int) -> None:
    x, planted = synthetic_fingerprints(n, dim, pairs=200)
    print(f"{n} x {dim} float32 fingerprints, radius {radius}, {threads} thread(s), {len(planted)} planted pairs")
    from openmind_bench.curation.neighbours import pairs_within

    for backend in ("faiss", "sklearn"):
        t0 = time.perf_counter()
        found = pairs_within(x, radius, backend=backend, threads=threads)
        took = time.perf_counter() - t0
        got = {(int(min(i, j)), int(max(i, j))) for i, j in zip(found.i, found.j)}
        print(f"{backend}: {took:.1f} s, {len(got)} pair(s), planted found {len(got & planted)}/{len(planted)}")


def fingerprint_cost(repeats: int = 3) -> None:
    from scipy import ndimage

    from openmind_bench.curation.fingerprint import FingerprintSettings, fingerprint

    rng = np.random.default_rng(0)
    grid = np.indices((256, 256, 256), dtype=np.float32) - 128
    head = ((grid[0] / 80) ** 2 + (grid[1] / 100) ** 2 + (grid[2] / 95) ** 2) <= 1
    del grid
    image = head * (1 + 0.3 * ndimage.gaussian_filter(rng.standard_normal((64, 64, 64)).astype(np.float32), 2)
                    .repeat(4, 0).repeat(4, 1).repeat(4, 2))
    image = ((image - image.mean()) / image.std()).astype(np.float32)
    settings = FingerprintSettings()
    fingerprint(image, (1.0, 1.0, 1.0), settings)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fingerprint(image, (1.0, 1.0, 1.0), settings)
        times.append(time.perf_counter() - t0)
    print(f"fingerprint of a 256^3 float32 image at 1 mm: {min(times):.3f} s (best of {repeats}), "
          f"{settings.dimension} dimensions")


def balance_cost(n: int) -> None:
    import pandas as pd

    from openmind_bench.curation.budget import solve_budget, weights

    rng = np.random.default_rng(0)
    images = pd.DataFrame({
        "dataset": [f"ds{d:06d}" for d in rng.integers(0, 800, n)],
        "modality": rng.choice(["T1w", "T2w", "FLAIR", "ADC", "FA"], n),
        "sex": rng.choice(["F", "M", None], n, p=[0.45, 0.45, 0.1]),
        "manufacturer": rng.choice(["Siemens", "GE", "Philips", None], n, p=[0.5, 0.2, 0.2, 0.1]),
        "quality_score": rng.choice([1.0, 1.5, 2.0, 2.5, 3.0, 4.0, np.nan], n),
    })
    cost = rng.lognormal(np.log(8e6), 0.5, n)
    balance = [{"column": "sex", "groups": {"F": [0.45, 0.55], "M": [0.45, 0.55]}},
               {"column": "manufacturer", "default": [0.0, 0.4]}]
    t0 = time.perf_counter()
    chosen = solve_budget(images, cost, weights(images.quality_score, 3.0), cost.sum() * 0.3,
                          max_per_dataset=2000, max_per_modality=40000, balance=balance, time_limit=600)
    took = time.perf_counter() - t0
    share = chosen.sex.fillna("missing").value_counts(normalize=True).round(3).to_dict()
    print(f"balanced budget over {n} images: {took:.1f} s, {len(chosen)} chosen, sex shares {share}")


def demo_thresholds() -> None:
    import tempfile
    from pathlib import Path

    import pandas as pd
    import yaml

    from openmind_bench import config
    from openmind_bench.curation.fingerprint import FingerprintSettings
    from openmind_bench.curation.fingerprints import read_tables, run_downstream_fingerprints
    from openmind_bench.curation.validation import (demo_images, fingerprint_files, kind_summary, pair_table,
                                                    precision_recall)
    from openmind_bench.demo import build_demo
    from openmind_bench.demo.builder import leak_source
    from openmind_bench.demo.downstream import build_downstream
    from openmind_bench.downstream.splits import SplitSettings, split_dataset
    from openmind_bench.preprocess.image import PreprocessSettings
    from openmind_bench.registry import load_registry

    repo = Path(__file__).resolve().parents[1]
    demo = yaml.safe_load((repo / "config/demo.yaml").read_text())
    settings = PreprocessSettings(spacing=tuple(demo["preprocess"]["spacing"]))
    curation = config.section("curation")
    name, registry = "DemoPatientCls", repo / "config/downstream_demo.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_downstream(tmp / "sets", seed=0)
        spec = load_registry(registry, tmp / "sets").get(name)
        split = tmp / "split.json"
        split_dataset(registry, tmp / "sets", name, SplitSettings(test_fraction=demo["downstream"]["test_fraction"],
                                                                  folds=demo["downstream"]["folds"]), split_out=split)
        leak = leak_source(split, spec.source, name, spec.modalities[0])
        truth = build_demo(tmp / "mirror", seed=0, leak=leak)
        copy = truth["planted_leak"]["copy"]
        images = demo_images(truth)
        if copy not in set(images.path):  # the ground truth lists the copy apart, as `planted_leak`
            images = pd.concat([images, pd.DataFrame([{"path": copy, "dataset": copy.split("/")[0],
                                                       "subject": copy.split("/")[1][4:], "session": "",
                                                       "modality": leak["modality"]}])], ignore_index=True)
        t0 = time.perf_counter()
        vectors = fingerprint_files([tmp / "mirror" / p for p in images.path], settings)
        took = (time.perf_counter() - t0) / len(images)
        pairs = pair_table(images, vectors, truth["planted_duplicates"])
        print(f"{len(images)} demo 3D images at {settings.spacing} mm, {took:.2f} s each to preprocess and fingerprint")
        with pd.option_context("display.width", 120):
            print(kind_summary(pairs).round(4).to_string())
        print("duplicates:", precision_recall(pairs, curation["duplicate_distance"]))
        run_downstream_fingerprints(split, name, spec.source, tmp / "down.parquet", tmp / "down.tsv", settings,
                                    FingerprintSettings())
        cases, case_vectors = read_tables([tmp / "down.parquet"])
        d = np.linalg.norm(vectors[:, None, :] - case_vectors[None, :, :], axis=2)
        leaked = (images.path == copy).to_numpy()[:, None] & (cases.case == leak["case"]).to_numpy()[None, :] \
            & (cases.channel.astype(int) == 0).to_numpy()[None, :]
        found = d <= curation["leakage_distance"]
        tp = int((found & leaked).sum())
        print(f"leakage: {len(cases)} test-case images of {name}; planted copy at {d[leaked].min():.4f}, nearest "
              f"other pair at {d[~leaked].min():.4f}; at {curation['leakage_distance']}: found {int(found.sum())}, "
              f"precision {tp}/{int(found.sum())}, recall {tp}/{int(leaked.sum())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--search", action="store_true")
    p.add_argument("--fingerprint", action="store_true")
    p.add_argument("--balance", action="store_true")
    p.add_argument("--demo", action="store_true")
    p.add_argument("--n", type=int, default=114000)
    p.add_argument("--dim", type=int, default=None, help="default: the fingerprint's dimension")
    p.add_argument("--radius", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.search:
        from openmind_bench.curation.fingerprint import FingerprintSettings

        search(args.n, args.dim or FingerprintSettings().dimension, args.radius, args.threads)
    if args.fingerprint:
        fingerprint_cost()
    if args.balance:
        balance_cost(args.n)
    if args.demo:
        demo_thresholds()


if __name__ == "__main__":
    main()
