"""Plots, one function per result type."""

from ._benchmark import (
    benchmark_figures,
    benchmark_mode_collapse,
    benchmark_scatter,
    benchmark_scores,
    learning_curve,
)
from ._interactions import genetic_interactions
from ._intervals import prediction_intervals
from ._probe import axis_alignment, gradient_field, pathway_ranking
from ._programs import perturbation_programs

__all__ = [
    "axis_alignment",
    "benchmark_figures",
    "benchmark_mode_collapse",
    "benchmark_scatter",
    "benchmark_scores",
    "genetic_interactions",
    "gradient_field",
    "learning_curve",
    "pathway_ranking",
    "perturbation_programs",
    "prediction_intervals",
]
