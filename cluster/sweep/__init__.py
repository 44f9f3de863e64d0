"""Rank x bit-width sweeps on Ray Tune: every grid point quantized, finetuned and evaluated through the engine's
use cases, with a Pareto plot of quality against size and memory."""

from cluster.sweep.results import format_table, pareto_front
from cluster.sweep.spec import METRICS, GridSpec, Point, SweepSpec, Trial
from cluster.sweep.trial import ensure_quantized
from cluster.sweep.tune import EXPERIMENT, run_sweep

__all__ = ["EXPERIMENT", "METRICS", "GridSpec", "Point", "SweepSpec", "Trial", "ensure_quantized", "format_table",
           "pareto_front", "run_sweep"]
