"""BIDS parsing and the per-dataset image index."""
