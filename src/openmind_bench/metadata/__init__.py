"""Harmonised participant and acquisition metadata."""
