"""The pre-training engine: settings, trainer (DDP, checkpoints, resume, preemption), torchrun launcher."""
