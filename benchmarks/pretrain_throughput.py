"""Pre-training throughput: steps/s, samples/s and peak memory per method and architecture.

Each configuration runs in its own process (so peak memory is its own) through the engine's own
pieces: the method's view of the batch (on the CPU, or on the device for the methods that build
their views there), the move to the device, and the trainer's step (autocast, GradScaler with fp16,
the method's clipping, optimiser). Data: a fixed random batch with a defaced box (timings do not
depend on the content); the batch has the loader's shape (SimCLR-like methods and VoCo: their region,
the network sees crops of it: 64^3 in the paper setting).

    python benchmarks/pretrain_throughput.py                       # CPU, tiny networks, 32^3, batch 2
                                                                   # (regions/crops scaled as the demo)
    python benchmarks/pretrain_throughput.py --full                # GPU: ResEnc-L / Primus-M, paper input
                                                                   # sizes, batch 2, fp16 and bf16
    python benchmarks/pretrain_throughput.py --device cuda --patch 128 --batch 2 --archs ResEncL
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
METHODS = ["mae", "spark3d", "simmim", "models_genesis", "simclr", "voco", "volume_fusion", "swinunetr",
           "barlow_twins", "vicreg"]
# Below the paper's 160^3 the contrastive methods' regions and crops scale as in the demo config.
TWO_VIEW_SMALL = {"region_size": [48, 48, 32], "crop_size": [32, 32, 32], "projector_dims": [128, 128]}
SMALL_SETTINGS = {"simclr": TWO_VIEW_SMALL, "barlow_twins": TWO_VIEW_SMALL, "vicreg": TWO_VIEW_SMALL,
                  "voco": {"region_size": [64, 64, 32], "base_grid": [2, 2, 1], "projector_dims": [128, 128]},
                  "volume_fusion": {"min_box_size": 4}, "mae_cnn": {"block_size": 8}, "spark3d": {"block_size": 8}}


def measure(method: str, arch_name: str, *, device: str, patch: int, batch: int, steps: int, warmup: int,
            compile_model: bool, threads: int, amp_dtype: str = "float16") -> dict:
    import contextlib
    import resource

    import torch

    from openmind_bench import ssl
    from openmind_bench.engine import distributed, optimisation, step as engine_step
    from openmind_bench.pretrain import settings as run_settings, trainer

    if threads:
        torch.set_num_threads(threads)
    section = {"patch_size": [patch] * 3, "total_batch_size": batch, "amp_dtype": amp_dtype}
    if patch < 160:
        section["method_settings"] = SMALL_SETTINGS
    s = run_settings.resolve(section, method, arch_name, out_dir="unused")
    arch = s.arch()
    dev = torch.device(device)
    loader_patch, network_patch = ssl.patch_sizes(method, arch.family, s.patch_size, s.method_settings)
    torch.manual_seed(0)
    backbone = arch.build(network_patch)
    model = ssl.build(method, backbone, arch, s.patch_size, s.method_settings).to(dev)
    optimizer = optimisation.build_optimizer(model.parameters(), s.optimisation, dev)
    step_model = torch.compile(model) if compile_model else model
    amp = engine_step.autocast(s.amp, s.amp_dtype, dev) if dev.type == "cuda" else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and amp_dtype == "float16" else None
    clip = ssl.grad_clip(method, arch.family, s.optimisation["grad_clip"], s.method_settings)
    ctx = distributed.Context(0, 1, 0, dev)
    image = torch.randn(batch, 1, *loader_patch)
    anon = torch.zeros_like(image)
    x, y, z = loader_patch
    anon[:, :, : x // 4, y // 2:, : z // 3] = 1.0
    image[anon > 0] = 0.0
    batch_dict = {"image": image, "anon": anon}

    def one_step(i: int) -> float:
        t = time.perf_counter()
        view = trainer.make_view(model, batch_dict, list(range(i * batch, (i + 1) * batch)), dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        view_seconds = time.perf_counter() - t
        engine_step.train_step(step_model, view, optimizer, scaler, clip, amp, ctx, None)
        return view_seconds

    for i in range(warmup):
        one_step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    view_seconds = 0.0
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        view_seconds += one_step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        device_name = torch.cuda.get_device_name(dev)
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)
        device_name = f"cpu x{torch.get_num_threads()} threads"
    return {
        "method": method, "arch": arch_name, "patch": "x".join(map(str, loader_patch)),
        "network_patch": "x".join(map(str, network_patch)), "batch": batch, "device": device_name,
        "compile": compile_model, "amp": s.amp_dtype if dev.type == "cuda" else "float32",
        "steps_per_s": steps / seconds, "samples_per_s": steps * batch / seconds,
        "view_ms_per_step": 1000 * view_seconds / steps, "peak_memory_mb": peak_mb,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--batch", type=int, default=2, help="batch per process (GPU)")
    p.add_argument("--archs", nargs="+", default=["ResEncTiny", "PrimusTiny"])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", choices=["off", "on", "both"], default="off")
    p.add_argument("--amp", choices=["float16", "bfloat16", "both"], default="float16",
                   help="autocast type on CUDA (float16 adds a GradScaler, as nnssl)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--full", action="store_true",
                   help="the paper setting on a GPU: ResEncL and PrimusM, 160^3 (64^3 crops of the SimCLR-like "
                        "methods and VoCo), batch 2, fp16 and bf16")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--one", nargs=4, metavar=("METHOD", "ARCH", "COMPILE", "AMP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(SRC))

    if args.one:
        method, arch, compile_flag, amp_dtype = args.one
        row = measure(method, arch, device=args.device, patch=args.patch, batch=args.batch, steps=args.steps,
                      warmup=args.warmup, compile_model=compile_flag == "1", threads=args.threads,
                      amp_dtype=amp_dtype)
        print("ROW " + json.dumps(row))
        return 0

    if args.full:
        args.device, args.patch, args.batch, args.archs, args.amp = "cuda", 160, 2, ["ResEncL", "PrimusM"], "both"
        args.steps, args.warmup = max(args.steps, 20), max(args.warmup, 5)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: GPU throughput not measured", file=sys.stderr)
            return 1
    from openmind_bench import nets, ssl

    compiles = {"off": ["0"], "on": ["1"], "both": ["0", "1"]}[args.compile]
    amps = ["float16", "bfloat16"] if args.amp == "both" else [args.amp]
    if args.device == "cpu":
        amps = ["float16"]  # no autocast on the CPU: one row
    rows = []
    for arch in args.archs:
        family = nets.resolve(arch).family
        for method in args.methods:
            if not ssl.compatible(method, family):
                continue
            for flag, amp in [(f, a) for f in compiles for a in amps]:
                cmd = [sys.executable, __file__, "--one", method, arch, flag, amp, "--device", args.device,
                       "--patch", str(args.patch), "--batch", str(args.batch), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
                if proc.returncode or not found:
                    print(f"{method} on {arch} (compile={flag}) failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(found[0]))
                r = rows[-1]
                print(f"{method:16s} {arch:11s} {r['amp']:8s} compile={int(r['compile'])} "
                      f"{r['steps_per_s']:7.2f} steps/s "
                      f"{r['peak_memory_mb']:9.0f} MB", file=sys.stderr)

    header = ("| method | arch | params (M) | loader patch | network patch | batch | device | amp | compile | steps/s "
              "| samples/s | view ms/step | peak memory (MB) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(f"| {r['method']} | {r['arch']} | {r['parameters_m']:.2f} | {r['patch']} | {r['network_patch']} "
              f"| {r['batch']} "
              f"| {r['device']} "
              f"| {r['amp']} | {'on' if r['compile'] else 'off'} | {r['steps_per_s']:.2f} | {r['samples_per_s']:.2f} "
              f"| {r['view_ms_per_step']:.1f} | {r['peak_memory_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
