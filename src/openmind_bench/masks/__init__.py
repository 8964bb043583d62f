"""Anatomy and anonymisation masks per image (classical default backend, nnU-Net backend,
checked release masks): openmind_bench.masks.classical, .nnunet, .release, .shard."""
