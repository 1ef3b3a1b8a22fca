"""Analyses on AnnData: genetic-interaction calls and related tools."""

from ._genetic_interactions import (
    CALLS,
    THRESHOLDS,
    classify_interactions,
    compare_with_published,
    distance_correlation,
    fit_interaction,
    genetic_interactions,
)

__all__ = [
    "CALLS",
    "THRESHOLDS",
    "classify_interactions",
    "compare_with_published",
    "distance_correlation",
    "fit_interaction",
    "genetic_interactions",
]
