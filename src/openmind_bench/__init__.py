"""OpenMind benchmark: the 3D medical SSL benchmark as one resumable workflow."""

__version__ = "0.1.0"
