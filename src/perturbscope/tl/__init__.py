"""Analyses on AnnData: genetic-interaction calls and related tools.

The scanpy-style tools write into the AnnData and return ``None`` (a copy with ``copy=True``):
``scopevi_latent`` -> ``obsm["X_scopevi"]``, ``predict_response`` ->
``layers[f"scopevi_{perturbation}"]``, ``perturbation_effects`` -> ``uns["perturbation_effects"]``,
``call_interactions`` -> ``uns["genetic_interactions"]``, ``decoder_gene_scores`` ->
``var["probe_alignment"]`` and ``var["probe_alignment_baseline"]``.
"""

from ._genetic_interactions import (
    CALLS,
    THRESHOLDS,
    classify_interactions,
    compare_with_published,
    distance_correlation,
    fit_interaction,
    genetic_interactions,
)
from ._to_anndata import (
    call_interactions,
    decoder_gene_scores,
    perturbation_effects,
    predict_response,
    scopevi_latent,
)

__all__ = [
    "CALLS",
    "THRESHOLDS",
    "classify_interactions",
    "compare_with_published",
    "distance_correlation",
    "fit_interaction",
    "genetic_interactions",
    "call_interactions",
    "decoder_gene_scores",
    "perturbation_effects",
    "predict_response",
    "scopevi_latent",
]
