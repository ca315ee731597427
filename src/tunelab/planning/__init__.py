"""Estimates made before a run: memory and time."""

from tunelab.planning.estimate import RunEstimate, estimate_run, measure_matmul_tflops, measured_peak_gib, model_flops_per_token

__all__ = ["RunEstimate", "estimate_run", "measure_matmul_tflops", "measured_peak_gib", "model_flops_per_token"]
