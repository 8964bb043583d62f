"""The training engine shared by pre-training and classification fine-tuning: torchrun launch,
distributed context, optimisers and lr curves, AMP, one optimisation step, checkpoint I/O in
nnssl's layout, run logs, stop/preemption and seeding. Stage packages build on it; it imports no
stage."""
