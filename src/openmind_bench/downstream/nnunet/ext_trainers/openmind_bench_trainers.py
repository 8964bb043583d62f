"""What `nnUNet_extTrainer` points nnU-Net at: nnU-Net imports every module of this folder as a
top-level module, so the folder holds this one file, which re-exports the trainer."""

from openmind_bench.downstream.nnunet.trainer import nnUNetTrainer_OpenMind  # noqa: F401
