"""Validation: calibrate from measurements, predict the same configurations, compare.

``probe`` reads the public probe format (see shared/data/README.md), calibrates the simulator
from its component measurements and ``resident`` rows only, and predicts every offload row.
``traces/`` holds stored real measurements with their provenance and tolerances (index.yaml);
the test suite replays each one, so a change that breaks fidelity cannot land.
"""
from .compare import compare_traces, trace_metrics
from .probe import ProbeFile, error_summary, leave_one_shape_out, predict_probe
from .stored import StoredMeasurement, stored_measurements

__all__ = ["compare_traces", "trace_metrics", "ProbeFile", "StoredMeasurement", "error_summary", "leave_one_shape_out", "predict_probe",
           "stored_measurements"]
