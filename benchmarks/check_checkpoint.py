"""The CPU check of an external checkpoint (rule check_checkpoint) on full-size networks.

Writes a full-size ResEnc-L and Primus-M checkpoint at the papers' 160^3 in nnssl's layout (the
plan as nnssl writes it, without our own entry, so the scratch baseline is found by building the
presets) and times `check_checkpoint` for the given input-channel counts: reading, the transfer per
channel count, the NaN scan and the scratch-baseline match.

    python benchmarks/check_checkpoint.py [--channels 1 2 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def write_checkpoint(path: Path, arch_name: str) -> None:
    import torch

    from openmind_bench.engine import checkpoint
    from openmind_bench.pretrain import settings as run_settings

    s = run_settings.resolve({}, "mae", arch_name, out_dir=str(path.parent))
    arch = s.arch()
    with torch.device("meta"):  # no slow random initialisation of 100+ M parameters
        net = arch.build(s.patch_size)
    net.to_empty(device="cpu")
    with torch.no_grad():
        for i, tensor in enumerate(net.state_dict().values()):
            tensor.fill_((i % 97 + 1) * 1e-3)
    plan = checkpoint.adaptation_plan(arch, net, s)
    del plan["architecture_plans"]["openmind_bench"]
    torch.save({"network_weights": net.state_dict(), "nnssl_adaptation_plan": plan}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from openmind_bench.checkpoints.check import check_checkpoint

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for arch_name in ("ResEncL", "PrimusM"):
            path = Path(tmp) / f"{arch_name}.pth"
            write_checkpoint(path, arch_name)
            started = time.perf_counter()
            report = check_checkpoint(path, channel_counts=args.channels)
            wall = time.perf_counter() - started
            print(f"{arch_name}: {wall:.1f} s wall for channels {args.channels} ({args.threads} thread(s)); "
                  f"{report['parameters']:,} parameters, {report['transfers'][0]['moved']} tensors moved, "
                  f"scratch baseline {report['architecture']['scratch_architecture']}, "
                  f"{path.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
