"""Estimates made before a run: memory and time."""

from tunelab.planning.estimate import RunEstimate, estimate_run, measured_peak_gib

__all__ = ["RunEstimate", "estimate_run", "measured_peak_gib"]
