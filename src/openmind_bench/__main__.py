"""`python -m openmind_bench`: the command line.

Guarded, so that importing the module runs nothing: tools that import every module of a folder
(nnU-Net's trainer search when `nnUNet_extTrainer` points at `src/`) must not start the CLI."""

from openmind_bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
