"""CPU cost of one probe pass (`pretrain.probe_every`, and the `linear_probe` / `knn` runs): one
feature extraction per case (the frozen encoder's forward pass on the centre patch, no gradients),
then the scikit-learn probes on the pooled features. A pass costs about cases x seconds per case
plus the probes' fits; the figures let a user set `probe_every` against an epoch's length.

    python benchmarks/probe_cost.py                       # the demo's size: tiny networks at 32^3, 12 cases
    python benchmarks/probe_cost.py --full --threads 2    # ResEnc-L and Primus-M at 160^3 (one case each)
    python benchmarks/probe_cost.py --archs ResEncL --patch 160 --repeats 2 --cases 100

Data: a z-scored random volume (timings do not depend on the content). Features of `--cases` cases
for the probes' fits are drawn at random with the encoder's width (their fit time does not depend
on where the features came from).
"""

from __future__ import annotations

import argparse
import json
import time


def extraction_seconds(arch_name: str, patch: int, repeats: int) -> tuple[float, int]:
    """(median seconds of one case's forward pass, feature width) on the CPU."""
    import torch

    from openmind_bench import nets
    from openmind_bench.downstream.probes import pooled_features

    torch.manual_seed(0)
    net = nets.resolve(arch_name).build([patch] * 3).eval()
    image = torch.randn(1, 1, patch, patch, patch)
    times = []
    with torch.no_grad():
        width = int(pooled_features(net, image).shape[1])  # warm-up (allocator, kernels)
        for _ in range(repeats):
            started = time.perf_counter()
            pooled_features(net, image)
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2], width


def fit_seconds(cases: int, width: int) -> dict:
    """Seconds of the out-of-fold scores of both probes (what a pass during pre-training fits)."""
    import numpy as np

    from openmind_bench import config
    from openmind_bench.downstream import probes

    settings = config.defaults()["downstream"]["probes"]
    rng = np.random.default_rng(0)
    labels = np.arange(cases) % 2
    features = rng.normal(size=(cases, width)) + labels[:, None] * 0.2
    out = {}
    for kind in probes.PROBES:
        started = time.perf_counter()
        probes.out_of_fold(kind, features, labels, 2, settings, seed=0)
        out[kind] = round(time.perf_counter() - started, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="ResEncL and PrimusM at 160^3")
    parser.add_argument("--archs", nargs="*",
                        help="architecture presets (default: tiny ones, or the papers' with --full)")
    parser.add_argument("--patch", type=int, help="cube edge (default 32, or 160 with --full)")
    parser.add_argument("--cases", type=int, help="cases of one pass (default 12: the demo set's training part; "
                                                  "100 with --full)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes per architecture")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    archs = args.archs or (["ResEncL", "PrimusM"] if args.full else ["ResEncTiny", "PrimusTiny"])
    patch = args.patch or (160 if args.full else 32)
    cases = args.cases or (100 if args.full else 12)
    for arch in archs:
        seconds, width = extraction_seconds(arch, patch, args.repeats)
        fits = fit_seconds(cases, width)
        print(json.dumps({"architecture": arch, "patch": patch, "threads": torch.get_num_threads(),
                          "seconds_per_case": round(seconds, 3), "feature_width": width, "cases": cases,
                          "probe_fit_seconds": fits,
                          "pass_seconds": round(cases * seconds + sum(fits.values()), 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
