"""The pre-training stage: run settings, the pre-training loop on the shared engine, batch sources, worker and CLI."""
