"""Segmentation fine-tuning inside nnU-Net v2, as the papers did (see `run` for the job's steps).

- `plans`: nnU-Net plans like nnssl's (pre-training spacing, z-score, the pre-trained architecture);
- `dataset`: raw export of the accepted cases, preprocessing, `splits_final.json`, nnU-Net's path
  variables per job;
- `trainer`: `nnUNetTrainer_OpenMind`, one trainer driven by the schedule tables;
- `weights`: encoder + stem from our and nnssl's checkpoints;
- `run`: the job's entry `finetune_segmentation` (train, nnU-Net prediction, our DSC / NSD) and
  zero-shot prediction.

nnunetv2 is imported where used.
"""
