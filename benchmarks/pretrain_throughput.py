"""Pre-training throughput: steps/s, samples/s and peak memory per method and architecture.

Each configuration runs in its own process (so peak memory is its own) through the engine's own
pieces: the method's view of the batch on the CPU, the move to the device, and the trainer's step
(autocast, clipping, optimiser). Data: a fixed random batch with a defaced box (timings do not depend
on the content).

    python benchmarks/pretrain_throughput.py                       # CPU, tiny networks, 32^3, batch 2
    python benchmarks/pretrain_throughput.py --full                # GPU: ResEnc-L / Primus-M, 160^3,
                                                                   # batch 2, bf16, with/without compile
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
METHODS = ["mae", "spark3d", "simmim", "models_genesis"]


def measure(method: str, arch_name: str, *, device: str, patch: int, batch: int, steps: int, warmup: int,
            compile_model: bool, threads: int) -> dict:
    import contextlib
    import resource

    import torch

    from openmind_bench import ssl
    from openmind_bench.train import distributed, optimisation, settings as run_settings, trainer

    if threads:
        torch.set_num_threads(threads)
    s = run_settings.resolve({"patch_size": [patch] * 3, "total_batch_size": batch}, method, arch_name,
                             out_dir="unused")
    arch = s.arch()
    dev = torch.device(device)
    torch.manual_seed(0)
    backbone = arch.build(s.patch_size)
    model = ssl.build(method, backbone, arch, s.patch_size, s.method_settings).to(dev)
    optimizer = optimisation.build_optimizer(model.parameters(), s.optimisation, dev)
    step_model = torch.compile(model) if compile_model else model
    amp = trainer.autocast(s, dev) if dev.type == "cuda" else contextlib.nullcontext()
    ctx = distributed.Context(0, 1, 0, dev)
    image = torch.randn(batch, 1, *s.patch_size)
    anon = torch.zeros_like(image)
    anon[:, :, : patch // 4, patch // 2:, : patch // 3] = 1.0
    image[anon > 0] = 0.0
    batch_dict = {"image": image, "anon": anon}

    def one_step(i: int) -> float:
        t = time.perf_counter()
        view = model.make_view(batch_dict, list(range(i * batch, (i + 1) * batch)))
        view_seconds = time.perf_counter() - t
        view = trainer.to_device(view, dev)
        trainer.train_step(step_model, view, optimizer, None, s.optimisation["grad_clip"], amp, ctx, None)
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
        "method": method, "arch": arch_name, "patch": patch, "batch": batch, "device": device_name,
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
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--full", action="store_true",
                   help="the paper setting on a GPU: ResEncL and PrimusM, 160^3, batch 2, bf16, compile off and on")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--one", nargs=3, metavar=("METHOD", "ARCH", "COMPILE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(SRC))

    if args.one:
        method, arch, compile_flag = args.one
        row = measure(method, arch, device=args.device, patch=args.patch, batch=args.batch, steps=args.steps,
                      warmup=args.warmup, compile_model=compile_flag == "1", threads=args.threads)
        print("ROW " + json.dumps(row))
        return 0

    if args.full:
        args.device, args.patch, args.batch, args.archs, args.compile = "cuda", 160, 2, ["ResEncL", "PrimusM"], "both"
        args.steps, args.warmup = max(args.steps, 20), max(args.warmup, 5)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: GPU throughput not measured", file=sys.stderr)
            return 1
    from openmind_bench import nets, ssl

    compiles = {"off": ["0"], "on": ["1"], "both": ["0", "1"]}[args.compile]
    rows = []
    for arch in args.archs:
        family = nets.resolve(arch).family
        for method in args.methods:
            if not ssl.compatible(method, family):
                continue
            for flag in compiles:
                cmd = [sys.executable, __file__, "--one", method, arch, flag, "--device", args.device,
                       "--patch", str(args.patch), "--batch", str(args.batch), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
                if proc.returncode or not found:
                    print(f"{method} on {arch} (compile={flag}) failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(found[0]))
                r = rows[-1]
                print(f"{method:16s} {arch:11s} compile={int(r['compile'])} {r['steps_per_s']:7.2f} steps/s "
                      f"{r['peak_memory_mb']:9.0f} MB", file=sys.stderr)

    header = "| method | arch | params (M) | patch | batch | device | amp | compile | steps/s | samples/s | view ms/step | peak memory (MB) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(f"| {r['method']} | {r['arch']} | {r['parameters_m']:.2f} | {r['patch']}^3 | {r['batch']} | {r['device']} "
              f"| {r['amp']} | {'on' if r['compile'] else 'off'} | {r['steps_per_s']:.2f} | {r['samples_per_s']:.2f} "
              f"| {r['view_ms_per_step']:.1f} | {r['peak_memory_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
